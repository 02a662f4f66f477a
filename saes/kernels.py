"""Sparse TopK training kernels: nothing of size ``[batch, d_sae]`` is kept for backward.

The only dense ``[batch, d_sae]`` tensor in a TopK training step is the encoder's pre-activation
matrix, computed once without autograd. The latents that matter (the top ``k``, and the top
``k_aux`` dead ones for AuxK) are picked from it, and :class:`GatherPre` re-expresses their values
as a differentiable function of ``W_enc``, ``b_enc`` and ``b_dec`` whose backward only touches
the selected entries:

* ``grad b_enc = index_add(g)``; ``grad b_dec = -W_enc @ grad b_enc`` (when the input is centred);
* ``grad W_enc = (x - b_dec)^T S`` with ``S`` the sparse ``[batch, d_sae]`` matrix of ``g``,
  computed as a sparse-dense product (:func:`scatter_rows`: ``batch * k * d_model`` multiply-adds, not
  ``batch * d_sae * d_model``).

Where the step hands them a :class:`saes.sparse_grads.SparseGrads`, both backwards leave the weight gradients there
(the entries, sorted by latent) instead of writing them, for the optimizer to make row by row as it steps.

Decoding is ``embedding_bag(idx, W_dec, per_sample_weights=vals)``, a gather-sum (:func:`bag_sum`: on CPU
in float32 its backward is :func:`scatter_rows` for ``W_dec`` and a sampled product for the values). The top
``k`` come from :func:`topk_indices`, exact. On CPU in float32 the top-k and the sparse products are compiled
kernels (:mod:`saes.native`) where a C compiler is at hand, torch ops elsewhere.
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.nn import functional as F

from saes import hostsync, native, sparse_grads

ONEDNN_MIN_FLOPS = 1e7
"""Smaller encoder matmuls stay on ``addmm``: oneDNN's per-call setup costs more than it saves there (2-core
AMD EPYC: 0.21 x addmm's speed at 2.6e5 flops, 1.1 x at 4.2e6, 1.9-2.7 x from 1.7e8 up)."""
_onednn_failed: list[str] = []


def onednn_applies(x: Tensor, W_enc: Tensor) -> bool:
    """Whether oneDNN's linear kernel can take this encoder matmul: float32 on CPU, ``W_enc`` stored as the
    transpose of a contiguous ``[d_sae, d_model]`` block (TopK's layout: oneDNN's weight layout, no copy), torch
    built with oneDNN, not under autocast, and a product of at least :data:`ONEDNN_MIN_FLOPS`."""
    return (x.device.type == "cpu" and x.dtype == W_enc.dtype == torch.float32 and x.dim() == 2
            and W_enc.T.is_contiguous() and not _onednn_failed and torch.backends.mkldnn.is_available()
            and not torch.is_autocast_enabled("cpu") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and 2 * x.shape[0] * W_enc.shape[0] * W_enc.shape[1] >= ONEDNN_MIN_FLOPS)


