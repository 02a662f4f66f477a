"""Matching pursuit over a unit-norm dictionary: the encoder of :class:`saes.mp.MPSAE`.

One step picks the atom most correlated with the residual, records its coefficient and subtracts
its contribution. Everything here is split in two passes so that training memory stays small:

1. :func:`select` runs the whole pursuit **without autograd**. It returns the chosen atom of every
   step, its coefficient and why each row stopped. The correlations ``c = r @ A.T`` are kept up to
   date either directly (one ``[batch, d_model] x [d_model, d_sae]`` product per step) or
   incrementally with the dictionary's Gram matrix (``c <- c - z_j * G[j]``), whichever
   :func:`use_gram` predicts is cheaper.
2. :func:`recompute` rebuilds the coefficients **with autograd** from the selected atoms only,
   replaying the pursuit with the choices fixed (``z_t = m_t * <r_t, a_t>``, ``m_t`` = the step was
   taken), so autograd stores ``[batch, steps, d_model]``, never ``[batch, d_sae]`` per step.

The residual norm never grows: with unit-norm atoms each step removes ``z * (2 <r, a> - z) >= 0``
from its square (``z = <r, a>`` or ``0``).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

Coefficients = Literal["nonneg", "signed", "signed_max"]

STOP_REASONS = ("max_iterations", "residual_threshold", "repeated_support", "exhausted")
"""Why a row stopped, indexed by :attr:`Selection.stop_reason`:
``max_iterations`` it took every step; ``residual_threshold`` its residual norm fell to the
threshold; ``repeated_support`` a step picked an atom already in its support (that step is applied,
then the row stops); ``exhausted`` no atom has a positive (``nonneg``, ``signed_max``) or non-zero
(``signed``) correlation left, so further steps would change nothing."""

GRAM_MAX_BYTES = 2 << 30
"""Never build a Gram matrix larger than this (``d_sae ** 2 * element size``)."""
CHUNK_ELEMS = 1 << 19
"""On CPU the Gram update runs on blocks of ``CHUNK_ELEMS // d_sae`` rows (2 MiB of fp32
correlations), so that a block's correlations stay in cache across the steps."""
GATHER_COST = 64.0
"""Rough cost of touching one element of ``[batch, d_sae]`` in the Gram update, in units of one
multiply-add inside a matmul (memory-bound gather + update vs compute-bound GEMM)."""


class Selection(NamedTuple):
    """The pursuit's choices, without autograd."""

    indices: Int[Tensor, "n steps"]
    """Atom chosen at each step (0 for steps not taken)."""
    coefs: Float[Tensor, "n steps"]
    """Coefficient recorded at each step (0 for steps not taken)."""
    taken: Bool[Tensor, "n steps"]
    """Whether the step changed the code (the row was still running and the coefficient is non-zero)."""
    residual_norms: Float[Tensor, "n steps_plus_1"]
    """Residual norm before the first step and after every step (stays constant once a row stops)."""
    n_steps: Int[Tensor, " n"]
    """Steps taken by each row."""
    stop_reason: Int[Tensor, " n"]
    """Index into :data:`STOP_REASONS`."""


def use_gram(n: int, d_model: int, d_sae: int, steps: int, *, gram_cached: bool, elem_bytes: int) -> bool:
    """Whether the incremental Gram update is predicted to beat one direct product per step.

    Direct costs ``(steps - 1) * n * d_model * d_sae`` multiply-adds; Gram costs the Gram matrix
    (``d_sae ** 2 * d_model``, free when cached) plus ``(steps - 1) * n * d_sae`` memory-bound
    updates weighted by :data:`GATHER_COST`.
    """
    if steps <= 1 or d_sae * d_sae * elem_bytes > GRAM_MAX_BYTES:
        return False
    direct = (steps - 1) * n * d_model * d_sae
    gram = (0 if gram_cached else d_sae * d_sae * d_model) + (steps - 1) * n * d_sae * GATHER_COST
    return gram < direct


