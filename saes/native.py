"""Compiled CPU kernels of the TopK training step, built from ``native.c`` at first use.

* :func:`topk`: each row's ``k`` largest positions, in three steps per row (block maxima, a lower bound within
  2^-7 of their k-th largest, the largest among the few entries above it; on AVX-512 the candidates listed by
  vector compress), with none of torch's per-element work: what :func:`saes.kernels.topk_indices` takes on CPU.
* :func:`unit_row_adam`: the decoder's update in one pass over its rows (remove the gradient's component along
  each row, torch's Adam step, renormalise the row) in place of three passes of torch ops: see
  :func:`saes.optim.unit_rows_applies`.
* :func:`scatter_rows`: the sparse backwards' weight gradients ``S^T dense`` by a counting sort and one pass
  writing the product: what :func:`saes.kernels.scatter_rows` takes on CPU.
* :func:`gather_dot`: the decoder backward's gradient of the code values, ``<g[b], W[idx[b, j]]>`` for every entry,
  in place of torch's ``sampled_addmm`` (:class:`saes.kernels.BagSum`).
* :func:`sparse_fvu`: the sparse decode, its error against the input, the squared error, and the error's dot product
  with each entry's decoder row, the rows read once (:class:`saes.kernels.SparseFVU`, in place of the decode,
  the loss's elementwise ops and :func:`gather_dot` in the backward).
* :func:`sparse_adam`: Adam's step of a weight whose gradient was kept sparse (:mod:`saes.sparse_grads`): each row's
  gradient made from its latent's entries, stepped (and for a decoder projected and renormalised) in one pass,
  with no dense gradient written or read.

Figures: ``experiments/README.md``, SAE training run 15 (each kernel against the torch path it replaces, and the
whole step with and without them: ``benchmarks/sae_step_phases.py --step-kernels native torch``), run 18
(:func:`sparse_adam` and :func:`sparse_fvu` inside the step) and run 19 (the top-k's selection and the sparse sums).

The source is plain C (no Python or torch headers): it builds in under a second with the system's C compiler
(``$CC``, else Python's own, else ``cc``, ``gcc`` or ``clang``) for this CPU (``-march=native``) and is kept in
``$INTERP_NATIVE_DIR`` (default ``~/.cache/interp/native``) under a name hashed from the source, the compiler,
its flags and the CPU, written atomically. Built with OpenMP (:data:`FLAG_SETS`: the first set that builds and
loads), each kernel splits its rows over ``torch.get_num_threads()`` threads of torch's own OpenMP runtime (the
loader resolves ``libgomp.so.1`` to the copy torch loaded): a pool of Python threads in its place ran the top-k
at 5.1 ms a step against 3.1 inside the trainer, its threads competing with torch's waiting ones for the cores.
Without OpenMP, :func:`_rows` splits the rows over Python threads (ctypes lets go of the GIL during a call) for the
top-k and the decoder's update; the sparse backward keeps torch's CSR products there (:func:`sparse_applies`).

Without a compiler, where the build fails, or with ``INTERP_NATIVE=0``, :func:`library` is None and the
trainer takes its torch paths (the same values to float rounding; the tests compare both); :func:`status`
says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("native.c")
VERSION = 8
"""``native_version()`` of the source this module speaks to."""
FLAGS = ("-O3", "-fno-math-errno", "-fPIC", "-shared")

_lock = threading.Lock()
_state: dict[str, object] = {}
_pool: tuple[int, ThreadPoolExecutor] | None = None
"""The process id the pool was made in, and the pool (a forked child makes its own: the threads stay behind)."""


def _compiler() -> str | None:
    names = [os.environ.get("CC", ""), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc", "clang"]
    for name in names:
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _cpu() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    """Where built kernels are kept: ``$INTERP_NATIVE_DIR``, else ``interp/native`` in the user's cache folder."""
    if os.environ.get("INTERP_NATIVE_DIR"):
        return Path(os.environ["INTERP_NATIVE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "interp" / "native"


FLAG_SETS = (("-fopenmp", "-march=native"), ("-fopenmp",), ("-fopenmp-simd", "-march=native"), ("-fopenmp-simd",))
"""Tried in this order until one builds and loads: OpenMP (torch's own runtime) and this CPU's instructions first."""


def _build_and_load(cc: str) -> tuple[ctypes.CDLL, Path]:
    """The library built (now, unless a build for this source, compiler, flags and CPU is kept) and loaded."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    fixed = [SOURCE.read_bytes(), cc.encode(), version.encode(), platform.machine().encode(), _cpu().encode()]
    last = None
    for extra in FLAG_SETS:
        flags = (*FLAGS, *extra)
        key = hashlib.sha256(b"\0".join([*fixed, " ".join(flags).encode()])).hexdigest()[:20]
        out = cache_dir() / f"saes-native-{key}{'.dll' if sys.platform == 'win32' else '.so'}"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-", suffix=out.suffix)
            os.close(fd)
            try:
                run = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                                     timeout=300)
                if run.returncode != 0:
                    last = (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[0]
                    continue
                os.replace(tmp, out)  # atomic: a concurrent build writes the same bytes
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        try:
            return _load(out), out
        except (OSError, AttributeError, RuntimeError) as e:  # e.g. an OpenMP runtime that lacks a symbol
            last = f"{out.name} did not load: {e}"
    raise RuntimeError(f"{cc} could not build {SOURCE.name}: {last}")


class _Source(ctypes.Structure):
    """``grad_source`` of ``native.c``."""

    _fields_ = [("starts", ctypes.c_void_p), ("order", ctypes.c_void_p), ("vals", ctypes.c_void_p),
                ("k", ctypes.c_int64), ("dense", ctypes.c_void_p), ("ld", ctypes.c_int64)]


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.native_version.restype = ctypes.c_int
    lib.native_openmp.restype = ctypes.c_int
    lib.native_set_threads.argtypes = [ctypes.c_int]
    lib.native_set_threads.restype = None
    lib.native_min_rows_per_thread.restype = ctypes.c_int
    if lib.native_version() != VERSION:
        raise RuntimeError(f"{path.name} speaks version {lib.native_version()}, this module {VERSION}")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.topk_rows.argtypes = [i64, i64, ptr, i64, i64, i64, ptr, ptr]
    lib.topk_rows.restype = ctypes.c_int
    lib.unit_row_adam.argtypes = [i64, i64, ptr, ptr, ptr, ptr, i64, *[ctypes.c_double] * 5, ctypes.c_int]
    lib.unit_row_adam.restype = None
    lib.sort_by_latent.argtypes = [ptr, i64, i64, ptr, ptr]
    lib.sort_by_latent.restype = ctypes.c_int
    lib.scatter_rows.argtypes = [i64, i64, ptr, ptr, ptr, i64, ptr, i64, i64, ptr]
    lib.scatter_rows.restype = None
    lib.gather_dot.argtypes = [i64, i64, ptr, i64, ptr, i64, ptr, i64, i64, i64, ptr]
    lib.gather_dot.restype = ctypes.c_int
    lib.native_sparse_chunk.restype = ctypes.c_int
    lib.sparse_fvu.argtypes = [i64, i64, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr]
    lib.sparse_fvu.restype = ctypes.c_int
    lib.sparse_adam.argtypes = [i64, ctypes.POINTER(_Source), ctypes.c_int, ptr, i64, ptr, ptr, ptr, i64,
                                *[ctypes.c_double] * 5, ctypes.c_int, ctypes.c_int, ptr, ptr, ctypes.c_int]
    lib.sparse_adam.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The built kernels, or None (no compiler, a failed build, or ``INTERP_NATIVE=0``: see :func:`status`).
    Built or found once per process; a failed build warns once."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib, why = None, ""
        if os.environ.get("INTERP_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            why = "turned off by INTERP_NATIVE"
        elif (cc := _compiler()) is None:
            why = "no C compiler found (set CC to one)"
        else:
            try:
                lib, path = _build_and_load(cc)
                why = f"built with {cc}{' and OpenMP' if lib.native_openmp() else ''}: {path}"
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                why = f"build failed: {e}"
                warnings.warn(f"the compiled SAE training kernels are not available ({why}); training takes the "
                              "slower torch paths (the same values to float rounding)", stacklevel=3)
        _state["lib"], _state["why"] = lib, why
        return lib


def status() -> str:
    """Whether the compiled kernels are in use, and why (where the library came from, or why not)."""
    library()
    return str(_state["why"])


def reset() -> None:
    """Forget the loaded library, so that the next :func:`library` call looks again (tests use it)."""
    with _lock:
        _state.clear()


def _rows(fn, rows: int, *args) -> list:
    """``fn(r0, r1, *args)`` over ``[0, rows)``: in one call where the library has OpenMP (the kernel splits the
    rows itself over ``torch.get_num_threads()`` threads), else split into that many ranges (fewer where a range
    would hold under ``native.c``'s ``MIN_ROWS_PER_THREAD`` rows) on Python threads, the first in this thread."""
    global _pool
    lib = library()
    if lib is not None and lib.native_openmp():  # the kernel splits its rows over OpenMP threads itself
        lib.native_set_threads(torch.get_num_threads())
        return [fn(0, rows, *args)]
    n = max(1, min(torch.get_num_threads(), rows // max(1, lib.native_min_rows_per_thread())))
    bounds = [rows * i // n for i in range(n + 1)]
    if n == 1:
        return [fn(0, rows, *args)]
    with _lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1]._max_workers < n - 1:
            _pool = (os.getpid(), ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="saes-native"))
        pool = _pool[1]
    futures = [pool.submit(fn, bounds[i], bounds[i + 1], *args) for i in range(1, n)]
    first = fn(bounds[0], bounds[1], *args)
    return [first, *(f.result() for f in futures)]


def topk_applies(pre: Tensor, k: int) -> bool:
    """Whether :func:`topk` takes ``pre``: float32 on CPU, 2-D with unit column stride, a nonempty batch,
    ``1 <= k <= d_sae``, and the kernels built."""
    return (pre.device.type == "cpu" and pre.dtype == torch.float32 and pre.dim() == 2 and pre.shape[0] > 0
            and 1 <= k <= pre.shape[1] and (pre.stride(1) == 1 or pre.shape[1] == 1) and not pre.requires_grad
            and library() is not None)


def topk(pre: Tensor, k: int, values: bool = False):
    """The positions ``[batch, k]`` (int64) of each row's ``k`` largest entries, in no particular order: the
    same values as ``pre.topk(k).indices`` picks (NaN counts as the largest, as there; where entries tie at the
    k-th value, possibly other positions of it); with ``values``, ``(positions, pre.gather(1, positions))``, the
    values read while each row is in the cache. Only where :func:`topk_applies`."""
    if not topk_applies(pre, k):
        raise ValueError(f"native top-k takes a float32 CPU [batch, d] tensor with unit column stride and 1 <= k <= d "
                         f"(got {pre.dtype} on {pre.device}, shape {tuple(pre.shape)}, k={k}); use torch.topk")
    b, d = pre.shape
    out = torch.empty(b, k, dtype=torch.long)
    vals = torch.empty(b, k, dtype=torch.float32) if values else None
    lib = library()
    codes = _rows(lib.topk_rows, b, pre.data_ptr(), d, pre.stride(0), k, out.data_ptr(),
                  vals.data_ptr() if values else None)
    if any(codes):
        raise MemoryError(f"native top-k could not allocate its scratch rows ({d} entries)")
    return (out, vals) if values else out


def unit_row_adam(W: Tensor, G: Tensor, M: Tensor, V: Tensor, *, lr: float, betas: tuple[float, float],
                  eps: float, step: float, unit: bool) -> None:
    """In place on ``W``, ``M``, ``V`` (contiguous float32 CPU tensors of one 2-D shape, as ``G``): remove each
    gradient row's component along its row of ``W`` (``<w, w>`` taken as 1 where ``unit``), take torch's Adam step
    number ``step`` (no weight decay, no amsgrad), and scale each row of ``W`` to unit norm. ``G`` is not written."""
    ts = (W, G, M, V)
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and t.shape == W.shape
               for t in ts) or W.dim() != 2 or library() is None:
        raise ValueError("unit_row_adam takes four contiguous float32 CPU tensors of one 2-D shape, got "
                         + ", ".join(f"{t.dtype}/{t.device}/{tuple(t.shape)}" for t in ts))
    _rows(library().unit_row_adam, W.shape[0], W.data_ptr(), G.data_ptr(), M.data_ptr(), V.data_ptr(), W.shape[1],
          float(lr), float(betas[0]), float(betas[1]), float(eps), float(step), int(unit))
    written(W, M, V)


def written(*tensors: Tensor) -> None:
    """Count a write through a raw pointer as torch counts its own in-place ops: each tensor's version goes up, so
    whatever is keyed on it (autograd's saved-tensor check, an MP-SAE's cached Gram matrix) sees the change."""
    for t in tensors:
        torch.autograd.graph.increment_version(t)


def sparse_applies(idx: Tensor, *dense: Tensor) -> bool:
    """Whether :func:`scatter_rows` takes these tensors: ``idx`` a contiguous int64 CPU
    ``[batch, k]`` tensor, each of ``dense`` float32 on CPU, 2-D with unit column stride, and the kernels built
    with OpenMP. On Python threads (a build without OpenMP) it lost to the CSR products inside the trainer's
    step (backward 13.3 against 10.7 ms at batch 1,024; ``experiments/README.md``, SAE training run 15)."""
    lib = library()
    return (idx.device.type == "cpu" and idx.dtype == torch.long and idx.dim() == 2 and idx.is_contiguous()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2
                    and (t.stride(1) == 1 or t.shape[1] <= 1) for t in dense)
            and lib is not None and bool(lib.native_openmp()))


def scatter_rows(idx: Tensor, vals: Tensor, dense: Tensor, d_sae: int) -> Tensor:
    """``out[l] = sum of vals[b, j] * dense[b] over the (b, j) with idx[b, j] = l``, ``[d_sae, m]`` (zero rows for
    latents with no entry): the product ``S^T dense`` with ``S`` the sparse ``[batch, d_sae]`` matrix of ``vals`` at
    ``idx``, each latent's terms summed in batch order. Only where :func:`sparse_applies` (``vals`` contiguous,
    ``[batch, k]``); raises ValueError on an index outside ``[0, d_sae)``."""
    b, k = idx.shape
    vals = vals.contiguous()
    if not sparse_applies(idx, vals, dense) or vals.shape != idx.shape or dense.shape[0] != b:
        raise ValueError(f"scatter_rows takes int64 idx [b, k], float32 vals [b, k] and dense [b, m] on CPU, built "
                         f"with OpenMP ({status()}; got "
                         f"{idx.dtype} {tuple(idx.shape)}, {vals.dtype} {tuple(vals.shape)}, {dense.dtype} "
                         f"{tuple(dense.shape)})")
    return scatter_sorted(*sort_by_latent(idx, d_sae, "scatter_rows"), vals, dense)


def scatter_sorted(starts: Tensor, order: Tensor, vals: Tensor, dense: Tensor) -> Tensor:
    """:func:`scatter_rows` from its sort (:func:`sort_by_latent`'s ``starts`` and ``order`` of the index; ``vals``
    contiguous ``[batch, k]``): ``[len(starts) - 1, m]``."""
    rows, m = starts.numel() - 1, dense.shape[1]
    out = torch.empty(rows, m, dtype=torch.float32)
    _rows(library().scatter_rows, rows, starts.data_ptr(), order.data_ptr(), vals.data_ptr(), vals.shape[1],
          dense.data_ptr(), dense.stride(0), m, out.data_ptr())
    return out


def sort_by_latent(idx: Tensor, d_sae: int, who: str = "sort_by_latent") -> tuple[Tensor, Tensor]:
    """``(starts, order)``: the entries of ``idx`` (a contiguous int64 CPU tensor) by latent, a counting sort:
    ``order[starts[l]:starts[l + 1]]`` are the flat positions of latent ``l``'s entries, ascending. Raises
    ValueError on an index outside ``[0, d_sae)`` (naming ``who``)."""
    n = idx.numel()
    starts = torch.empty(d_sae + 1, dtype=torch.long)
    order = torch.empty(n, dtype=torch.long)
    code = library().sort_by_latent(idx.data_ptr(), n, d_sae, starts.data_ptr(), order.data_ptr())
    if code:
        raise (ValueError(f"{who}: an index outside [0, {d_sae}) (got {int(idx.min())}..{int(idx.max())})")
               if code == -1 else MemoryError(f"{who} could not allocate its sort"))
    return starts, order


def sparse_adam(W: Tensor, M: Tensor, V: Tensor, sources: list[tuple[Tensor, Tensor, Tensor, Tensor]],
                G: Tensor | None = None, *, lr: float, betas: tuple[float, float], eps: float, step: float,
                decoder: bool, unit: bool = False, wb: Tensor | None = None, dry: bool = False):
    """Adam's step number ``step`` (torch's, no weight decay, no amsgrad) in place on ``W``, ``M``, ``V``
    (contiguous float32 CPU ``[rows, cols]``), with the gradient made row by row, never written whole: row ``l``'s
    is ``G[l]`` (zero where ``G`` is None) plus, for each source ``(starts, order, vals, dense)``
    (:func:`sort_by_latent` of a ``[batch, k]`` index; ``vals`` ``[batch, k]`` and ``dense`` ``[batch, cols]``
    float32, unit column stride),
    the sum over latent ``l``'s entries ``i`` of ``vals[i] * dense[i // k]`` in ``order``'s order: the row
    :func:`scatter_rows` writes. Each source's sum is made first and then added, as autograd adds the gradients
    of several uses of one weight. ``decoder``: the gradient's component along each row is removed first (``<w, w>``
    taken as 1 where ``unit``) and the row renormalised after, as :func:`unit_row_adam`.

    With ``wb`` (``[rows]`` float32) returns ``sum_l wb[l] * W[l]`` over the rows before the step (``[cols]``;
    summed in chunks of ``native_sparse_chunk()`` rows, then over the chunks in order: the same on any number of
    threads), else None. Only where :func:`sparse_applies`.

    ``dry``: nothing is written; returns ``(finite, term)``: whether every entry of the gradient is finite (made as
    the step would make it), and the ``wb`` sum (or None) as the step would return it, bit for bit."""
    rows, cols = W.shape if W.dim() == 2 else (0, 0)
    mats = (W, M, V) + ((G,) if G is not None else ())
    dense = [d for _, _, _, d in sources]
    vals = [v for _, _, v, _ in sources]
    lib = library()
    ok = (W.dim() == 2 and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                               and t.shape == W.shape for t in mats)
          and all(d.device.type == v.device.type == "cpu" and d.dtype == v.dtype == torch.float32 and d.dim() == 2
                  and d.shape[1] == cols and (d.stride(1) == 1 or cols <= 1) and v.dim() == 2
                  and v.shape[0] == d.shape[0] and v.is_contiguous() for d, v in zip(dense, vals))
          and all(s.dtype == o.dtype == torch.long and s.is_contiguous() and o.is_contiguous()
                  and s.numel() == rows + 1 and o.numel() == v.numel() for s, o, v, _ in sources)
          and (wb is None or (wb.dtype == torch.float32 and wb.is_contiguous() and wb.shape == (rows,)))
          and lib is not None and bool(lib.native_openmp()))
    if not ok:
        raise ValueError("sparse_adam takes contiguous float32 CPU W, M, V (and G) of one [rows, cols] shape, sources "
                         "of (starts, order, vals [batch, k], dense [batch, cols]) float32 with int64 sorts, and a "
                         f"build with OpenMP ({status()}; got W {W.dtype}/{W.device}/{tuple(W.shape)}, "
                         f"{len(sources)} source(s))")
    structs = (_Source * max(1, len(sources)))()
    for q, (starts, order, v, d) in enumerate(sources):
        structs[q] = _Source(starts.data_ptr(), order.data_ptr(), v.data_ptr(), v.shape[1], d.data_ptr(), d.stride(0))
    lib.native_set_threads(torch.get_num_threads())
    partial = None
    if wb is not None:
        partial = torch.zeros(-(-rows // lib.native_sparse_chunk()), cols, dtype=torch.float32)
    code = lib.sparse_adam(rows, structs, len(sources), G.data_ptr() if G is not None else None, cols, W.data_ptr(),
                           M.data_ptr(), V.data_ptr(), cols, float(lr), float(betas[0]), float(betas[1]), float(eps),
                           float(step), int(decoder), int(unit), wb.data_ptr() if wb is not None else None,
                           partial.data_ptr() if partial is not None else None, int(dry))
    if code & 2:
        raise MemoryError(f"sparse_adam could not allocate its scratch rows ({cols} floats)")
    if not dry:
        written(W, M, V)
    term = partial.sum(0) if partial is not None else None
    return (not code & 1, term) if dry else term


def gather_dot(idx: Tensor, g: Tensor, W: Tensor) -> Tensor:
    """``out[b, j] = <g[b], W[idx[b, j]]>``, ``[batch, k]`` float32: the sampled product ``(g W^T)[b, idx[b, j]]`` of
    the decoder's backward, each dot product summed in this kernel's vector order (equal to ``sampled_addmm``'s to
    float rounding). Only where :func:`sparse_applies` (``idx`` ``[batch, k]``, ``g`` ``[batch, m]``, ``W``
    ``[n, m]``); raises ValueError on an index outside ``[0, n)``."""
    if not sparse_applies(idx, g, W) or g.shape[0] != idx.shape[0] or g.shape[1] != W.shape[1]:
        raise ValueError(f"gather_dot takes int64 idx [b, k], float32 g [b, m] and W [n, m] on CPU, built with OpenMP "
                         f"({status()}; got {idx.dtype} {tuple(idx.shape)}, {g.dtype} {tuple(g.shape)}, {W.dtype} "
                         f"{tuple(W.shape)})")
    b, k = idx.shape
    out = torch.empty(b, k, dtype=torch.float32)
    codes = _rows(library().gather_dot, b, idx.data_ptr(), k, g.data_ptr(), g.stride(0), W.data_ptr(), W.stride(0),
                  W.shape[0], W.shape[1], out.data_ptr())
    if any(codes):
        raise ValueError(f"gather_dot: an index outside [0, {W.shape[0]}) (got {int(idx.min())}..{int(idx.max())})")
    return out


def sparse_fvu(idx: Tensor, vals: Tensor, W: Tensor, bias: Tensor | None, x: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_hat, e, sse, dots)`` for a batch: ``x_hat[b] = sum_j vals[b, j] * W[idx[b, j]] + bias``, ``e = x_hat - x``,
    ``sse[b] = ||e[b]||^2`` and ``dots[b, j] = <e[b], W[idx[b, j]]>`` (float32; each row's decoder rows read once, the
    dot products while they are in the cache). Only where :func:`sparse_applies` (``idx`` ``[batch, k]``, ``vals``
    ``[batch, k]`` contiguous, ``W`` ``[n, m]``, ``x`` ``[batch, m]``, ``bias`` ``[m]`` contiguous); raises
    ValueError on an index outside ``[0, n)``."""
    b, k = idx.shape
    ok = (sparse_applies(idx, vals, W, x) and vals.shape == idx.shape and vals.is_contiguous()
          and x.shape == (b, W.shape[1]) and (bias is None or (bias.shape == (W.shape[1],) and bias.is_contiguous()
                                                               and bias.dtype == torch.float32
                                                               and bias.device.type == "cpu")))
    if not ok:
        raise ValueError(f"sparse_fvu takes int64 idx [b, k], float32 vals [b, k], W [n, m], x [b, m] and bias [m] on "
                         f"CPU, built with OpenMP ({status()}; got {idx.dtype} {tuple(idx.shape)}, {vals.dtype} "
                         f"{tuple(vals.shape)}, {W.dtype} {tuple(W.shape)}, {x.dtype} {tuple(x.shape)})")
    m = W.shape[1]
    x_hat, e = torch.empty(b, m), torch.empty(b, m)
    sse, dots = torch.empty(b), torch.empty(b, k)
    codes = _rows(library().sparse_fvu, b, idx.data_ptr(), k, vals.data_ptr(), W.data_ptr(), W.stride(0), W.shape[0],
                  bias.data_ptr() if bias is not None else None, x.data_ptr(), x.stride(0), m, x_hat.data_ptr(),
                  e.data_ptr(), sse.data_ptr(), dots.data_ptr())
    if any(codes):
        raise ValueError(f"sparse_fvu: an index outside [0, {W.shape[0]}) (got {int(idx.min())}..{int(idx.max())})")
    return x_hat, e, sse, dots