def prefer_onednn() -> bool:
    """Whether this CPU's encoder matmuls go to oneDNN rather than ``addmm`` (MKL): where torch dispatches its
    AVX-512 kernels (``torch.backends.cpu.get_cpu_capability()``; the ``ATEN_CPU_CAPABILITY`` environment
    variable lowers it).

    Measured with ``benchmarks/sae_step_phases.py --encoder-kernels onednn addmm`` (the trainer's step with the
    matmul forced onto each) and ``benchmarks/sae_train.py``'s ``encoder_matmul_limit`` (each kernel alone), both
    on 2-core AMD EPYCs: with AVX-512, oneDNN ran the matmul alone at 2.5-2.7x ``addmm``'s speed (MKL does not use
    AVX-512 there); with AVX2 only, the whole step on ``addmm`` took 0.91x, 0.91x and 0.96x its time on oneDNN
    (batch 1,024 and 4,096 with 9,216 latents, 1,024 with 36,864; below 1 in all 15 rounds; ``experiments/README.md``,
    SAE training run 13)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def onednn_ok(x: Tensor, W_enc: Tensor) -> bool:
    """Whether :func:`encoder_matmul` goes through oneDNN: where it applies (:func:`onednn_applies`) on a CPU that
    prefers it (:func:`prefer_onednn`)."""
    return onednn_applies(x, W_enc) and prefer_onednn()


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """oneDNN's linear kernel on plain tensors: ``x @ weight.T + bias`` (``weight`` row-major ``[out, in]``)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def encoder_matmul(xc: Float[Tensor, "batch d_model"], W_enc: Tensor, b_enc: Tensor,
                   workspace: dict | None = None, onednn: bool | None = None) -> Float[Tensor, "batch d_sae"]:
    """``xc @ W_enc + b_enc`` without autograd.

    On CPUs with AVX-512 in float32 (see :func:`onednn_ok`) through oneDNN's linear kernel, which uses those
    vector units where torch's ``addmm`` (MKL) may not: on the 2-core AMD EPYC (AVX-512) of this project's
    benchmarks, 356-377 GFLOPS against MKL's 104-179 at batch 256-4,096 and 2,304-36,864 latents
    (``benchmarks/sae_train.py`` records both in ``encoder_matmul_limit``). The sums come in another order
    than ``addmm``'s: equal to float rounding (checked in ``tests/saes/test_kernels.py``). Elsewhere
    ``addmm``, into ``workspace["pre"]`` when a workspace is given (see :func:`pre_acts`). ``onednn=True`` takes
    oneDNN wherever it applies (:func:`onednn_applies`), ``False`` never: benchmarks time both kernels so."""
    with torch.no_grad():
        if onednn_ok(xc, W_enc) if onednn is None else (onednn and onednn_applies(xc, W_enc)):
            try:
                return _linear(xc.contiguous(), W_enc.T, b_enc)
            except RuntimeError as e:  # a build whose kernel refuses these tensors: addmm from now on
                _onednn_failed.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
                warnings.warn(f"oneDNN's linear kernel failed ({_onednn_failed[0]}); the SAE encoder uses addmm "
                              "from now on (same results, slower on CPUs where MKL lacks the widest vector units)",
                              stacklevel=3)
        if workspace is None or torch.is_autocast_enabled(xc.device.type):
            return torch.addmm(b_enc, xc, W_enc)
        shape = (xc.shape[0], W_enc.shape[1])
        buf = workspace.get("pre")
        if buf is None or buf.shape != shape or buf.dtype != W_enc.dtype or buf.device != W_enc.device:
            buf = workspace["pre"] = torch.empty(shape, dtype=W_enc.dtype, device=W_enc.device)
        return torch.addmm(b_enc, xc, W_enc, out=buf)


def centred(x: Float[Tensor, "batch d_model"], b_dec: Tensor | None) -> Float[Tensor, "batch d_model"]:
    """The encoder's input ``x - b_dec`` (``x`` itself where ``b_dec`` is None), without autograd."""
    with torch.no_grad():
        return x - b_dec if b_dec is not None else x


def pre_acts(x: Float[Tensor, "batch d_model"], W_enc: Tensor, b_enc: Tensor,
             b_dec: Tensor | None, workspace: dict | None = None) -> Float[Tensor, "batch d_sae"]:
    """Dense encoder pre-activations, without autograd (:func:`encoder_matmul` of ``x - b_dec``).

    With a ``workspace`` dict (the trainer keeps one per SAE for the run), an ``addmm`` result is written
    into a buffer kept there and reused by the next call: a fresh tensor of that size costs page faults on
    every step unless freed memory is kept (:mod:`saes.malloc`, which the trainer turns on for CPU runs).
    The buffer is overwritten by the next call with the same workspace. Not under autocast (the product
    comes out in another dtype there)."""
    return encoder_matmul(centred(x, b_dec), W_enc, b_enc, workspace)


