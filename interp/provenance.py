"""What a result records about how it was made, without naming the machine that made it.

A result file (an experiment's ``results.json``, a benchmark's JSON) is read on other machines: it records the
command that produced it and the model it ran on, but not the folders of the machine that ran it (a cache under
``/tmp``, the embedded model's converted copy under the user's home), which mean nothing elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def machine_path(value: str) -> bool:
    """Whether ``value`` names a place on this machine: an absolute path, or one under the home folder (``~``)."""
    return os.path.isabs(value) or value.startswith("~") or (len(value) > 2 and value[1:3] in (":\\", ":/"))


def placeholder(flag: str) -> str:
    """``--tune-cache`` -> ``TUNE_CACHE``: what a flag's value is recorded as when it is left out."""
    return flag.lstrip("-").replace("-", "_").upper() or "PATH"


def recorded_command(script: str, argv: Sequence[str], *, placeholder_flags: Sequence[str] = ()) -> str:
    """``python SCRIPT ARGS`` as a result records it: the value of every flag that ends in one of
    ``placeholder_flags`` (e.g. ``"cache"``: a cache folder, wherever it is), and every value that is a machine
    path (:func:`machine_path`), written as its flag's name in capitals (``--cache CACHE``, ``--out=OUT``); a
    machine path with no flag before it as ``PATH``. Relative paths (``experiments/results/...``) stay."""
    args = [str(a) for a in argv]
    for i, a in enumerate(args):
        flag, eq, value = a.partition("=")
        if flag.startswith("--") and eq:
            if flag.endswith(tuple(placeholder_flags)) or machine_path(value):
                args[i] = f"{flag}={placeholder(flag)}"
        elif flag.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is not None and not nxt.startswith("--") and (flag.endswith(tuple(placeholder_flags))
                                                               or machine_path(nxt)):
                args[i + 1] = placeholder(flag)
        elif machine_path(a) and not (i > 0 and args[i - 1].startswith("--")):
            args[i] = "PATH"
    return " ".join(["python", script, *args])


def model_label(model) -> str:
    """The name a result records for ``model`` (a Hugging Face model, or one wrapped by this project): the embedded
    model's name (``"smollm2-135m"``) for its converted copy under this machine's cache (see
    :func:`interp.models.load_model`), else its ``config._name_or_path`` (a Hub name, or the folder it was
    loaded from, as given)."""
    from interp.models import EMBEDDED, cache_dir

    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    path = Path(name)
    if name and path.name.startswith(f"{EMBEDDED}-") and path.parent == cache_dir() / "models":
        return EMBEDDED
    return name


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks), to record which data a result came from."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
