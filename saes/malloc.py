"""Freed memory kept for the next step while SAEs train on CPU (glibc's malloc).

Each training step frees tensors the size of the SAE's weights (gradients, the sparse backward's
products, the decoder's norm terms) and allocates them again in the next step. glibc serves an
allocation over its mmap threshold (128 KiB, raised as large blocks are freed up to at most 32 MiB on
64-bit) from a fresh mapping and unmaps it when freed, so every step pays a page fault for every 4 KiB
page of those tensors. A 36,864-latent, 576-wide SAE has 85 MB weights: on a 2-core CPU at batch 1,024
a step took 0.535 s, 0.421 s with freed blocks kept (median step of the trainer on cached activations,
before the encoder matmul moved to oneDNN; ``experiments/README.md``, SAE training run 6).

Inside :func:`reuse_freed_memory` allocations up to 1 GiB come from the heap and freed heap memory is
not handed back, so a step reuses the previous step's pages. On leaving, the thresholds are set to the
values glibc's own rule reaches in a process that frees large tensors (mmap 32 MiB, trim 64 MiB) and
``malloc_trim(0)`` hands the freed memory back to the system: the process's memory after training is
what it would have been without this. Nothing is changed where the C library is not glibc, or where
the user tunes malloc already (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or
``GLIBC_TUNABLES`` naming malloc): their settings stay as they are. One case it cannot help: a thread that
glibc has moved off the main arena (after lock contention with other threads; seen in a long test
run, not in a training script) gets a fresh mapping for every block over 64 MiB whatever the
thresholds, so there the step runs as it would without this.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
HOLD_MMAP = 1 << 30
"""While training: allocations up to this size are served from the heap."""
HOLD_TRIM = 2**31 - 1
"""While training: freed heap memory is kept up to this much (the largest value ``mallopt`` takes)."""
AFTER_MMAP = 32 << 20
"""After training: glibc's ceiling for its dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)."""
AFTER_TRIM = 2 * AFTER_MMAP
"""After training: the trim threshold glibc's dynamic rule pairs with :data:`AFTER_MMAP`."""
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()
_depth = 0


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc and the user has not tuned its malloc; else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(k in os.environ for k in USER_SETTINGS) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Keep freed large blocks for reuse while the block runs (see the module docstring); yields whether
    it did. Nested and concurrent uses share one setting, restored when the last one ends."""
    global _depth
    libc = glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(M_MMAP_THRESHOLD, HOLD_MMAP)
            libc.mallopt(M_TRIM_THRESHOLD, HOLD_TRIM)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP)
                libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM)
                libc.malloc_trim(0)