def _sparse_t(idx: Tensor, g: Tensor, d_sae: int) -> Tensor:
    """The ``[d_sae, batch]`` sparse matrix ``S^T`` with ``S[b, idx[b, j]] = g[b, j]``, in CSR form (rows
    sorted by latent; a CSR-dense product ran 2x faster than the COO one on CPU, with no coalescing step).
    Valid by construction (the top-k indices of a row are distinct), so invariants are not checked."""
    b, k = idx.shape
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)  # entries of one latent stay in batch order: a deterministic sum
    crow = torch.zeros(d_sae + 1, dtype=torch.long, device=idx.device)
    if hostsync.sync_free(idx.device):  # bincount reads its largest entry back to the host on CUDA
        counts = torch.zeros(d_sae, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    else:
        counts = torch.bincount(flat, minlength=d_sae)
    torch.cumsum(counts, 0, out=crow[1:])
    with warnings.catch_warnings():  # torch calls its CSR support "beta" once per process
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, torch.div(order, k, rounding_mode="floor"), g.reshape(-1)[order],
                                       (d_sae, b), check_invariants=False)


def csr_matmul(st: Tensor, dense: Float[Tensor, "n m"], out: Tensor | None = None) -> Tensor:
    """``st @ dense`` for a sparse CSR ``st``. On CPU as ``addmm`` with ``beta=0`` into ``out`` (a fresh
    uninitialised tensor when None; its contents are ignored, NaN included): ``st @ dense`` there zero-fills a
    result and copies the product into it. With freed memory kept, as the trainer keeps it (9,216 latents, 576
    wide, k 32, random pre-activations; 2-core AMD EPYC with AVX2; median of 21 alternating calls, three runs):
    2.3-2.8 ms against 4.5-6.1 at batch 1,024 and 9.3-14.3 against 13.6-17.7 at 4,096, the same values bit for
    bit (``tests/saes/test_kernels.py``). ``st @ dense`` on other devices."""
    if st.device.type != "cpu":
        return st @ dense
    if out is None:
        out = torch.empty(st.shape[0], dense.shape[1], dtype=dense.dtype, device=dense.device)
    return torch.addmm(out, st, dense, beta=0, out=out)


def scatter_rows(idx: Int[Tensor, "batch k"], vals: Float[Tensor, "batch k"], dense: Float[Tensor, "batch m"],
                 d_sae: int) -> Float[Tensor, "d_sae m"]:
    """``S^T dense`` with ``S`` the sparse ``[batch, d_sae]`` matrix of ``vals`` at ``idx`` (the sparse backwards'
    weight gradients): :func:`saes.native.scatter_rows` where it applies (a counting sort by latent and one pass
    writing the product: 1.6-1.8 ms against 2.6-3.0 for the CSR product with its sort (freed memory kept,
    as in the trainer) at batch 1,024, 9,216 latents, k 32, 576 wide, on a 2-core AMD EPYC with AVX2,
    ad hoc; ``experiments/README.md``, SAE training run 15), the CSR product (:func:`csr_matmul` of
    :func:`_sparse_t`) elsewhere; each latent's terms summed in batch order in both."""
    if native.sparse_applies(idx, vals, dense):
        return native.scatter_rows(idx, vals, dense, d_sae)
    if dense.device.type == "cpu" and dense.dtype not in (torch.float32, torch.float64):
        # the CPU's CSR product has no bf16/fp16 kernel: a TopK SAE with bf16 weights could not train
        return csr_matmul(_sparse_t(idx, vals.float(), d_sae), dense.float()).to(dense.dtype)
    return csr_matmul(_sparse_t(idx, vals, d_sae), dense)


