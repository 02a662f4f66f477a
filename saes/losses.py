"""What an architecture hands the trainer, and the loss pieces the architectures share.

The trainer (:mod:`saes.trainer`) calls, once per step and per site::

    step = sae.training_loss(x, state)      # x: [batch, d_model], already normalised
    step.loss.backward()

:class:`TrainState` carries what a loss may need besides the batch (the step number, which latents
are dead, a sum that spans every DDP process); :class:`TrainStep` is what comes back. Losses are
written as *sums over rows divided by a batch-global constant* (see :func:`global_sum`), so that
summing gradients over processes equals one process on the whole global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interp.errors import InputError
from saes import hostsync
from saes.kernels import bag_sum


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class TrainState:
    """Per-site training state the trainer owns and passes to ``training_loss``."""

    step: int = 0
    """Optimizer steps taken so far."""
    total_steps: int = 1
    """Steps the run will take (for coefficient warm-ups)."""
    dead_mask: Tensor | None = None
    """``[d_sae]`` bool: latents that have not fired for ``TrainConfig.dead_tokens`` tokens; None while no latent
    can have gone that long (fewer tokens seen since the start than ``dead_tokens``)."""
    global_rows: int = 0
    """Rows in the global batch (all processes together); 0: the rows of the batch ``training_loss`` is
    given, on one process (:func:`rows_of_batch`). The trainer always sets it."""
    allsum: Callable[[Tensor], Tensor] = field(default=_identity)
    """Sums a (non-differentiable) tensor over DDP processes; identity on one process."""
    world_size: int = 1
    """Number of DDP processes."""
    workspace: dict | None = None
    """Scratch buffers this SAE may reuse from one step to the next (the trainer holds one dict per SAE for
    a run; None: allocate afresh). A buffer's contents are only valid within the step that wrote them."""
    grads: Any = None
    """A :class:`saes.sparse_grads.SparseGrads` where the trainer's optimizer makes the weight gradients the
    sparse backwards leave there (None: every gradient goes to ``.grad``)."""


class TrainStep(NamedTuple):
    """What ``training_loss`` returns."""

    loss: Tensor
    """Scalar to back-propagate (this process's share of the global loss)."""
    x_hat: Float[Tensor, "batch d_model"]
    """Reconstruction, for live FVU."""
    l0: Tensor
    """Scalar: mean number of active latents per row on this process."""
    fired: Bool[Tensor, " d_sae"]
    """Latents active on at least one row of this batch (dead-latent tracking)."""
    terms: dict[str, Tensor]
    """Named loss components (detached scalars) for logging, as this process's share: the trainer
    sums them over processes."""


def global_sum(x: Tensor, state: TrainState) -> Tensor:
    """A detached sum of ``x`` over this batch and every process."""
    return state.allsum(x.detach().sum().reshape(1)).squeeze(0)


