"""What a writer owns in an output folder: its lock, its temporary files, and the paths it may read.

* **Locks.** :func:`folder_lock` takes an advisory exclusive lock (``fcntl.flock``) on a lock file in
  the folder for as long as a process writes there, and records the holder's PID in that file. A
  second writer is refused at once with a one-line error naming the holder; nothing waits. The lock
  is released when the holder exits, however it exits (the kernel drops it with the file
  descriptor), so a killed writer never leaves a folder locked. The holder removes the lock file when
  it is done (while still holding it; a writer that then finds its file gone locks the new one).
  Writers that share a folder by design (the ranks of one ``torchrun`` job) each lock their own file.
* **Temporary files** are named ``.interp-tmp-<target name>.<random>`` (:data:`TMP_PREFIX`), beside
  the file or folder they become. A killed writer may leave one behind; the next start of the same
  writer, holding the folder's lock, removes them (:func:`remove_temps`).
* **Confinement.** A path read from a manifest names a file inside the folder: :func:`inside`
  refuses absolute paths, ``..`` and symlinks whose target lies outside the folder.

Platforms without ``fcntl`` (Windows) get no lock: there every writer proceeds as before.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from interp.errors import InterpError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["TMP_PREFIX", "LockError", "folder_lock", "inside", "remove_temps", "temp_name"]

TMP_PREFIX = ".interp-tmp-"
"""Start of the name of every temporary file or folder this project writes beside its target."""


class LockError(InterpError):
    """Another process holds the lock of a folder this process would write."""


def temp_name(target: str) -> str:
    """The prefix of a temporary name for `target` (a random part follows it)."""
    return f"{TMP_PREFIX}{target}."


def remove_temps(folder: str | os.PathLike, target_pattern: str = "*") -> list[str]:
    """Remove the temporary files and folders left in `folder` for targets matching `target_pattern`
    (a glob over the target's name, e.g. ``"shard-r0-*"``, ``"manifest.json"``); returns the names removed.

    Call it only while holding the folder's lock: a temporary file of a live writer would go too."""
    folder = Path(folder)
    removed = []
    for p in sorted(folder.glob(f"{temp_name(target_pattern)}*")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def inside(folder: str | os.PathLike, name: object, what: str, error: type[Exception] = InterpError) -> Path:
    """``folder / name`` when `name` is a relative path that stays inside `folder`, symlinks resolved.

    `what` says where the name came from (e.g. ``"manifest.rank0.json"``); `error` is the exception
    class raised otherwise (one line: what arrived, what is allowed).
    """
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise error(f"{what}: a file entry must be a non-empty string, got {name!r}; the file is damaged")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise error(f"{what}: file entry {name!r} points outside {folder}; entries must be names inside "
                    "the folder. The file is damaged or was edited: write it again")
    path = folder / rel
    root = folder.resolve()
    target = path.resolve()
    if target != root and root not in target.parents:
        raise error(f"{what}: {path} is a link to {target}, outside {folder}; copy the file into the folder "
                    "instead of linking it")
    return path


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the lock file."""
    for _ in range(50):  # the holder writes its PID right after locking: wait for it briefly
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        if text:
            pid = text[0]
            host = text[1] if len(text) > 1 else ""
            here = host in ("", socket.gethostname())
            return f"process {pid}" + ("" if here else f" on {host}")
        time.sleep(0.01)
    return "another process"


@contextmanager
def folder_lock(folder: str | os.PathLike, name: str, what: str,
                error: type[Exception] = LockError, *, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive advisory lock on ``folder / name`` while the block runs.

    `what` names the folder for the message (e.g. ``"the activation cache at cache/"``). A lock held
    by another process raises `error` at once: ``<what> is being written by process <PID> ...``;
    with `wait`, this process waits for it instead (for caches every caller fills the same way).
    The folder must exist. The lock file is removed on release (a killed holder leaves it behind; the
    next writer takes it over)."""
    path = Path(folder) / name
    if fcntl is None:  # pragma: no cover - Windows
        yield path
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise error(f"{what} is being written by {holder} (lock {path}); wait for it to finish, or "
                        "write somewhere else") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder we waited on removed this file on release: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        try:
            path.unlink(missing_ok=True)  # while still locked: nobody can hold the unlinked file
        finally:
            os.close(fd)  # releases the lock