class GatherPre(torch.autograd.Function):
    """``pre[b, idx[b, j]]`` where ``pre = xc @ W_enc + b_enc`` and ``xc = x - b_dec`` (:func:`centred`: the
    encoder's own input, detached), with a sparse backward.

    ``values`` is the already computed ``pre.gather(1, idx)`` (forward does no matmul); ``b_dec`` (None where the
    input is not centred) takes the gradient through ``xc``."""

    @staticmethod
    def forward(ctx, values, idx, xc, W_enc, b_enc, b_dec, sink=None):  # noqa: D102
        ctx.save_for_backward(idx, xc, W_enc)
        ctx.sink, ctx.weight, ctx.b_dec = sink, W_enc, b_dec  # the parameters themselves, for the sink
        return values.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        idx, xc, W_enc = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        g = g.to(W_enc.dtype)
        grad_W = grad_b_enc = grad_b_dec = None
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            grad_b_enc = torch.zeros(d_sae, dtype=W_enc.dtype, device=W_enc.device)
            grad_b_enc.index_add_(0, idx.reshape(-1), g.reshape(-1))
        kept = False
        if ctx.needs_input_grad[3]:
            xc = xc.to(W_enc.dtype)
            kept = _keep(ctx, idx, g, xc, latent_dim=1)
            if not kept:
                grad_W = scatter_rows(idx, g, xc, d_sae).T
        if ctx.b_dec is not None and ctx.needs_input_grad[5]:
            if kept:  # summed with W_enc's step, in its pass over W_enc
                ctx.sink.add_bias(ctx.weight, ctx.b_dec, grad_b_enc)
            else:
                grad_b_dec = -(W_enc @ grad_b_enc)
        if not ctx.needs_input_grad[4]:
            grad_b_enc = None
        return None, None, None, grad_W, grad_b_enc, grad_b_dec, None


def _keep(ctx, idx: Tensor, vals: Tensor, dense: Tensor, latent_dim: int) -> bool:
    """Record the gradient of the weight ``ctx.weight`` in the step's :class:`saes.sparse_grads.SparseGrads`
    (``ctx.sink``) where one was given, the weight is a leaf (a parameter the optimizer holds, not a tensor made
    from one), the kernel takes these tensors, and the weight's stored rows are its latents (``latent_dim``: 1 for
    ``W_enc [d_model, d_sae]``, 0 for ``W_dec``): a ``W_enc`` loaded as a plain contiguous tensor is stored
    ``d_model``-major, and the sink would read its rows as latents (a wrong gradient when ``d_model == d_sae``, an
    error otherwise); such a weight takes the dense gradient. Returns whether it was recorded."""
    W = ctx.weight
    if ctx.sink is None or not (W.is_leaf and sparse_grads.takes(W) and native.sparse_applies(idx, vals, dense)):
        return False
    rows, latent_major = sparse_grads.rows_of(W), (W if latent_dim == 0 else W.T)
    if rows.shape != latent_major.shape or rows.stride() != latent_major.stride():
        return False
    ctx.sink.add(W, idx, vals, dense)
    return True


def gather_pre(pre: Float[Tensor, "batch d_sae"], idx: Int[Tensor, "batch k"], xc: Tensor, W_enc: Tensor,
               b_enc: Tensor, b_dec: Tensor | None, sink=None) -> Float[Tensor, "batch k"]:
    """Differentiable selected pre-activations (see :class:`GatherPre`; ``xc``: the encoder's input,
    :func:`centred`). ``sink``: a :class:`saes.sparse_grads.SparseGrads` that keeps ``W_enc``'s gradient (and
    ``b_dec``'s term from it) for the optimizer, where its kernel applies."""
    return GatherPre.apply(pre.gather(1, idx), idx, xc, W_enc, b_enc, b_dec, sink)


class BagSum(torch.autograd.Function):
    """``sum_j vals[b, j] * W[idx[b, j]]`` (``embedding_bag`` in sum mode) with a sparse backward.

    ``grad W = S^T g`` by :func:`scatter_rows` (``S`` the sparse ``[batch, d_sae]`` matrix of ``vals``) and
    ``grad vals[b, j] = <g[b], W[idx[b, j]]>`` by :func:`saes.native.gather_dot` where it applies (1.32-1.57x
    ``torch.sparse.sampled_addmm``'s speed on the pattern of ``idx``, on the layer-12 cache at batch 1,024 and 4,096
    with 9,216 and 36,864 latents, a fresh and a trained SAE; 2-core AMD EPYC with AVX-512:
    ``benchmarks/results/sae_kernels_avx512_run17.json``), by that ``sampled_addmm`` elsewhere.
    Equal to ``embedding_bag``'s gradients to float rounding (``tests/saes/test_kernels.py``); faster on CPU
    (see :func:`bag_sum_applies`)."""

    @staticmethod
    def forward(ctx, idx, vals, W, sink=None):  # noqa: D102
        ctx.save_for_backward(idx, vals, W)
        ctx.sink, ctx.weight = sink, W  # the parameter itself, for the sink
        return F.embedding_bag(idx, W, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        idx, vals, W = ctx.saved_tensors
        g = g.contiguous()
        grad_vals = grad_W = None
        if ctx.needs_input_grad[1] and native.sparse_applies(idx, g, W):
            grad_vals = native.gather_dot(idx, g, W)
        elif ctx.needs_input_grad[1]:
            b, k = idx.shape
            crow = torch.arange(0, b * k + 1, k, device=idx.device)
            with warnings.catch_warnings():  # torch calls its CSR support "beta" once per process
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), vals.new_zeros(b * k), (b, W.shape[0]),
                                                  check_invariants=False)
            grad_vals = torch.sparse.sampled_addmm(pattern, g, W.T, beta=0.0).values().view(b, k)
        if ctx.needs_input_grad[2] and not _keep(ctx, idx, vals, g, latent_dim=0):
            grad_W = scatter_rows(idx, vals, g, W.shape[0])
        return None, grad_vals, grad_W, None


