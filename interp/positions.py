"""Which positions an intervention edits, in absolute column indices that stay right under ``generate``.

A forward pass sees the columns ``[offset, offset + seq)`` of the full sequence: ``offset`` is 0 for
a plain forward or the prompt step of ``generate``, and the number of cached columns for a decode
step (which sees one column at a time). Columns count from the start of the tokenized input, left
padding included, the same indices :func:`interp.capture` uses.

==========================  =====================================================================
``None``                    every real token (padding is left untouched unless asked)
``"last"``                  the last real token of each forward pass (the prompt's last token,
                            then each newly generated token)
``int`` / ``[n]``           these absolute columns in every row; negative ones count back from the
                            end of the prompt (the first forward pass's length)
``[batch, n]`` / ragged     per-row absolute columns (``[[3, 7], [5]]``); the k-th column of a row
                            is its *slot* k, which pairs it with a source position when patching
``slice(a, b)``             columns ``a..b-1``; ``slice(a, None)`` also covers generated tokens
bool ``[batch, S]``         a per-token mask over absolute columns (columns past ``S`` are off)
==========================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interp.capture import last_token_index
from interp.errors import InputError

_PAD = -(1 << 40)  # marks the unused tail of a ragged per-row list


@dataclass(frozen=True)
class Selection:
    """Rows picked in one forward pass: ``value[batch_idx, col]`` with ``col`` local to the pass."""

    batch_idx: Int[Tensor, " n"]
    col: Int[Tensor, " n"]
    """Column inside this forward pass (absolute position = col + offset)."""
    slot: Int[Tensor, " n"] | None
    """Index into the explicit per-row position list (None for masks, slices, 'last', all)."""


class Positions:
    """A compiled ``positions=`` argument; see the module docstring for the accepted forms."""

    def __init__(self, spec=None, *, edit_padding: bool = False):
        self.spec = spec
        self.edit_padding = edit_padding
        self.kind, self.value = _compile(spec)

    def __repr__(self) -> str:
        return f"Positions({self.spec!r})"

    @property
    def is_all(self) -> bool:
        return self.kind == "all"

    def select(self, batch: int, seq: int, offset: int, prompt_len: int,
               mask: Bool[Tensor, "batch seq"] | None, device: torch.device) -> Selection | None:
        """The rows to edit in a forward pass over columns ``[offset, offset+seq)``; None = all."""
        kind, v = self.kind, self.value
        slot = None
        if kind == "all":
            if mask is None or self.edit_padding:
                return None
            sel = mask.bool()
        elif kind == "last":
            m = mask if mask is not None else torch.ones(batch, seq, dtype=torch.bool, device=device)
            last = last_token_index(m)
            keep = last >= 0
            idx = torch.arange(batch, device=device)[keep]
            return Selection(idx, last[keep], None)
        elif kind == "mask":
            full = v.to(device)
            if full.shape[0] not in (1, batch):
                raise InputError(f"positions mask has {full.shape[0]} rows; the batch has {batch}")
            window = torch.zeros(full.shape[0], seq, dtype=torch.bool, device=device)
            hi = min(full.shape[1], offset + seq)
            if hi > offset:
                window[:, : hi - offset] = full[:, offset:hi]
            sel = window.expand(batch, seq)
        elif kind == "slice":
            start, stop, step = v
            cols = torch.arange(offset, offset + seq, device=device)
            start = start + prompt_len if start < 0 else start
            stop = None if stop is None else (stop + prompt_len if stop < 0 else stop)
            ok = (cols >= start) & ((cols - start) % step == 0)
            if stop is not None:
                ok &= cols < stop
            sel = ok[None].expand(batch, seq)
        else:  # explicit columns [rows, n] with slots
            pos = v.to(device)
            if pos.shape[0] not in (1, batch):
                raise InputError(f"positions has {pos.shape[0]} rows; the batch has {batch}. Give one "
                                 "list for all rows or one per row")
            pos = pos.expand(batch, -1)
            real = pos != _PAD
            pos = torch.where(real & (pos < 0), pos + prompt_len, pos)
            if bool((real & (pos < 0)).any()):
                raise InputError(f"negative positions reach before the start of the prompt (length {prompt_len}): "
                                 f"{(pos[real & (pos < 0)] - prompt_len).tolist()}")
            local = pos - offset
            hit = real & (local >= 0) & (local < seq)
            b_idx, k_idx = hit.nonzero(as_tuple=True)
            col = local[b_idx, k_idx]
            if mask is not None and not self.edit_padding:
                keep = mask[b_idx, col].bool()
                b_idx, k_idx, col = b_idx[keep], k_idx[keep], col[keep]
            return Selection(b_idx, col, k_idx)
        if mask is not None and not self.edit_padding:
            sel = sel & mask.bool()
        b_idx, col = sel.nonzero(as_tuple=True)
        return Selection(b_idx, col, slot)


def _compile(spec):
    if spec is None:
        return "all", None
    if isinstance(spec, Positions):
        return spec.kind, spec.value
    if isinstance(spec, str):
        if spec != "last":
            raise InputError(f"positions={spec!r}: the named choices are 'last' (last real token of each "
                             "forward pass) and None (every real token)")
        return "last", None
    if isinstance(spec, slice):
        step = 1 if spec.step is None else int(spec.step)
        if step < 1:
            raise InputError(f"positions slice step must be >= 1, got {spec.step}")
        return "slice", (0 if spec.start is None else int(spec.start),
                         None if spec.stop is None else int(spec.stop), step)
    if isinstance(spec, bool):
        raise InputError("positions=True/False is ambiguous: pass None for all tokens or a [batch, seq] mask")
    if isinstance(spec, int):
        return "ints", torch.tensor([[spec]])
    if isinstance(spec, Tensor) and spec.dtype == torch.bool:
        if spec.dim() == 1:
            spec = spec[None]
        if spec.dim() != 2:
            raise InputError(f"a boolean positions mask must be [batch, seq]; got shape {tuple(spec.shape)}")
        return "mask", spec
    if isinstance(spec, Tensor):
        if spec.is_floating_point() or spec.dim() not in (1, 2):
            raise InputError(f"integer positions must be [n] or [batch, n]; got {spec.dtype} {tuple(spec.shape)}")
        return "ints", (spec[None] if spec.dim() == 1 else spec).long()
    if isinstance(spec, Sequence) and spec:
        if all(isinstance(p, (int,)) and not isinstance(p, bool) for p in spec):
            return "ints", torch.tensor([list(spec)])
        if all(isinstance(r, Sequence) for r in spec):
            width = max(len(r) for r in spec)
            return "ints", torch.tensor([list(r) + [_PAD] * (width - len(r)) for r in spec], dtype=torch.long)
    raise InputError(f"positions={spec!r} is not understood: use None, 'last', an int, a list of ints, "
                     "a list of per-row lists, a slice, an integer tensor or a boolean [batch, seq] mask")


def as_positions(spec, *, edit_padding: bool = False) -> Positions:
    """Compile a ``positions=`` argument (a :class:`Positions` passes through)."""
    if isinstance(spec, Positions) and spec.edit_padding == edit_padding:
        return spec
    return Positions(spec.spec if isinstance(spec, Positions) else spec, edit_padding=edit_padding)
