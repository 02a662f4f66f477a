"""Atomic file writes: write a temporary file beside the target, then rename it into place.

A crash (or Ctrl-C) mid-write leaves the old file, or none, never a half-written one; the temporary
file (``.interp-tmp-<name>.<random>``, see :mod:`interp.folders`) is removed on failure, and one left
by a killed process is removed by the next start of the writer that owns the folder. Every file this
project writes for later reading goes through here.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from interp.folders import temp_name


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_name(path.name))
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename in (None, tmp) and e.errno is not None:  # name the file the user asked for
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> Path:
    return write_text(path, json.dumps(obj, **{"indent": 1, **dump_kwargs}))


def save_file(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with a failed write (disk full, file too large, no permission)
    raised as the ``OSError`` it is, rather than the library's own error type."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file as _save

    try:
        _save(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        num = int(code.group(1))
        raise OSError(num, os.strerror(num) if num in errno.errorcode else str(e), str(path)) from None