def bag_sum_applies(W: Float[Tensor, "d_sae d_model"]) -> bool:
    """Whether :func:`bag_sum` takes :class:`BagSum`: float32 on CPU.

    Forward + backward against ``embedding_bag``'s with the compiled weight gradient (:func:`scatter_rows`;
    ``benchmarks/results/sae_kernels_avx2_run15.json``, the settings below): 1.42-1.62x; with the CSR products
    through :func:`csr_matmul` (``benchmarks/sae_kernels.py`` on the layer-12 cache, freed memory kept as in the
    trainer; 2-core AMD EPYC with AVX2; a fresh SAE / one trained 50-200 steps; ``experiments/README.md``, SAE
    training run 11): 1.20x / 1.39x at 14 entries per latent (batch 4,096, 9,216 latents, k 32), 1.16x / 1.21x at
    3.6 (batch 1,024) and 1.22x / 1.26x at 1.8 (batch 1,024, 36,864 latents, k 64), 1.19-1.40x in a first pass; on
    random rows 1.20-1.34x from 0.22 to 3.6 entries per latent. Before :func:`csr_matmul`, on an AVX-512 AMD EPYC,
    it lost below 8 entries per latent on a fresh SAE (0.87x at 3.6, 0.80x at 1.8), and the step took it only from 8
    up; that CPU was not measured again."""
    return W.device.type == "cpu" and W.dtype == torch.float32


def bag_sum(idx: Int[Tensor, "batch k"], vals: Float[Tensor, "batch k"],
            W: Float[Tensor, "d_sae d_model"], sink=None) -> Float[Tensor, "batch d_model"]:
    """``sum_j vals[b, j] * W[idx[b, j]]``: :class:`BagSum` where :func:`bag_sum_applies`, ``embedding_bag``
    otherwise. ``sink``: as :func:`gather_pre`'s, for ``W``'s gradient."""
    vals = vals.to(W.dtype)
    if bag_sum_applies(W):
        return BagSum.apply(idx, vals, W, sink)
    return F.embedding_bag(idx, W, per_sample_weights=vals, mode="sum")


