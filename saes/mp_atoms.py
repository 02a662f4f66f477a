"""Where the atoms of an MP-SAE start, and where dead ones go: the cure for seeds that get stuck.

An atom of a matching-pursuit SAE gets a gradient only from the rows whose pursuit picks it. With
non-negative coefficients an atom is picked only where it correlates positively with the residual,
so a random atom pointing away from the data is never picked, never moves, and the features it
could have taken are left to mixtures of the atoms that win. Two remedies, used by
:class:`saes.mp.MPSAE` in training:

* :func:`init_from_rows`: atoms start as centred data rows, so every atom starts inside the data;
* :func:`resample_dead`: atoms that have not been picked for a while move to the residual directions
  of the rows reconstructed worst (Bricken et al.'s resampling, with the residual as the target, which
  is where a feature no atom represents shows up).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

from saes import distributed as ddp


@torch.no_grad()
def init_from_rows(W_dec: Float[Tensor, "d_sae d_model"], rows: Float[Tensor, "n d_model"]) -> int:
    """Set the first rows of ``W_dec`` to distinct random non-zero ``rows``, normalised (uses the
    global torch generator, which the trainer seeds identically on every process). Returns how many
    atoms were set (all of them when there are at least ``d_sae`` usable rows)."""
    norms = rows.norm(dim=1)
    rows = rows[norms > 1e-6 * norms.max().clamp_min(1e-30)]
    pick = rows[torch.randperm(rows.shape[0])[: W_dec.shape[0]].to(rows.device)]
    W_dec[: pick.shape[0]] = pick / pick.norm(dim=1, keepdim=True)
    return int(pick.shape[0])


def gather_rows(rows: Float[Tensor, "m d_model"], weights: Float[Tensor, " m"], size: int) -> tuple[Tensor, Tensor]:
    """Every process's ``rows`` and ``weights`` (padded to ``size`` rows, weight 0), the same on all."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return rows, weights
    buf = rows.new_zeros(world, size, rows.shape[1])
    wbuf = weights.new_zeros(world, size)
    buf[rank, : rows.shape[0]] = rows
    wbuf[rank, : weights.shape[0]] = weights
    return ddp.allsum(buf).flatten(0, 1), ddp.allsum(wbuf).flatten()


@torch.no_grad()
def resample_dead(W_dec: Tensor, dead: Tensor, rows: Tensor, weights: Tensor, *, seed: int) -> int:
    """Move the ``dead`` rows of ``W_dec`` to normalised ``rows`` drawn with probability proportional
    to ``weights`` (squared residual norms), with a generator seeded by ``seed`` so that every
    process draws the same. Returns the number of atoms moved."""
    idx = torch.nonzero(dead.to(W_dec.device))[:, 0]
    usable = weights > 0
    if idx.numel() == 0 or not bool(usable.any()):
        return 0
    gen = torch.Generator().manual_seed(seed)
    p = weights.double().cpu().clamp_min(0)
    pick = torch.multinomial(p, idx.numel(), replacement=bool(idx.numel() > int(usable.sum())), generator=gen)
    new = rows[pick.to(rows.device)].to(W_dec.dtype)
    W_dec[idx] = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return int(idx.numel())
