"""Host-device synchronisation in the training step: which paths avoid it, and a counter of the ops that cause it.

On a GPU the host queues kernels and runs ahead of the device. An op whose result the host must read (a value
as a Python number, the length of a boolean mask's selection, a bin count's size) stalls the host until the
device has caught up, and the device then waits while the host queues the next kernels: in a step made of many
small kernels, each such op costs about the time to queue what follows it. Off the CPU (:func:`sync_free`) the
trainer's TopK step reads nothing back: fired latents by a scatter, the dead-latent counters by ``masked_fill``,
AuxK's dead latents by a masked top-k over every column, the sparse products' row counts by a scatter-add, and
the non-finite guard's flag checked every :data:`saes.guard.DEFERRED_STEPS` steps (:mod:`saes.guard`).

:class:`SyncOps` counts, on any device, the ops that synchronise on CUDA by what they return: so a CPU run (with
:func:`force_sync_free` to take the GPU's paths) shows how many a step makes. It sees the ops called from
Python and from autograd, not the ones a CUDA kernel's own host code calls (``embedding_bag``'s CUDA backward
counts its segments on the host, for one): a profile on the GPU counts those (``benchmarks/sae_step_phases.py
--profile-steps``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_forced: list[bool] = []

READS_BACK = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "masked_select",
                        "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount",
                        "repeat_interleave"})
"""ATen ops whose CUDA kernels hand the host a value or an output size: a Python number, the positions of nonzero
entries, a count of bins, a repeat count (``repeat_interleave`` without ``output_size``)."""
MASK_INDEXED = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
"""Ops that read back only when indexed by a boolean mask (it becomes the positions of its nonzero entries)."""
COPIES = frozenset({"_to_copy", "copy_"})
"""Ops that read back when they copy a device's tensor into CPU memory."""


def sync_free(device: torch.device | str) -> bool:
    """Whether the trainer's step takes its paths that read nothing back to the host: on any device but the CPU
    (where reading back costs nothing and the exact CPU paths are faster), or inside :func:`force_sync_free`."""
    return torch.device(device).type != "cpu" or bool(_forced)


@contextlib.contextmanager
def force_sync_free() -> Iterator[None]:
    """Take the GPU's sync-free paths on the CPU too (tests compare them with the CPU's; benchmarks count their
    ops with :class:`SyncOps`)."""
    _forced.append(True)
    try:
        yield
    finally:
        _forced.pop()


def _to_host(name: str, args: tuple, kwargs: dict) -> bool:
    if name == "copy_":
        return len(args) > 1 and args[0].device.type == "cpu" and args[1].device.type != "cpu"
    dest = kwargs.get("device")
    return args[0].device.type != "cpu" and dest is not None and torch.device(dest).type == "cpu"


def _mask_indexed(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in (indices or ()))


class SyncOps(TorchDispatchMode):
    """``with SyncOps() as ops: ...``; then ``ops.counts`` (a :class:`collections.Counter` of op names) and
    ``ops.total``: the ops run inside that read a value back to the host on CUDA (:data:`READS_BACK`, and
    :data:`MASK_INDEXED` with a boolean mask), on whatever device they ran, and the copies from a device into CPU
    memory (:data:`COPIES`, counted as ``to_host``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        name, kwargs = func.overloadpacket.__name__, kwargs or {}
        if name in READS_BACK or (name in MASK_INDEXED and _mask_indexed(args)):
            self.counts[name] += 1
        elif name in COPIES and _to_host(name, args, kwargs):
            self.counts["to_host"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        """How many such ops ran."""
        return sum(self.counts.values())