class SparseFVU(torch.autograd.Function):
    """The sparse decode and its FVU in one: ``(loss, x_hat)`` with ``x_hat = sum_j vals[b, j] * W[idx[b, j]] +
    b_dec`` and ``loss = sum ||x_hat - x||^2 / tv`` (``x_hat`` not differentiable: the loss is its only
    differentiable use), by :func:`saes.native.sparse_fvu`: each row's decoder rows are read once, for the decode
    and, while in the cache, for the dot products ``<e[b], W[idx[b, j]]>`` that the code values' gradient needs
    (``2 / tv`` times them), in place of :class:`BagSum`'s decode, the loss's elementwise ops and its backward's
    :func:`saes.native.gather_dot`. ``W``'s gradient is the sparse product of ``2 vals / tv`` with the errors
    (kept in ``sink`` as :func:`gather_pre`'s), ``b_dec``'s ``2 / tv`` times the summed errors. Equal to the decode,
    :func:`saes.losses.fvu_loss` and their autograd to float rounding (``tests/saes/test_kernels.py``). Inside the
    trainer's batch-1,024 step (9,216 latents, 2-core AMD EPYC with AVX-512): :class:`BagSum` with the loss by torch
    ops takes 1.083x the step's time (``sae_step_phases.py --decode-kernels bag_sum sparse_fvu``,
    ``sae_step_phases_decode_b1024_avx512_run18.json``)."""

    @staticmethod
    def forward(ctx, idx, vals, W, b_dec, x, tv, sink=None):  # noqa: D102
        x_hat, e, sse, dots = native.sparse_fvu(idx, vals.contiguous(), W, b_dec, x)
        ctx.save_for_backward(idx, vals, e, dots, tv)
        ctx.sink, ctx.weight = sink, W  # the parameter itself, for the sink
        ctx.mark_non_differentiable(x_hat)
        return sse.sum() / tv, x_hat

    @staticmethod
    def backward(ctx, g, _):  # noqa: D102
        idx, vals, e, dots, tv = ctx.saved_tensors
        s = 2 * g / tv
        grad_vals = dots * s if ctx.needs_input_grad[1] else None
        grad_W = grad_b_dec = None
        if ctx.needs_input_grad[2]:
            scaled = (vals * s).contiguous()
            if not _keep(ctx, idx, scaled, e, latent_dim=0):
                grad_W = scatter_rows(idx, scaled, e, ctx.weight.shape[0])
        if ctx.needs_input_grad[3]:
            grad_b_dec = e.sum(0) * s
        return None, grad_vals, grad_W, grad_b_dec, None, None, None


def sparse_fvu_applies(idx: Tensor, W_dec: Tensor, x: Tensor) -> bool:
    """Whether :func:`sparse_fvu` takes :class:`SparseFVU`: float32 on CPU with the compiled kernels built with OpenMP
    (:func:`saes.native.sparse_applies`), not under autocast."""
    return (W_dec.dtype == x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and native.sparse_applies(idx, W_dec, x))


def sparse_fvu(idx: Int[Tensor, "batch k"], vals: Float[Tensor, "batch k"], W_dec: Tensor, b_dec: Tensor,
               x: Float[Tensor, "batch d_model"], tv: Tensor, sink=None) -> tuple[Tensor, Tensor]:
    """``(sum ||x_hat - x||^2 / tv, x_hat)`` for ``x_hat = sum_j vals[b, j] * W_dec[idx[b, j]] + b_dec`` (``x_hat``
    detached) by :class:`SparseFVU`; only where :func:`sparse_fvu_applies`. ``sink``: as :func:`gather_pre`'s, for
    ``W_dec``'s gradient."""
    return SparseFVU.apply(idx, vals.to(W_dec.dtype), W_dec, b_dec, x, tv, sink)


def sparse_decode(idx: Int[Tensor, "batch k"], vals: Float[Tensor, "batch k"], W_dec: Tensor,
                  b_dec: Tensor, sink=None) -> Float[Tensor, "batch d_model"]:
    """``sum_j vals[b, j] * W_dec[idx[b, j]] + b_dec`` without a dense code matrix (:func:`bag_sum`)."""
    return bag_sum(idx, vals, W_dec, sink) + b_dec


TWO_LEVEL_GROUP = 16
"""Entries per group in :func:`topk_indices`' first level."""
TWO_LEVEL_MIN_D_SAE = 4096
"""Narrower rows go straight to ``torch.topk`` (measured: no gain at 2,304 latents)."""


GROUP_FAN = 4
"""Group maxima per super-group where :func:`top_groups` picks the kept groups in two steps."""


def _members(groups: Tensor, kept: Int[Tensor, "batch k"]) -> Tensor:
    """The entries of each row's ``kept`` groups, ``[batch, size * k]`` from ``groups`` ``[batch, size, n]`` (group
    ``j`` holds ``groups[:, :, j]``): entry ``r * k + i`` is member ``r`` of group ``kept[:, i]``."""
    b, size, _ = groups.shape
    k = kept.shape[1]
    return groups.gather(2, kept.unsqueeze(1).expand(b, size, k)).view(b, size * k)


