"""Validate a safetensors file's header before any tensor is read.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``)
and a byte buffer. A file from a stranger can lie in every one of those: a header length
larger than the file (an allocation bomb if trusted), offsets outside the buffer (a truncated
download), a shape whose size disagrees with its byte range, overlapping tensors. Each of
those is a :class:`CheckpointError` naming the file and the key here, before the
``safetensors`` library maps a single byte. Nothing in this module unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from saes.base import SAEError

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Largest header accepted (the ``safetensors`` library's own limit)."""

# safetensors dtype tag -> (bytes per element, torch dtype or None where torch has no equivalent)
DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (1, torch.bool),
    "U8": (1, torch.uint8),
    "I8": (1, torch.int8),
    "I16": (2, torch.int16),
    "U16": (2, getattr(torch, "uint16", None)),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I32": (4, torch.int32),
    "U32": (4, getattr(torch, "uint32", None)),
    "F32": (4, torch.float32),
    "F64": (8, torch.float64),
    "I64": (8, torch.int64),
    "U64": (8, getattr(torch, "uint64", None)),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
}
TORCH_TO_TAG = {dt: tag for tag, (_, dt) in DTYPES.items() if dt is not None}


class CheckpointError(SAEError, ValueError):
    """A checkpoint that is missing, corrupt, unsafe or does not match its config."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it."""

    name: str
    dtype: str
    """safetensors dtype tag (``"F32"``, ``"BF16"`` ...)."""
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype][1]


def _fail(path: str | os.PathLike, msg: str) -> CheckpointError:
    return CheckpointError(f"{path}: {msg}")


def parse_header(
    raw: bytes, data_size: int, path: str | os.PathLike = "<bytes>"
) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Check a header's JSON against the size of the data buffer that follows it.

    Returns ``({name: TensorEntry}, metadata)``. Raises :class:`CheckpointError` (and nothing
    else) for any header that the ``safetensors`` format does not allow.
    """
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(path, f"the header is not valid UTF-8 JSON ({type(e).__name__}: {e}); "
                    "the file is corrupt or not a safetensors file") from None
    if not isinstance(header, dict):
        raise _fail(path, f"the header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "'__metadata__' must map strings to strings")
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _parse_entry(name, info, data_size, path)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values())
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else f"leaves a gap of {begin - cursor} bytes"
            raise _fail(path, f"tensor {name!r} starts at byte {begin}, which {what} (expected {cursor})")
        cursor = end
    if cursor != data_size:
        raise _fail(path, f"the tensors cover {cursor} bytes but the data buffer holds {data_size}; "
                    "the file is truncated or has trailing bytes")
    return entries, dict(metadata)


def _parse_entry(name: str, info: object, data_size: int, path: str | os.PathLike) -> TensorEntry:
    where = f"tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        keys = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise _fail(path, f"{where} must have exactly the keys dtype, shape, data_offsets; got {keys}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"{where} has unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise _fail(path, f"{where} has shape {shape!r}; expected a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise _fail(path, f"{where} has data_offsets {offsets!r}; expected [begin, end] integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _fail(path, f"{where} has data_offsets [{begin}, {end}] outside the {data_size}-byte data "
                    "buffer; the file is truncated or its header is corrupt")
    nbytes = math.prod(shape) * DTYPES[dtype][0]
    if nbytes != end - begin:
        raise _fail(path, f"{where} of shape {shape} and dtype {dtype} needs {nbytes} bytes but its "
                    f"data_offsets span {end - begin}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Read and validate the header of the safetensors file at ``path`` (no tensor data is read)."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"the file holds {size} bytes, fewer than the 8-byte header length; "
                        "it is truncated or not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise _fail(path, f"the header length field says {n} bytes but the file holds {size} bytes "
                        f"(limit {MAX_HEADER_BYTES}); the file is truncated or corrupt")
        raw = f.read(n)
    return parse_header(raw, size - 8 - n, path)


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Validate the header, then read every tensor (memory-mapped by ``safetensors``)."""
    entries, _ = read_header(path)
    for e in entries.values():
        if e.torch_dtype is None:
            raise _fail(path, f"tensor {e.name!r} has dtype {e.dtype}, which this torch version cannot hold")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # the header passed; anything left is an I/O or library error
        raise _fail(path, f"could not read tensors ({type(e).__name__}: {e})") from e
