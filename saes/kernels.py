"""Sparse TopK training kernels: nothing of size ``[batch, d_sae]`` is kept for backward.

The only dense ``[batch, d_sae]`` tensor in a TopK training step is the encoder's pre-activation
matrix, computed once without autograd. The latents that matter (the top ``k``, and the top
``k_aux`` dead ones for AuxK) are picked from it, and :class:`GatherPre` re-expresses their values
as a differentiable function of ``W_enc``, ``b_enc`` and ``b_dec`` whose backward only touches
the selected entries:

* ``grad b_enc = index_add(g)``; ``grad b_dec = -W_enc @ grad b_enc`` (when the input is centred);
* ``grad W_enc = (x - b_dec)^T S`` with ``S`` the sparse ``[batch, d_sae]`` matrix of ``g``,
  computed as a sparse-dense product (``batch * k * d_model`` multiply-adds, not
  ``batch * d_sae * d_model``).

Decoding is ``embedding_bag(idx, W_dec, per_sample_weights=vals)`` (a gather-sum whose backward
is an ``index_add`` into ``W_dec``'s gradient).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.nn import functional as F


def pre_acts(x: Float[Tensor, "batch d_model"], W_enc: Tensor, b_enc: Tensor,
             b_dec: Tensor | None) -> Float[Tensor, "batch d_sae"]:
    """Dense encoder pre-activations, without autograd."""
    with torch.no_grad():
        xc = x - b_dec if b_dec is not None else x
        return torch.addmm(b_enc, xc, W_enc)


def _sparse_t(idx: Tensor, g: Tensor, d_sae: int) -> Tensor:
    """The ``[d_sae, batch]`` sparse matrix ``S^T`` with ``S[b, idx[b, j]] = g[b, j]``."""
    b, k = idx.shape
    rows = idx.reshape(-1)
    cols = torch.arange(b, device=idx.device).repeat_interleave(k)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), g.reshape(-1), (d_sae, b),
                                   check_invariants=False)


class GatherPre(torch.autograd.Function):
    """``pre[b, idx[b, j]]`` where ``pre = (x - b_dec) @ W_enc + b_enc``, with a sparse backward.

    ``values`` is the already computed ``pre.gather(1, idx)`` (forward does no matmul)."""

    @staticmethod
    def forward(ctx, values, idx, x, W_enc, b_enc, b_dec):  # noqa: D102
        ctx.save_for_backward(idx, x, W_enc, b_dec if b_dec is not None else x.new_zeros(0))
        ctx.has_b_dec = b_dec is not None
        return values.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        idx, x, W_enc, b_dec = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        g = g.to(W_enc.dtype)
        grad_W = grad_b_enc = grad_b_dec = None
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            grad_b_enc = torch.zeros(d_sae, dtype=W_enc.dtype, device=W_enc.device)
            grad_b_enc.index_add_(0, idx.reshape(-1), g.reshape(-1))
        if ctx.needs_input_grad[3]:
            xc = (x - b_dec) if ctx.has_b_dec else x
            st = _sparse_t(idx, g, d_sae)
            grad_W = torch.sparse.mm(st, xc.to(W_enc.dtype)).T
        if ctx.has_b_dec and ctx.needs_input_grad[5]:
            grad_b_dec = -(W_enc @ grad_b_enc)
        if not ctx.needs_input_grad[4]:
            grad_b_enc = None
        return None, None, None, grad_W, grad_b_enc, grad_b_dec


def gather_pre(pre: Float[Tensor, "batch d_sae"], idx: Int[Tensor, "batch k"], x: Tensor, W_enc: Tensor,
               b_enc: Tensor, b_dec: Tensor | None) -> Float[Tensor, "batch k"]:
    """Differentiable selected pre-activations (see :class:`GatherPre`)."""
    return GatherPre.apply(pre.gather(1, idx), idx, x, W_enc, b_enc, b_dec)


def sparse_decode(idx: Int[Tensor, "batch k"], vals: Float[Tensor, "batch k"], W_dec: Tensor,
                  b_dec: Tensor) -> Float[Tensor, "batch d_model"]:
    """``sum_j vals[b, j] * W_dec[idx[b, j]] + b_dec`` without a dense code matrix."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals.to(W_dec.dtype), mode="sum") + b_dec


def topk_forward(x: Float[Tensor, "batch d_model"], W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int,
                 center: bool = True):
    """Sparse TopK encode: ``(idx, vals, pre)``; ``vals`` are differentiable, ``pre`` is dense
    and detached (kept for AuxK's choice of dead latents)."""
    x = x.to(W_enc.dtype)
    pre = pre_acts(x, W_enc, b_enc, b_dec if center else None)
    idx = pre.topk(k, dim=-1, sorted=False).indices
    vals = gather_pre(pre, idx, x, W_enc, b_enc, b_dec if center else None).relu()
    return idx, vals, pre