def rows_of_batch(x: Tensor, state: TrainState) -> int:
    """Rows of the global batch: ``state.global_rows``, or this batch's rows when it is 0 on one process.

    A bare ``TrainState()`` used to count one row: FVUs 2e15 times too large and L1/L0 terms not averaged."""
    if state.global_rows > 0:
        return state.global_rows
    if state.world_size > 1:
        raise InputError("TrainState.global_rows must be set under several processes (the global batch's rows)")
    return max(x.numel() // x.shape[-1], 1)


_TV_CHUNK = 1 << 22
"""Elements of ``x - mean`` formed at once by :func:`total_variance` (16 MB of float32)."""


def total_variance(x: Float[Tensor, "batch d_model"], state: TrainState) -> Tensor:
    """``sum ||x - mean(x)||^2`` over the global batch (mean taken over the global batch).

    Two passes: the mean first, then the squared deviations (in row chunks, so no float32 copy of a large
    batch). One pass (``sum x^2 - |sum x|^2 / n``) cancelled when the rows share an offset: 2 % off at an
    offset 100 x the spread, and a near-constant batch gave 1e-12 for 0.016 (an FVU 1e10 too large)."""
    with torch.autocast(x.device.type, enabled=False):  # in float32 whatever autocast would do with a dot product
        xd = x.detach().reshape(-1, x.shape[-1])
        n = rows_of_batch(x, state)
        mean = state.allsum(xd.float().sum(0)) / n
        step = max(1, _TV_CHUNK // max(xd.shape[1], 1))
        acc = torch.zeros((), dtype=torch.float32, device=x.device)
        for lo in range(0, xd.shape[0], step):
            dev = (xd[lo:lo + step].float() - mean).reshape(-1)
            acc = acc + torch.dot(dev, dev)
        return state.allsum(acc.reshape(1)).squeeze(0).clamp_min(1e-12)


def fvu_loss(x: Tensor, x_hat: Tensor, state: TrainState, tv: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reconstruction loss as fraction of variance unexplained over the global batch.

    Returns ``(loss share of this process, total variance)``; ``tv``: :func:`total_variance` of ``x``, where the
    caller has it."""
    tv = total_variance(x, state) if tv is None else tv
    return (x_hat.float() - x.float()).pow(2).sum() / tv, tv


def auxk_loss(x: Tensor, x_hat: Tensor, pre: Float[Tensor, "batch d_sae"],
              gather: Callable[[Tensor], Tensor], W_dec: Tensor, state: TrainState, k_aux: int) -> Tensor:
    """AuxK loss (Gao et al. 2024): reconstruct the residual ``x - x_hat`` from the top ``k_aux``
    dead latents. The target is the residual itself, so ``b_dec`` is not counted twice; the loss is
    normalised by the residual's global variance and scaled by ``min(n_dead / k_aux, 1)``.

    ``pre`` (may be detached) picks the latents; ``gather(idx)`` returns their differentiable
    pre-activations ``[batch, k]`` (``pre.gather(1, idx)`` on the dense path).

    Off the CPU (:func:`saes.hostsync.sync_free`) the number of dead latents is not read back: the top
    ``min(k_aux, d_sae)`` of every column with the live ones masked, the live ones among them weighted 0 and the
    scale a device scalar (the same loss to float rounding: the extra terms are zeros)."""
    dead = state.dead_mask
    if dead is None:
        return x.new_zeros((), dtype=torch.float32)
    if hostsync.sync_free(dead.device):
        return _auxk_masked(x, x_hat, pre, gather, W_dec, state, k_aux, dead)
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros((), dtype=torch.float32)
    k = min(k_aux, n_dead)
    # the top k among the dead latents' columns only: with 300 of 9,216 dead at batch 4,096, 18 ms against 69 ms
    # for a top-k over a copy of every column with the live ones masked (as fast when every latent is dead)
    with torch.no_grad():
        cols = dead.nonzero().squeeze(1)
        idx = cols[pre.index_select(1, cols).topk(k, dim=-1, sorted=False).indices]
    vals = gather(idx).relu()
    e = x.float() - x_hat.detach().float()
    e_hat = bag_sum(idx, vals, W_dec, state.grads)
    tv = total_variance(e, state)
    return min(n_dead / k_aux, 1.0) * (e_hat.float() - e).pow(2).sum() / tv


def _auxk_masked(x: Tensor, x_hat: Tensor, pre: Tensor, gather: Callable[[Tensor], Tensor], W_dec: Tensor,
                 state: TrainState, k_aux: int, dead: Tensor) -> Tensor:
    """:func:`auxk_loss` with nothing read back to the host."""
    with torch.no_grad():
        idx = pre.masked_fill(~dead, -math.inf).topk(min(k_aux, dead.shape[0]), dim=-1, sorted=False).indices
        live = ~dead[idx]
    vals = gather(idx).relu().masked_fill(live, 0)
    e = x.float() - x_hat.detach().float()
    e_hat = bag_sum(idx, vals, W_dec, state.grads)
    tv = total_variance(e, state)
    scale = (dead.sum() / k_aux).clamp(max=1.0)
    return scale * (e_hat.float() - e).pow(2).sum() / tv


def warmup_coeff(coeff: float, warmup_steps: int, state: TrainState) -> float:
    """A sparsity coefficient ramped linearly from 0 over ``warmup_steps``."""
    if warmup_steps <= 0:
        return coeff
    return coeff * min(1.0, (state.step + 1) / warmup_steps)


PROJECTION_ROWS = 1024
"""Decoder rows per block in :func:`remove_parallel_grad` on CPU."""


def remove_parallel_grad(W_dec: Tensor, unit_rows: bool = False) -> None:
    """Project out the gradient component parallel to each decoder row, so that an Adam step moves
    rows along the sphere rather than scaling them: ``grad -= (<grad, w> / <w, w>) w`` row by row, in
    place.

    On CPU in blocks of :data:`PROJECTION_ROWS` rows: ``vecdot`` multiplies into a temporary of its inputs' size
    before it sums, so a block's rows are read from memory once for the dot products and the update, and no
    temporary of the decoder's size is made (9,216 x 576 in float32 on a 2-core AMD EPYC with AVX2: 3.8 ms a step
    against 5.9 for the whole decoder at once inside the trainer at batch 1,024, SAE training run 12 in
    ``experiments/README.md``; the same values bit for bit, ``tests/saes/test_kernels.py``). Elsewhere in one
    piece.

    ``unit_rows``: the rows are known to have unit norm (the trainer after its first step: :func:`normalize_rows`
    ran last), so ``<w, w>`` is taken as 1 and not computed, one pass over the decoder less; in float32 and
    float64 only (``<w, w>`` of a row normalised there is 1 to float rounding; in lower precisions it is
    computed all the same)."""
    if W_dec.grad is None:
        return
    unit = unit_rows and W_dec.dtype in (torch.float32, torch.float64)
    rows = PROJECTION_ROWS if W_dec.device.type == "cpu" else max(W_dec.shape[0], 1)
    with torch.no_grad():
        for start in range(0, W_dec.shape[0], rows):
            g, w = W_dec.grad[start:start + rows], W_dec[start:start + rows]
            coef = torch.linalg.vecdot(g, w)
            if not unit:
                coef /= torch.linalg.vecdot(w, w).clamp_min(1e-24)
            g.addcmul_(w, coef[:, None], value=-1)


def normalize_rows(W_dec: Tensor, keep: Tensor | None = None) -> None:
    """Scale each decoder row to unit norm, in place. ``keep``: a scalar flag on the device; where it is nonzero
    (a step the optimizer skipped, :class:`saes.guard.Deferred`) the rows are left as they are, bit for bit."""
    with torch.no_grad():
        norm = W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if keep is not None:
            norm = torch.where(keep != 0, torch.ones_like(norm), norm)
        W_dec /= norm


MASSIVE_ROW = 10.0
"""A row whose squared norm is over this many times the batch median's is a massive activation: left out of
:func:`input_scale`'s estimate and counted apart by :class:`saes.evaluate.ReconstructionStats`."""


def massive_limit(sq: Float[Tensor, " n"]) -> Tensor:
    """The squared norm above which a row is a massive activation: :data:`MASSIVE_ROW` x the median of ``sq``
    (rows' squared norms); inf when that median is 0 (mostly zero rows), so that no row is."""
    med = sq.median()
    return MASSIVE_ROW * med if med > 0 else torch.full_like(med, math.inf)


def typical_rows(x: Float[Tensor, "batch d"]) -> Float[Tensor, "n d"]:
    """The rows of ``x`` (as float32) that are not massive activations: squared norm at most :data:`MASSIVE_ROW`
    x the median's (every row when that median is 0)."""
    x = x.float()
    sq = x.pow(2).sum(-1)
    return x[sq <= massive_limit(sq)]


def input_scale(x: Float[Tensor, "batch d"]) -> float:
    """``sqrt(d / E||x||^2)`` over the rows of ``x`` that are not massive activations (squared norm at most
    :data:`MASSIVE_ROW` x the median's), so that typical rows come out with ``E||x||^2 = d``.

    Residual streams hold a few rows with norms far above the rest (on the embedded model's layer 12, about
    1 row in 7,000 sits 50-40,000 x above the median squared norm): a plain mean over a first batch of 1,024
    rows then varies by up to 9.4x in scale with the luck of the draw (measured over 190 batches), this
    estimate by 1.9 % (``experiments/sae_lr_rule.md``). With a median of 0 (mostly zero rows) every row
    counts."""
    return math.sqrt(x.shape[-1] / typical_rows(x).pow(2).sum(-1).mean().clamp_min(1e-12).item())


def fold_input_scale(sae: torch.nn.Module, scale: float) -> None:
    """Fold an input normalisation ``x' = scale * x`` into the weights so the SAE reads raw
    activations. Codes are unchanged (so thresholds are too); the reconstruction comes out in raw
    units: ``W_enc *= scale``, ``W_dec /= scale``, ``b_dec /= scale``."""
    with torch.no_grad():
        sae.W_enc.mul_(scale)
        sae.W_dec.div_(scale)
        sae.b_dec.div_(scale)


def active_mask(codes: Float[Tensor, "batch d_sae"]) -> tuple[Tensor, Tensor]:
    """``(mean L0 per row, fired[d_sae])`` of dense codes."""
    nz = codes != 0
    return nz.sum(-1).float().mean(), nz.any(0)


@torch.no_grad()
def typical_mean(x: Float[Tensor, "n d_model"]) -> Float[Tensor, " d_model"]:
    """The mean of :func:`typical_rows` (the rows that are not massive activations, as :func:`input_scale`
    counts them): the constant that best reconstructs typical rows in squared error, without the pull of a rare
    row 10,000 x the median's squared norm (one such row in a first batch of 1,024 on the embedded model's layer
    12 moves the plain mean 4.0 away, against 0.7 between the plain mean and the geometric median of a batch
    without one)."""
    return typical_rows(x).mean(0)


@torch.no_grad()
def geometric_median(x: Float[Tensor, "n d_model"], iters: int = 100, tol: float = 1e-6) -> Float[Tensor, " d_model"]:
    """Weiszfeld's algorithm (the point minimising the summed Euclidean distance to the rows)."""
    x = x.float()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-12):
            return y_new
        y = y_new
    return y