def _row_positions(pos: Int[Tensor, "batch k"], kept: Int[Tensor, "batch k"], n: int) -> Int[Tensor, "batch k"]:
    """The positions in the whole row (``r * n + j`` for member ``r`` of group ``j``) of the entries ``pos`` of
    :func:`_members`' output."""
    k = kept.shape[1]
    r = torch.div(pos, k, rounding_mode="floor")
    return r * n + kept.gather(1, pos - r * k)


def top_groups(gm: Float[Tensor, "batch groups"], k: int) -> tuple[Int[Tensor, "batch k"], Float[Tensor, "batch 1"]]:
    """The positions of each row's ``k`` largest group maxima (in no particular order) and the smallest of them
    (the k-th largest): ``gm.topk(k)``, in two steps where a row holds at least ``4 k`` super-groups of
    :data:`GROUP_FAN` maxima (the same argument as :func:`topk_indices`' one level down: the ``k`` super-groups
    with the largest maxima hold a set of ``k`` largest maxima, ties at the k-th value possibly other ones).
    ``torch.topk`` costs in proportion to its row's length, and the two steps read ``g / 4 + 4 k`` entries in
    place of ``g``: at 576 groups (9,216 latents), k 32, a batch of 1,024 layer-12 rows, 2.6 against 3.4 ms
    (2-core AMD EPYC with AVX2, ad hoc); at 2,304 groups (36,864 latents, k 64) :func:`topk_indices` went from
    1.44-1.53x to 1.91-1.95x ``Tensor.topk``'s speed (``experiments/README.md``, SAE training run 13)."""
    b, g = gm.shape
    if g % GROUP_FAN or g // GROUP_FAN < 4 * k:
        top = gm.topk(k, dim=-1, sorted=False)
        return top.indices, top.values.amin(1, keepdim=True)
    sup = gm.view(b, GROUP_FAN, g // GROUP_FAN)  # super-group j holds maxima j, j + g / 4, ...
    kept = sup.amax(1).topk(k, dim=-1, sorted=False).indices
    top = _members(sup, kept).topk(k, dim=-1, sorted=False)
    return _row_positions(top.indices, kept, g // GROUP_FAN), top.values.amin(1, keepdim=True)


def two_level_applies(pre: Float[Tensor, "batch d_sae"], k: int) -> bool:
    """Whether :func:`topk_indices` takes two levels: CPU, a nonempty batch, at least
    :data:`TWO_LEVEL_MIN_D_SAE` latents in whole groups, and at least ``4 k`` groups."""
    b, d = pre.shape
    return (pre.device.type == "cpu" and b > 0 and d >= TWO_LEVEL_MIN_D_SAE and d % TWO_LEVEL_GROUP == 0
            and d // TWO_LEVEL_GROUP >= 4 * k)


def two_level_candidates(pre: Float[Tensor, "batch d_sae"], k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The first level of :func:`topk_indices`: ``(sel, cand, mask, exact)`` with ``sel`` the ``[batch, k]``
    kept groups, ``cand`` their ``[batch, 16 k]`` entries (entry ``r * k + j`` is row ``r`` of group
    ``sel[:, j]``), ``mask`` the candidates ``>=`` the k-th largest group maximum, and ``exact`` the rows
    where ``mask`` holds exactly ``k`` entries (the answer, with no second ``topk``)."""
    b, d = pre.shape
    groups = pre.view(b, TWO_LEVEL_GROUP, d // TWO_LEVEL_GROUP)
    sel, m = top_groups(groups.amax(1), k)
    cand = _members(groups, sel)
    mask = cand >= m
    return sel, cand, mask, mask.sum(1) == k


def topk_indices(pre: Float[Tensor, "batch d_sae"], k: int, values: bool = False):
    """The positions of each row's ``k`` largest entries, in no particular order: the same values as
    ``pre.topk(k).indices`` picks (where entries tie at the k-th value, possibly other positions of it).

    In float32 on CPU the compiled kernel :func:`saes.native.topk` where it is built (block maxima, a lower bound
    from them, selection among the few entries above it; :func:`saes.native.status`): on the layer-12 cache,
    2-core AMD EPYC with AVX2 (``benchmarks/results/sae_kernels_avx2_run15.json``), 4.1-5.9x ``Tensor.topk``'s
    speed at batch 1,024 and 4,096 with 9,216 and 36,864 latents, where the torch-only :func:`two_level_topk` ran
    1.30-2.12x; on an AMD EPYC with AVX-512, with its selection vectorised there, 7.1-10.9x
    (``sae_kernels_avx512_run19.json``). Elsewhere :func:`two_level_topk`. With ``values``, ``(positions,
    pre.gather(1, positions))`` (the compiled kernel reads them while each row is in the cache)."""
    if native.topk_applies(pre, k):
        return native.topk(pre, k, values)
    idx = two_level_topk(pre, k)
    return (idx, pre.gather(1, idx)) if values else idx


def two_level_topk(pre: Float[Tensor, "batch d_sae"], k: int) -> Int[Tensor, "batch k"]:
    """:func:`topk_indices` with torch ops only.

    On CPU for wide rows in two levels, exact by construction: the row is split into ``g = d_sae / 16`` groups
    of 16 entries at stride ``g`` (group ``j`` holds entries ``j, j + g, ...``; their maxima are one vectorised
    reduction), the ``k`` groups with the largest maxima are kept (:func:`top_groups`), and the top ``k``
    entries among their ``16 k`` are picked. Every entry above the k-th largest value lies in a group whose
    maximum is above the k-th largest group maximum ``m`` (so in a kept group), and the kept groups hold at least
    ``k`` entries ``>= m``. Where exactly ``k`` kept entries are ``>= m`` they are the answer with no second ``topk``
    (on layer-12 activations of SmolLM2, 34-46 % of the rows). ``torch.topk`` copies each row into a vector of
    (value, index) pairs, which costs more than reading the row. Against it on the layer-12 cache
    (``benchmarks/sae_kernels.py``, 2-core AMD EPYC, a fresh SAE / one trained 50-200 steps): 30.5 / 30.6 ms
    against 37.7 / 37.1 at batch 4,096 and 9,216 latents; 10.8 / 8.8 against 12.6 / 11.4 at batch 1,024;
    27.7 / 26.9 against 42.2 / 33.3 with 36,864 latents (k 64). With the kept groups picked in two steps, on the
    2-core AMD EPYC with AVX2 (``benchmarks/results/sae_kernels_avx2_run13.json``): 1.44x / 1.43x ``Tensor.topk``'s
    speed at batch 4,096, 1.29x / 1.30x at 1,024, 1.91x / 1.95x with 36,864 latents. ``torch.topk`` elsewhere (CUDA
    has its own radix select).
    """
    if not two_level_applies(pre, k):
        return pre.topk(k, dim=-1, sorted=False).indices
    sel, cand, mask, exact = two_level_candidates(pre, k)
    b = pre.shape[0]
    if bool(exact.all()):
        pos = mask.nonzero()[:, 1].view(b, k)
    else:
        pos = torch.empty(b, k, dtype=torch.long, device=pre.device)
        pos[exact] = mask[exact].nonzero()[:, 1].view(-1, k)
        rest = ~exact
        pos[rest] = cand[rest].topk(k, dim=-1, sorted=False).indices
    return _row_positions(pos, sel, pre.shape[1] // TWO_LEVEL_GROUP)


def topk_forward(x: Float[Tensor, "batch d_model"], W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int,
                 center: bool = True, workspace: dict | None = None, sink=None):
    """Sparse TopK encode: ``(idx, vals, pre, xc)``; ``vals`` are differentiable, ``pre`` is dense
    and detached (kept for AuxK's choice of dead latents; see :func:`pre_acts` for ``workspace``, :func:`gather_pre`
    for ``sink``), ``xc`` the encoder's input (:func:`centred`), for :func:`gather_pre`."""
    b_dec = b_dec if center else None
    xc = centred(x.to(W_enc.dtype), b_dec)
    pre = encoder_matmul(xc, W_enc, b_enc, workspace)
    idx, picked = topk_indices(pre, k, values=True)
    vals = GatherPre.apply(picked, idx, xc, W_enc, b_enc, b_dec, sink).relu()
    return idx, vals, pre, xc
