"""Streaming per-unit statistics with memory bounded in the number of tokens.

:class:`Tracker` takes one batch of windows at a time (token ids ``[B, T]``, the positions that
count ``[B, T]`` and unit activations ``[B, T, U]``) and keeps, per unit:

* **top contexts**: the ``top_k`` windows with the largest activation (one per window, at its
  maximum), each with the window number, the position of the maximum, and the tokens and the unit's
  activations from ``left`` tokens before it to ``right`` after it. Each batch's windows are merged
  with the kept ones by (activation descending, window ascending), so among equal activations the
  earlier window wins (windows that start with the same tokens give equal activations there); only
  the winners that are new are written, into the slots of the ones they push out, and the slots are
  put in order (largest first) by :meth:`Tracker.state_dict` with ``ordered=True``.
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

:meth:`Tracker.update_rows` takes only the kept positions' activations ``[n, U]``, dense or as a
sparse COO tensor (an SAE's codes: a few active units a position). The per-batch work is on the
nonzero entries (window maxima by scatter, histogram, samples) and the new winners (their contexts
are looked up among the sorted nonzero entries), so nothing of size ``[B, T, U]`` is built, except
for signed units, whose window maxima must see the zeros too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class _Codes:
    """A batch's nonzero unit activations: window ``b``, position ``p``, unit ``u``, value ``v`` (``[n]``
    each, sorted by (row, unit)), ``key = row * U + u`` (ascending, for look-ups), and ``row_of [B, T]``
    (each kept position's row, -1 elsewhere)."""

    b: Tensor
    p: Tensor
    u: Tensor
    v: Tensor
    key: Tensor
    row_of: Tensor

    def at(self, b: Tensor, p: Tensor, u: Tensor, n_units: int) -> Tensor:
        """The activations at (window, position, unit) index tensors (broadcast); 0 where none is stored."""
        row = self.row_of[b, p]
        if self.key.numel() == 0:
            return torch.zeros(row.shape, device=row.device)
        q = row * n_units + u
        i = torch.searchsorted(self.key, q).clamp_max(self.key.numel() - 1)
        return torch.where((row >= 0) & (self.key[i] == q), self.v[i], 0.0)


class Tracker:
    """Top contexts, histograms and per-bin samples of `n_units` units over a stream of batches.

    Tensors (``state_dict()``): ``top_val``/``top_win``/``top_pos [U, top_k]``, ``top_tok``/``top_act
    [U, top_k, L]`` (``L = left + 1 + right``; token -1 outside the window, slots of value -inf empty),
    ``hist [U, n_bins_total]``, ``count [U]``, ``sum [U]`` (float64), and per histogram bin ``g = unit *
    n_bins_total + bin``: ``smp_key``/``smp_val``/``smp_win``/``smp_pos [G, samples_per_bin]``,
    ``smp_tok``/``smp_act [G, samples_per_bin, L]`` (key -1: empty slot).
    """

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
            "top_val": torch.full((U, k), -math.inf, **z), "top_win": torch.full((U, k), -1, dtype=torch.long, **z),
            "top_pos": torch.full((U, k), -1, dtype=torch.long, **z),
            "top_tok": torch.full((U, k, L), -1, dtype=torch.int32, **z), "top_act": torch.zeros(U, k, L, **z),
            "hist": torch.zeros(U, self.nb, dtype=torch.long, **z), "count": torch.zeros(U, dtype=torch.long, **z),
            "sum": torch.zeros(U, dtype=torch.float64, **z),
            "smp_key": torch.full((G, r), -1.0, **z), "smp_val": torch.zeros(G, r, **z),
            "smp_win": torch.full((G, r), -1, dtype=torch.long, **z),
            "smp_pos": torch.full((G, r), -1, dtype=torch.long, **z),
            "smp_tok": torch.full((G, r, L), -1, dtype=torch.int32, **z), "smp_act": torch.zeros(G, r, L, **z),
        }

    # -- persistence -----------------------------------------------------------------------------
    def state_dict(self, ordered: bool = False) -> dict[str, Tensor]:
        """Every tensor of the state (on the CPU), plus ``n_tokens`` and ``batches`` as 0-d tensors; with
        `ordered`, each unit's top slots sorted by activation (descending), then window (ascending)."""
        out = {k: v.cpu().contiguous() for k, v in self.t.items()}
        if ordered:
            order = _order(out["top_val"], out["top_win"])
            for name in ("top_val", "top_win", "top_pos"):
                out[name] = out[name].gather(1, order)
            for name in ("top_tok", "top_act"):
                out[name] = out[name].gather(1, order[..., None].expand_as(out[name])).contiguous()
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
    @torch.no_grad()
    def update(self, ids: Tensor, keep: Tensor, z: Tensor, first_window: int) -> None:
        """Add a batch: token ids ``[B, T]``, the positions that count ``[B, T]`` (bool), unit activations
        ``[B, T, U]``, which must be 0 wherever `keep` is False; `first_window` is the number of the
        batch's first window in the whole stream."""
        B, T, U = z.shape
        if U != self.U or ids.shape != (B, T) or keep.shape != (B, T):
            raise InputError(f"batch shapes ids {tuple(ids.shape)}, keep {tuple(keep.shape)}, activations "
                             f"{tuple(z.shape)} do not match [B, T] and [B, T, n_units={self.U}]")
        self.update_rows(ids, keep, z[keep.to(z.device)], first_window)

    @torch.no_grad()
    def update_rows(self, ids: Tensor, keep: Tensor, rows: Tensor, first_window: int) -> None:
        """:meth:`update` given only the kept positions' activations: `rows` ``[n, U]`` holds one row per
        True entry of `keep`, in row-major order (``rows = z[keep]``), dense or as a sparse COO tensor
        (the entries it does not store, and stored zeros, are 0). Nothing of size ``[B, T, U]`` is built
        (except for signed units, whose window maxima need the zeros)."""
        B, T = ids.shape
        n = int(keep.sum())
        if keep.shape != (B, T) or rows.dim() != 2 or tuple(rows.shape) != (n, self.U):
            raise InputError(f"batch shapes ids {tuple(ids.shape)}, keep {tuple(keep.shape)}, rows "
                             f"{tuple(rows.shape)} do not match [B, T] and [n_kept={n}, n_units={self.U}]")
        ids, keep, rows = ids.to(self.device), keep.to(self.device), rows.to(self.device)
        if rows.is_sparse:
            rows = rows.coalesce()  # indices sorted by (row, unit), as nonzero() lists a dense tensor's
            r, u = rows.indices()
            v = rows.values()
            fired = v != 0
            r, u, v = r[fired], u[fired], v[fired]
        else:
            r, u = rows.nonzero().unbind(1)
            v = rows[r, u]
        kept = keep.nonzero()
        row_of = torch.full((B, T), -1, dtype=torch.long, device=self.device)
        row_of[keep] = torch.arange(n, device=self.device)
        c = _Codes(b=kept[r, 0], p=kept[r, 1], u=u, v=v.float(), key=r * self.U + u, row_of=row_of)
        self._update_top(ids, keep, c, first_window)
        self._update_bins(ids, c, first_window)
        self.n_tokens += n
        self.batches += 1

    def _context(self, ids: Tensor, c: _Codes, b: Tensor, t: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens and activations of unit ``u`` around position ``t`` of window ``b`` (flat index tensors)."""
        T = ids.shape[1]
        p = t[:, None] + torch.arange(-self.left, self.right + 1, device=t.device)
        valid = (p >= 0) & (p < T)
        pc = p.clamp(0, T - 1)
        tok = ids[b[:, None], pc].to(torch.int32).masked_fill(~valid, -1)
        act = c.at(b[:, None], pc, u[:, None], self.U).masked_fill(~valid, 0.0)
        return tok, act

    def _update_top(self, ids: Tensor, keep: Tensor, c: _Codes, first_window: int) -> None:
        t = self.t
        B, T = ids.shape
        U = self.U
        first_pos = zm = None
        if self.signed:  # positions left out count as -inf, kept zeros as 0 (which may exceed a negative maximum)
            zm = torch.full((B, T, U), -math.inf, device=self.device)
            zm[keep] = 0.0
            zm[c.b, c.p, c.u] = c.v
            win_max = zm.amax(dim=1).T  # [U, B]
        else:  # from the nonzero entries only (sparse codes: a few active units a position)
            cell = c.u * B + c.b  # (unit, window) flattened as [U, B]
            win_max = torch.full((U * B,), -math.inf, device=self.device).scatter_reduce_(0, cell, c.v, "amax")
            at_max = c.v == win_max[cell]  # the first position holding each window's maximum
            first_pos = torch.full((U * B,), T, dtype=torch.long, device=self.device).scatter_reduce_(
                0, cell[at_max], c.p[at_max], "amin")
            win_max = win_max.view(U, B).masked_fill(win_max.view(U, B) <= 0, -math.inf)  # never fires: -inf
        wins = torch.arange(first_window, first_window + B, device=self.device).expand_as(win_max)
        src = _insert(t["top_val"], t["top_win"], win_max, wins)  # updates top_val and top_win in place
        dst = (src >= 0).nonzero()
        if dst.shape[0] == 0:
            return
        u, slot = dst[:, 0], dst[:, 1]
        b = src[u, slot]
        if zm is not None:
            pos = zm[b[:, None], torch.arange(T, device=self.device), u[:, None]].argmax(dim=1)  # first maximum
        else:
            pos = first_pos[u * B + b]
        tok, act = self._context(ids, c, b, pos, u)
        t["top_pos"][u, slot] = pos
        t["top_tok"][u, slot] = tok
        t["top_act"][u, slot] = act.masked_fill(act == -math.inf, 0.0)

    def _bins(self, v: Tensor) -> Tensor:
        b = torch.bucketize(v.abs().float(), self.inner, right=True)
        if not self.signed:
            return b
        return torch.where(v > 0, self.n_bins + b, self.n_bins - 1 - b)

    def _update_bins(self, ids: Tensor, c: _Codes, first_window: int) -> None:
        t = self.t
        if c.v.shape[0] == 0:
            return
        b, p, u, v = c.b, c.p, c.u, c.v
        if not self.signed and bool((v < 0).any()):
            raise InputError(f"unit {int(u[v < 0][0])} has negative activations ({float(v.min()):.4g}); build the "
                             "units with signed=True (histograms over both signs)")
        g = u * self.nb + self._bins(v)
        t["hist"] += torch.bincount(g, minlength=self.U * self.nb).reshape(self.U, self.nb)
        t["count"] += torch.bincount(u, minlength=self.U)
        t["sum"].index_add_(0, u, v.double())
        if self.r == 0:
            return
        key = torch.rand(v.shape[0], generator=generator(self.seed, self.batches)).to(self.device)
        order = torch.argsort(g.double() * 2 + (1 - key.double()), stable=True)  # by group, largest key first
        gs = g[order]
        first = torch.ones_like(gs, dtype=torch.bool)
        first[1:] = gs[1:] != gs[:-1]
        touched = gs[first]
        row = torch.cumsum(first.long(), 0) - 1
        ar = torch.arange(gs.shape[0], device=self.device)
        rank = ar - torch.cummax(torch.where(first, ar, torch.zeros_like(ar)), 0).values
        top = rank < self.r  # the r largest keys of each group in this batch
        m = touched.shape[0]
        new_key = torch.full((m, self.r), -1.0, device=self.device)
        new_idx = torch.zeros((m, self.r), dtype=torch.long, device=self.device)
        new_key[row[top], rank[top]] = key[order[top]]
        new_idx[row[top], rank[top]] = order[top]
        keys, wins = t["smp_key"][touched], torch.zeros((m, self.r), dtype=torch.long, device=self.device)
        src = _insert(keys, wins, new_key, torch.ones_like(new_idx))
        dst = (src >= 0).nonzero()
        if dst.shape[0] == 0:
            return
        gi, slot = touched[dst[:, 0]], dst[:, 1]
        ci = new_idx[dst[:, 0], src[dst[:, 0], dst[:, 1]]]
        tok, act = self._context(ids, c, b[ci], p[ci], u[ci])
        t["smp_key"][gi, slot] = key[ci]
        t["smp_val"][gi, slot] = v[ci]
        t["smp_win"][gi, slot] = b[ci] + first_window
        t["smp_pos"][gi, slot] = p[ci]
        t["smp_tok"][gi, slot] = tok
        t["smp_act"][gi, slot] = act


def _order(val: Tensor, win: Tensor) -> Tensor:
    """Per row, the column order by value (descending), then window (ascending): two stable sorts."""
    by_win = torch.argsort(win, dim=1, stable=True)
    by_val = torch.argsort(val.gather(1, by_win), dim=1, descending=True, stable=True)
    return by_win.gather(1, by_val)


def _insert(val: Tensor, win: Tensor, new_val: Tensor, new_win: Tensor) -> Tensor:
    """Insert new entries ``[R, c]`` into each row's ``k`` slots ``[R, k]``, in place, one column at a
    time: an entry replaces the row's worst slot (lowest value; among equal values the latest window)
    when its value is strictly larger, so each row ends with its best ``k`` of old and new by (value
    descending, window ascending), provided new windows come after the old ones. Returns ``[R, k]``:
    the new column now in each slot, or -1."""
    R, k = val.shape
    # only rows where some new entry beats the current worst slot can change (the worst only rises)
    live = (new_val > val.min(dim=1).values[:, None]).any(dim=1).nonzero().flatten()
    if live.numel() == R:
        return _insert_rows(val, win, new_val, new_win)
    src = torch.full((R, k), -1, dtype=torch.long, device=val.device)
    if live.numel():
        v, w = val[live], win[live]
        src[live] = _insert_rows(v, w, new_val[live], new_win[live])
        val[live], win[live] = v, w
    return src


def _insert_rows(val: Tensor, win: Tensor, new_val: Tensor, new_win: Tensor) -> Tensor:
    """:func:`_insert` on every row."""
    R, k = val.shape
    src = torch.full((R, k), -1, dtype=torch.long, device=val.device)
    rows = torch.arange(R, device=val.device)
    lowest = torch.iinfo(torch.long).min
    for c in range(new_val.shape[1]):
        worst = val.min(dim=1).values
        better = new_val[:, c] > worst
        if not bool(better.any()):
            continue
        slot = torch.where(val == worst[:, None], win, lowest).argmax(dim=1)
        r, s = rows[better], slot[better]
        val[r, s] = new_val[r, c]
        win[r, s] = new_win[r, c]
        src[r, s] = c
    return src
