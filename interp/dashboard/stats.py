"""Streaming per-unit statistics with memory bounded in the number of tokens.

:class:`Tracker` takes one batch of windows at a time (token ids ``[B, T]``, the positions that
count ``[B, T]`` and unit activations ``[B, T, U]``) and keeps, per unit:

* **top contexts**: the ``top_k`` windows with the largest activation (one per window, at its
  maximum), each with the window number, the position of the maximum, and the tokens and the unit's
  activations from ``left`` tokens before it to ``right`` after it. Merged by a stable sort of the
  kept and the new candidates, so among equal activations the earlier window wins (windows that
  start with the same tokens give equal activations there).
* **histogram** of the nonzero activations over fixed log-spaced bins: ``n_bins`` per sign, inner
  edges ``logspace(lo, hi, n_bins - 1)``; the first bin holds everything below ``lo`` (above 0), the
  last everything from ``hi`` up. Signed units get the mirrored bins for negative values too.
* **samples per histogram bin**: ``samples_per_bin`` contexts drawn uniformly from the activations
  that fell in each bin (priority sampling: each activation draws a key from a generator seeded by
  ``(seed, batch number)``, and the largest keys are kept), so the middle of the distribution is
  visible, not only the top; the pages group the bins into quantiles.
* **count** and **sum** of the nonzero activations (frequency = count / tokens).

Every step depends only on the batch and the batch number, so a tracker restored from
:meth:`Tracker.state_dict` continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from interp.errors import InputError
from interp.source import generator

__all__ = ["Tracker", "bin_edges"]


def bin_edges(n_bins: int, lo: float, hi: float, signed: bool) -> Tensor:
    """Edges of every histogram bin, ``[n_bins_total + 1]`` (float64; the outer ones are +-inf, 0 between signs)."""
    inner = torch.logspace(math.log10(lo), math.log10(hi), n_bins - 1, dtype=torch.float64)
    pos = torch.cat([torch.zeros(1, dtype=torch.float64), inner, torch.tensor([math.inf], dtype=torch.float64)])
    if not signed:
        return pos
    return torch.cat([-pos.flip(0)[:-1], pos])


class Tracker:
    """Top contexts, histograms and per-bin samples of `n_units` units over a stream of batches."""

    def __init__(self, n_units: int, *, top_k: int = 16, left: int = 12, right: int = 4, n_bins: int = 30,
                 bin_range: tuple[float, float] = (1e-3, 1e3), samples_per_bin: int = 1, signed: bool = False,
                 seed: int = 0, device: str | torch.device = "cpu"):
        if n_units < 1 or top_k < 1 or left < 0 or right < 0 or n_bins < 2 or samples_per_bin < 0:
            raise InputError(f"need n_units >= 1, top_k >= 1, left/right >= 0, n_bins >= 2, samples_per_bin >= 0; "
                             f"got {n_units}, {top_k}, {left}/{right}, {n_bins}, {samples_per_bin}")
        lo, hi = bin_range
        if not 0 < lo < hi:
            raise InputError(f"bin_range must be (lo, hi) with 0 < lo < hi, got {bin_range}")
        self.U, self.k, self.left, self.right = n_units, top_k, left, right
        self.L = left + 1 + right
        self.n_bins, self.signed, self.seed, self.r = n_bins, signed, seed, samples_per_bin
        self.nb = n_bins * (2 if signed else 1)
        self.inner = torch.logspace(math.log10(lo), math.log10(hi), n_bins - 1, device=device)
        self.edges = bin_edges(n_bins, lo, hi, signed)
        self.device = torch.device(device)
        self.n_tokens = 0
        self.batches = 0
        U, k, L, G, r = n_units, top_k, self.L, n_units * self.nb, samples_per_bin
        z = dict(device=self.device)
        self.t: dict[str, Tensor] = {
            "top_val": torch.full((k, U), -math.inf, **z), "top_win": torch.full((k, U), -1, dtype=torch.long, **z),
            "top_pos": torch.full((k, U), -1, dtype=torch.long, **z),
            "top_tok": torch.full((k, U, L), -1, dtype=torch.int32, **z), "top_act": torch.zeros(k, U, L, **z),
            "hist": torch.zeros(U, self.nb, dtype=torch.long, **z), "count": torch.zeros(U, dtype=torch.long, **z),
            "sum": torch.zeros(U, dtype=torch.float64, **z),
            "smp_key": torch.full((G, r), -1.0, **z), "smp_val": torch.zeros(G, r, **z),
            "smp_win": torch.full((G, r), -1, dtype=torch.long, **z),
            "smp_pos": torch.full((G, r), -1, dtype=torch.long, **z),
            "smp_tok": torch.full((G, r, L), -1, dtype=torch.int32, **z), "smp_act": torch.zeros(G, r, L, **z),
        }

    # -- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor of the state (on the CPU), plus ``n_tokens`` and ``batches`` as 0-d tensors."""
        out = {k: v.cpu().contiguous() for k, v in self.t.items()}
        out["n_tokens"] = torch.tensor(self.n_tokens)
        out["batches"] = torch.tensor(self.batches)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        bad = [k for k, v in self.t.items() if k not in state or state[k].shape != v.shape]
        if bad:
            raise InputError(f"saved dashboard state lacks or misshapes {bad}; it was written with other settings")
        self.t = {k: state[k].to(self.device) for k in self.t}
        self.n_tokens, self.batches = int(state["n_tokens"]), int(state["batches"])

    # -- one batch -------------------------------------------------------------------------------
    def _context(self, ids: Tensor, z: Tensor, b: Tensor, t: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens and activations of unit ``u`` around position ``t`` of window ``b`` (flat index tensors)."""
        T = ids.shape[1]
        p = t[:, None] + torch.arange(-self.left, self.right + 1, device=t.device)
        valid = (p >= 0) & (p < T)
        pc = p.clamp(0, T - 1)
        tok = ids[b[:, None], pc].to(torch.int32).masked_fill(~valid, -1)
        act = z[b[:, None], pc, u[:, None]].float().masked_fill(~valid, 0.0)
        return tok, act

    @torch.no_grad()
    def update(self, ids: Tensor, keep: Tensor, z: Tensor, first_window: int) -> None:
        """Add a batch: token ids ``[B, T]``, the positions that count ``[B, T]`` (bool), unit activations
        ``[B, T, U]``; `first_window` is the number of the batch's first window in the whole stream."""
        B, T, U = z.shape
        if U != self.U or ids.shape != (B, T) or keep.shape != (B, T):
            raise InputError(f"batch shapes ids {tuple(ids.shape)}, keep {tuple(keep.shape)}, activations "
                             f"{tuple(z.shape)} do not match [B, T] and [B, T, n_units={self.U}]")
        ids, keep, z = ids.to(self.device), keep.to(self.device), z.to(self.device)
        self._update_top(ids, keep, z, first_window)
        self._update_bins(ids, keep, z, first_window)
        self.n_tokens += int(keep.sum())
        self.batches += 1

    def _update_top(self, ids: Tensor, keep: Tensor, z: Tensor, first_window: int) -> None:
        t, k, U = self.t, self.k, self.U
        win_max, win_arg = z.masked_fill(~keep[..., None], -math.inf).max(dim=1)  # [B, U]
        if not self.signed:
            win_max = win_max.masked_fill(win_max <= 0, -math.inf)  # a window where the unit never fires
        # a stable sort, old slots first: among equal activations the earlier window wins
        values, order = torch.sort(torch.cat([t["top_val"], win_max.float()]), dim=0, descending=True, stable=True)
        idx = order[:k]  # [k, U]: < k an old slot, else k + window of this batch
        is_new = idx >= k
        cols = torch.arange(U, device=self.device).expand(k, U)
        b = (idx - k).clamp(min=0)
        pos = win_arg[b, cols]
        tok, act = self._context(ids, z, b.reshape(-1), pos.reshape(-1), cols.reshape(-1))
        old = idx.clamp(max=k - 1)
        new_win = torch.where(is_new, b + first_window, t["top_win"][old, cols])
        new_pos = torch.where(is_new, pos, t["top_pos"][old, cols])
        t["top_tok"] = torch.where(is_new[..., None], tok.reshape(k, U, -1), t["top_tok"][old, cols])
        t["top_act"] = torch.where(is_new[..., None], act.reshape(k, U, -1), t["top_act"][old, cols])
        t["top_val"], t["top_win"], t["top_pos"] = values[:k], new_win, new_pos

    def _bins(self, v: Tensor) -> Tensor:
        b = torch.bucketize(v.abs().float(), self.inner, right=True)
        if not self.signed:
            return b
        return torch.where(v > 0, self.n_bins + b, self.n_bins - 1 - b)

    @staticmethod
    def _rank_in_group(group: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """Order entries by group, largest key first; return (order, rank of each ordered entry in its group)."""
        order = torch.argsort(group.double() * 2 + (1 - key.double()), stable=True)
        g = group[order]
        n = g.shape[0]
        starts = torch.ones(n, dtype=torch.bool, device=g.device)
        starts[1:] = g[1:] != g[:-1]
        ar = torch.arange(n, device=g.device)
        first = torch.cummax(torch.where(starts, ar, torch.zeros_like(ar)), dim=0).values
        return order, ar - first

    def _update_bins(self, ids: Tensor, keep: Tensor, z: Tensor, first_window: int) -> None:
        t = self.t
        nz = ((z != 0) & keep[..., None]).nonzero()  # [n, 3]: window, position, unit
        if nz.shape[0] == 0:
            return
        b, p, u = nz.unbind(1)
        v = z[b, p, u].float()
        if not self.signed and bool((v < 0).any()):
            raise InputError(f"unit {int(u[v < 0][0])} has negative activations ({float(v.min()):.4g}); build the "
                             "units with signed=True (histograms over both signs)")
        g = u * self.nb + self._bins(v)
        G = self.U * self.nb
        t["hist"] += torch.bincount(g, minlength=G).reshape(self.U, self.nb)
        t["count"] += torch.bincount(u, minlength=self.U)
        t["sum"].index_add_(0, u, v.double())
        if self.r == 0:
            return
        key = torch.rand(v.shape[0], generator=generator(self.seed, self.batches)).to(self.device)
        order, rank = self._rank_in_group(g, key)  # keep the r largest keys of each group in this batch
        cand = order[rank < self.r]
        cg, ck = g[cand], key[cand]
        touched = torch.unique(cg)
        m, r = touched.shape[0], self.r
        old_key = t["smp_key"][touched]  # [m, r]
        filled = old_key >= 0
        og = touched[:, None].expand(m, r)[filled]
        oslot = torch.arange(r, device=self.device).expand(m, r)[filled]
        all_g = torch.cat([og, cg])
        all_k = torch.cat([old_key[filled], ck])
        src = torch.cat([-1 - oslot, torch.arange(cand.shape[0], device=self.device)])  # < 0: old slot -1-src
        order2, rank2 = self._rank_in_group(all_g, all_k)
        win = order2[rank2 < r]
        slot = rank2[rank2 < r]
        row = torch.searchsorted(touched, all_g[win])
        s = src[win]
        is_new = s >= 0
        ci = cand[s.clamp(min=0)]
        tok, act = self._context(ids, z, b[ci], p[ci], u[ci])
        o_slot = (-1 - s).clamp(min=0)
        out_key = torch.full((m, r), -1.0, device=self.device)
        out = {"smp_val": torch.zeros(m, r, device=self.device),
               "smp_win": torch.full((m, r), -1, dtype=torch.long, device=self.device),
               "smp_pos": torch.full((m, r), -1, dtype=torch.long, device=self.device),
               "smp_tok": torch.full((m, r, self.L), -1, dtype=torch.int32, device=self.device),
               "smp_act": torch.zeros(m, r, self.L, device=self.device)}
        new_vals = {"smp_val": v[ci], "smp_win": b[ci] + first_window, "smp_pos": p[ci], "smp_tok": tok,
                    "smp_act": act}
        out_key[row, slot] = all_k[win].float()
        for name, buf in out.items():
            old_vals = t[name][touched][row, o_slot]
            nv = new_vals[name]
            mask = is_new.reshape(-1, *([1] * (nv.dim() - 1)))
            buf[row, slot] = torch.where(mask, nv.to(buf.dtype), old_vals)
        t["smp_key"][touched] = out_key
        for name, buf in out.items():
            t[name][touched] = buf
