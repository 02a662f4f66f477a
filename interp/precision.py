"""Whether half-precision matrix products are fast on this machine: measured once per process.

torch runs bfloat16 and float16 matrix products on CPU through kernels that need native units (AVX-512 BF16,
AVX-512 FP16 or AMX); without them it falls back to a loop that is one to two orders of magnitude slower than
float32. On a 2-core AMD EPYC with AVX2 only (torch 2.13), a ``[1,024 x 576] @ [576 x 9,216]`` product (one
SAE encoder step at batch 1,024) took 10.9 s in bfloat16 and 83 ms in float32, under autocast as well; the
``[128 x 128]`` product of :func:`matmul_slowdown` took 1.4 ms in bfloat16, 1.2 in float16 and 0.075 in float32.
A bf16 SAE training run, MP-SAE pursuit or model forward there is no less correct, but it runs ~100x slower
with no error. :func:`warn_if_slow` says so, once per use and process, before the work starts.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time
import warnings

import torch

from interp.deprecation import _is_wrapper

PROBE_N = 128
"""Side of the square product timed by :func:`matmul_slowdown` (a few ms even on the slow path)."""
SLOW_RATIO = 4.0
"""A half-precision product this many times slower than float32's is the slow path (measured: 18x at
:data:`PROBE_N` on AVX2; native units run it at or below float32's time)."""


class SlowPrecisionWarning(UserWarning):
    """Half precision requested where its matrix products are far slower than float32's."""


_warned: set[tuple[str, torch.dtype, str]] = set()
_LIBRARY = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), p) + os.sep
                 for p in ("interp", "saes", "probes"))


_FRAMEWORKS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (torch,))


def outside_stacklevel(frame, *, through_torch: bool = False) -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made in ``frame`` that points at the first frame outside this
    library's packages and a runtime type checker's wrappers: the user's line. With `through_torch` (a
    warning from a module hook) torch's frames and the model's own ``forward`` code are passed over too."""
    level = 1
    while frame is not None and (frame.f_code.co_filename.startswith(_LIBRARY)
                                 or _is_wrapper(frame.f_code.co_filename)
                                 or (through_torch and (frame.f_code.co_filename.startswith(_FRAMEWORKS)
                                                        or "transformers" + os.sep in frame.f_code.co_filename))):
        frame, level = frame.f_back, level + 1
    return level


@functools.cache
def matmul_slowdown(device_type: str, dtype: torch.dtype) -> float:
    """Time of a ``dtype`` ``[n x n] @ [n x n]`` product over the float32 one's (n = :data:`PROBE_N`; median of
    3 calls each after a warm-up call), on CPU. On CUDA: 1.0 where the GPU has native ``dtype`` units (bfloat16:
    ``torch.cuda.is_bf16_supported(including_emulation=False)``), else ``inf``. 1.0 on other devices (not
    measured) and for float32/float64."""
    if dtype not in (torch.bfloat16, torch.float16):
        return 1.0
    if device_type == "cuda":
        if dtype == torch.bfloat16 and torch.cuda.is_available():
            try:
                return 1.0 if torch.cuda.is_bf16_supported(including_emulation=False) else float("inf")
            except TypeError:  # a torch without the keyword
                return 1.0 if torch.cuda.is_bf16_supported() else float("inf")
        return 1.0
    if device_type != "cpu":
        return 1.0
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(PROBE_N, PROBE_N, generator=g), torch.randn(PROBE_N, PROBE_N, generator=g)

    def timed(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast("cpu", enabled=False):
            x @ y
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                x @ y
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return timed(a.to(dtype), b.to(dtype)) / max(timed(a, b), 1e-9)


def _slow(device: str | torch.device, dtype: torch.dtype) -> str | None:
    """Why ``dtype`` matrix products take the slow path on ``device`` (:func:`matmul_slowdown` at or above
    :data:`SLOW_RATIO`), as a clause for a message; None where they do not."""
    kind = torch.device(device).type
    ratio = matmul_slowdown(kind, dtype)
    if ratio < SLOW_RATIO:
        return None
    name = str(dtype).removeprefix("torch.")
    if kind != "cpu":
        return f"this {kind} device has no native {name} units"
    return (f"a {name} matrix product measured {ratio:.0f}x float32's time on this CPU (CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}: no native {name} units)")


def warn_if_slow(device: str | torch.device, what: str, remedy: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``dtype`` matrix products run on the slow path on ``device`` (see :func:`matmul_slowdown`); when
    they do, a :class:`SlowPrecisionWarning` naming ``what`` was asked for, the measured slowdown and ``remedy``,
    once per process for each (device, dtype, ``what``), pointing at the first line outside this library."""
    why = _slow(device, dtype)
    if why is None:
        return False
    key = (torch.device(device).type, dtype, what)
    if key not in _warned:
        _warned.add(key)
        name = str(dtype).removeprefix("torch.")
        warnings.warn(f"{what} runs in {name}, but {why}; expected a CPU with AVX-512 BF16/FP16 or AMX, or a "
                      f"recent GPU, so this will run one to two orders of magnitude slower than float32: {remedy}",
                      SlowPrecisionWarning, stacklevel=outside_stacklevel(sys._getframe()))
    return True


def skip_reason(device: str | torch.device, what: str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """For benchmarks: why ``what`` (rows in ``dtype``) is left out on ``device``, or None when it runs. Where
    ``dtype`` products take the slow path a row would time torch's fallback loop, not a library, for hours at
    real sizes."""
    why = _slow(device, dtype)
    if why is None:
        return None
    return (f"{what} left out: {why}, so each round would time torch's fallback loop for hours; run them on a "
            "machine with native units")