@torch.no_grad()
def select(
    x: Float[Tensor, "n d_model"],
    atoms: Float[Tensor, "d_sae d_model"],
    *,
    steps: int,
    coefficients: Coefficients = "nonneg",
    allow_repeat: bool = True,
    residual_threshold: float = 0.0,
    stop_on_repeated_support: bool = False,
    gram: Float[Tensor, "d_sae d_sae"] | None = None,
    excluded: Bool[Tensor, " d_sae"] | None = None,
    residual_fraction: float = 0.0,
) -> Selection:
    """Run matching pursuit for up to ``steps`` steps on (already centred) rows ``x``.

    ``atoms`` must have unit-norm rows. ``gram`` (``atoms @ atoms.T``) switches on the incremental
    correlation update; ``excluded`` atoms are never picked (atom dropout). A row stops (reason
    ``residual_threshold``) once its residual norm is at most the larger of ``residual_threshold``
    and ``residual_fraction`` times its own starting norm.
    """
    n, _ = x.shape
    dev = x.device
    indices = torch.zeros(n, steps, dtype=torch.long, device=dev)
    coefs = torch.zeros(n, steps, dtype=x.dtype, device=dev)
    taken = torch.zeros(n, steps, dtype=torch.bool, device=dev)
    norms = torch.empty(n, steps + 1, dtype=x.dtype, device=dev)
    reason = torch.zeros(n, dtype=torch.long, device=dev)
    # the Gram update is memory-bound: run it on row blocks whose correlations stay in cache
    chunk = n if gram is None or dev.type != "cpu" else max(1, CHUNK_ELEMS // atoms.shape[0])
    opts = dict(steps=steps, coefficients=coefficients, allow_repeat=allow_repeat,
                residual_threshold=residual_threshold, stop_on_repeated_support=stop_on_repeated_support,
                gram=gram, excluded=excluded, residual_fraction=residual_fraction)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        _select_rows(x[s:e], atoms, indices[s:e], coefs[s:e], taken[s:e], norms[s:e], reason[s:e], **opts)
    return Selection(indices, coefs, taken, norms, taken.sum(1), reason)


def row_max(score: Float[Tensor, "n m"], block: int = 128) -> tuple[Tensor, Tensor]:
    """``score.max(dim=1)``, faster on wide rows: ``max`` with indices is not vectorised on CPU
    while ``amax`` is, so take ``amax`` over blocks, then ``max`` within the winning block."""
    n, m = score.shape
    if m < 16 * block:
        return score.max(dim=1)
    m0 = m - m % block
    bmax = score[:, :m0].reshape(n, m0 // block, block).amax(2)
    if m0 < m:
        bmax = torch.cat([bmax, score[:, m0:].amax(1, keepdim=True)], 1)
    best, bi = bmax.max(dim=1)
    idx = (bi[:, None] * block + torch.arange(block, device=score.device)).clamp_max(m - 1)
    within = score.gather(1, idx).argmax(dim=1, keepdim=True)
    return best, idx.gather(1, within)[:, 0]


def _select_rows(x: Tensor, atoms: Tensor, indices: Tensor, coefs: Tensor, taken: Tensor, norms: Tensor,
                 reason: Tensor, *, steps: int, coefficients: Coefficients, allow_repeat: bool,
                 residual_threshold: float, stop_on_repeated_support: bool, gram: Tensor | None,
                 excluded: Tensor | None, residual_fraction: float) -> None:
    """The pursuit on one block of rows; writes into the given output views."""
    n, dev = x.shape[0], x.device
    rows = torch.arange(n, device=dev)
    c = x @ atoms.T
    # with the Gram update and a max over c itself, masked atoms can simply be set to -inf in c:
    # the incremental updates keep them there
    mask_in_c = gram is not None and coefficients != "signed"
    if excluded is not None and mask_in_c:
        c.masked_fill_(excluded, float("-inf"))
    mask_score = (excluded is not None or not allow_repeat) and not mask_in_c
    need_support = (not allow_repeat and not mask_in_c) or (stop_on_repeated_support and allow_repeat)
    support = torch.zeros(n, atoms.shape[0], dtype=torch.bool, device=dev) if need_support else None
    r = x.clone() if gram is None else None
    sq = (x * x).sum(-1)  # squared residual norm, updated incrementally
    norms[:, 0] = sq.sqrt()
    running = torch.ones(n, dtype=torch.bool, device=dev)
    stop_below = residual_threshold if residual_threshold > 0 else None
    if residual_fraction > 0:  # per row: a fraction of its own starting norm
        stop_below = (residual_fraction * norms[:, 0]).clamp_min(residual_threshold)
    for t in range(steps):
        if stop_below is not None:
            below = running & (norms[:, t] <= stop_below)
            reason[below] = 1
            running &= ~below
        if not running.any():
            norms[:, t + 1 :] = norms[:, t : t + 1]
            break
        score = c.abs() if coefficients == "signed" else c
        if mask_score:
            score = score.clone() if score is c else score
            if excluded is not None:
                score.masked_fill_(excluded, float("-inf"))
            if not allow_repeat:
                score.masked_fill_(support, float("-inf"))
        best, j = row_max(score)
        val = c[rows, j]
        ok = running & (torch.isfinite(best) if coefficients == "signed_max" else best > 0)
        z = torch.where(ok, val, torch.zeros_like(val))
        if coefficients == "nonneg":
            z = z.clamp_min(0)
        step_taken = z != 0
        exhausted = running & ~step_taken
        reason[exhausted] = 3
        running &= ~exhausted
        repeated = None
        if support is not None:
            repeated = support[rows, j] & step_taken
            support[rows[step_taken], j[step_taken]] = True
        indices[:, t] = torch.where(step_taken, j, torch.zeros_like(j))
        coefs[:, t] = z
        taken[:, t] = step_taken
        # with z = <r, a_j> (or 0) and |a_j| = 1, |r - z a_j|^2 = |r|^2 - z^2
        sq = (sq - z * z).clamp_min(0)
        norms[:, t + 1] = sq.sqrt()
        if t + 1 < steps:
            if gram is not None:
                c.addcmul_(z[:, None], gram.index_select(0, j), value=-1)
                if mask_in_c and not allow_repeat:
                    c[rows, j] = float("-inf")
            else:
                r.addcmul_(z[:, None], atoms.index_select(0, j), value=-1)
                c = r @ atoms.T
        if stop_on_repeated_support and repeated is not None:
            stop = running & repeated
            reason[stop] = 2
            running &= ~stop


def recompute(
    x: Float[Tensor, "n d_model"],
    atoms: Float[Tensor, "d_sae d_model"],
    sel: Selection,
) -> tuple[Float[Tensor, "n steps"], Float[Tensor, "n d_model"]]:
    """Coefficients and reconstruction (of the centred input) with autograd, from fixed choices.

    Replays the pursuit with the choices fixed: ``z_t = m_t * <r_t, a_t>``, ``r_{t+1} = r_t - z_t a_t``
    (``m_t`` = the step was taken). This equals the pursuit's own coefficients (the unit
    lower-triangular system ``(I + diag(m) L) z = m * (A_sel x)``, solved by forward substitution), and
    the ReLU of ``nonneg`` pursuit has derivative 1 on every taken step. Autograd stores
    ``[batch, steps, d_model]`` (the chosen atoms and the residuals), never ``[batch, d_sae]`` per step;
    the replay costs ``O(batch * steps * d_model)``, where forming the selected atoms' Gram matrix
    would cost ``steps`` times more.
    """
    w = torch.nn.functional.embedding(sel.indices, atoms)  # [n, steps, d_model]
    m = sel.taken.to(x.dtype)
    r = x
    zs = []
    # unbind, not w[:, t]: the backward of unbind stacks once, that of a select builds a full-size
    # zero tensor per step
    for t, a in enumerate(w.unbind(1)):
        z = (r * a).sum(-1) * m[:, t]
        r = r - z[:, None] * a
        zs.append(z)
    return torch.stack(zs, 1), x - r


@torch.no_grad()
def exact_coefficients(
    x: Float[Tensor, "n d_model"],
    atoms: Float[Tensor, "d_sae d_model"],
    sel: Selection,
    *,
    nonneg: bool,
) -> Selection:
    """The same choices with their coefficients recomputed in ``x``'s dtype (a selection made in a
    lower precision): ``z_t = <r_t, a_t>`` (clamped at 0 with ``nonneg``), ``r_{t+1} = r_t - z_t a_t``,
    exact residual norms; a step whose coefficient comes out 0 is no longer taken. Costs
    ``O(n * steps * d_model)``, one step at a time (no ``[n, steps, d_model]`` tensor)."""
    n, steps = sel.indices.shape
    r = x.clone()
    coefs = torch.zeros(n, steps, dtype=x.dtype, device=x.device)
    norms = torch.empty(n, steps + 1, dtype=x.dtype, device=x.device)
    norms[:, 0] = r.norm(dim=-1)
    for t in range(steps):
        a = atoms.index_select(0, sel.indices[:, t]).to(x.dtype)
        z = (r * a).sum(-1) * sel.taken[:, t]
        if nonneg:
            z = z.clamp_min(0)
        r.addcmul_(z[:, None], a, value=-1)
        coefs[:, t] = z
        norms[:, t + 1] = r.norm(dim=-1)
    taken = sel.taken & (coefs != 0)
    indices = torch.where(taken, sel.indices, torch.zeros_like(sel.indices))
    return Selection(indices, coefs, taken, norms, taken.sum(1), sel.stop_reason)


def dense_codes(sel_indices: Int[Tensor, "n steps"], z: Float[Tensor, "n steps"],
                d_sae: int) -> Float[Tensor, "n d_sae"]:
    """Scatter per-step coefficients into dense codes (a re-picked atom's coefficients add up)."""
    out = torch.zeros(z.shape[0], d_sae, dtype=z.dtype, device=z.device)
    return out.scatter_add(1, sel_indices, z)


def sparse_reconstruct(
    sel: Selection, atoms: Float[Tensor, "d_sae d_model"], chunk: int = 8
) -> Float[Tensor, "n d_model"]:
    """``sum_t z_t a_{j_t}`` without materialising ``[n, steps, d_model]`` at once."""
    out = torch.zeros(sel.coefs.shape[0], atoms.shape[1], dtype=atoms.dtype, device=atoms.device)
    for s in range(0, sel.indices.shape[1], chunk):
        idx, z = sel.indices[:, s : s + chunk], sel.coefs[:, s : s + chunk]
        out += torch.einsum("nt,ntd->nd", z, atoms[idx])
    return out


def l0_per_row(sel: Selection) -> Tensor:
    """Distinct atoms per row (a re-picked atom counts once)."""
    idx = torch.where(sel.taken, sel.indices, torch.full_like(sel.indices, -1)).sort(dim=1).values
    new = torch.ones_like(idx, dtype=torch.bool)
    new[:, 1:] = idx[:, 1:] != idx[:, :-1]
    return (new & (idx >= 0)).sum(1)


def mp_metrics(result) -> dict[str, Any]:
    """L0 distribution, mean residual norm per step and the fraction of rows stopped by each rule, of
    a :class:`Selection` or of anything holding one as ``.selection`` (``saes.mp.MpResult``)."""
    sel = result if isinstance(result, Selection) else result.selection
    l0 = l0_per_row(sel).float()
    reasons = torch.bincount(sel.stop_reason, minlength=len(STOP_REASONS)).float() / max(len(sel.stop_reason), 1)
    return {
        "l0_min": l0.min().item(), "l0_mean": l0.mean().item(), "l0_max": l0.max().item(),
        "steps_mean": sel.n_steps.float().mean().item(),
        "residual_norm_per_step": sel.residual_norms.float().mean(0).tolist(),
        "stopped_by": {name: reasons[i].item() for i, name in enumerate(STOP_REASONS)},
    }
