"""Which token positions: one grammar for :func:`interp.capture`, :func:`interp.intervene`, the YAML
runner and :func:`interp.features.item_activations`.

Positions name *columns* of the tokenized input: column 0 is the first column of ``input_ids``, left
padding included. Every form has a spelling that YAML/JSON can hold, so a spec file and a Python
call read the same. ``b`` is the batch size, ``d`` the width of the site.

Each entry reads: form (Python) (YAML / JSON): picks; capture returns.

- `None`, `"all"` (`all` (or `null`)): every real token (padding is edited only with
  `edit_padding=True`); `[b, seq, d]` (padding included)
- `"last"` (`last`): the last real token of each row's prompt; under `generate`, then each new token
  (with or without a KV cache); `[b, d]`
- `3`, `[0, -1]` (`3`, `[0, -1]`): these columns in every row; negative ones count back from the end of
  the prompt; `[b, n, d]`
- `[[3, 7], [5, 6]]`, int `[b, n]` (`[[3, 7], [5, 6]]`): per-row columns; the k-th column of a row is its
  *slot* k (pairs it with a source position in `Patch`); `[b, n, d]`
- ragged `[[3, 7], [5]]` (`[[3, 7], [5]]`): per-row columns of different counts; `[n_picked, d]`
- `slice(a, b)`, `{"slice": [a, b]}` (`{slice: [a, b]}`): columns `a..b-1` (`b` None/null: to the end,
  generated tokens included; `[a, b, step]` too); `[b, n, d]`
- bool tensor `[b, seq]` (—): a per-token mask over columns; `[n_picked, d]`
- `token(" Monday")`, `{"token": " Monday"}` (`{token: " Monday"}`): in each row, the first token whose
  decoded text is exactly the string; a string the tokenizer splits picks the last token of the first
  run of whole tokens that spells it; `[b, d]`
- `chars(a, b)`, `{"chars": [a, b]}` (`{chars: [a, b]}`): the tokens overlapping characters `a..b-1` of
  each row's prompt text; `[n_picked, d]`

Text selectors (``token``, ``chars``) read the tokenizer: pass ``tokenizer=`` to ``capture`` /
``intervene``, or bind them to a batch with :meth:`Positions.bind`. A row where the string is not
found, or whose span covers no token, is an error naming the row. ``chars`` reads character offsets
(``return_offsets_mapping``), which only fast tokenizers give; others are refused. Both take one value
for every row or a list with one per row (``{token: [" Monday", " Friday"]}``), and a token string
may hold ``{field}`` placeholders filled per row by :meth:`Positions.fill` (the runner fills them from
each row's dataset fields, ``item_activations`` fills ``{item}`` with each prompt's item).

In ``capture`` an integer column outside ``-seq..seq-1`` raises; in ``intervene`` it may name a
column that ``generate`` has not reached yet. Padding is never edited unless ``edit_padding=True``; an
explicit column that falls on padding in some rows leaves them unedited there, and ``intervene`` warns
(``PaddingWarning``) once per site.

Under ``generate``, a forward pass sees the columns ``[offset, offset + seq)``: ``offset`` is 0 for
the prompt step and the number of cached columns for a decode step. Absolute columns, masks and
slices stay right across steps; text selectors are bound on the prompt step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int, Shaped
from torch import Tensor

from interp.errors import InputError

_PAD = -(1 << 40)  # marks the unused tail of a ragged per-row list
_FIELD = re.compile(r"\{(\w+)\}")
_TEXT = ("token", "chars")
_DECODE = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}


def last_token_index(mask: Int[Tensor, "batch seq"] | Bool[Tensor, "batch seq"]) -> Int[Tensor, " batch"]:
    """Index of the last real token of each row, for left or right padding."""
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, -1).max(dim=1).values


@dataclass(frozen=True)
class Picked:
    """Rows picked in one forward pass: ``value[batch_idx, col]`` with ``col`` local to the pass."""

    batch_idx: Int[Tensor, " n"]
    col: Int[Tensor, " n"]
    """Column inside this forward pass (absolute column = col + offset)."""
    slot: Int[Tensor, " n"] | None
    """Index into the explicit per-row column list (None for masks, slices, 'last', all)."""
    on_padding: Int[Tensor, " m"] | None = None
    """Rows where an explicit column of this pass fell on padding and was left unedited (None: none)."""


class Positions:
    """A compiled ``positions=`` argument; see the module docstring for the accepted forms."""

    def __init__(self, spec=None, *, edit_padding: bool = False):
        if isinstance(spec, Positions):  # a copy, bound or not
            self.__dict__.update(spec.__dict__, edit_padding=edit_padding)
            return
        self.spec = spec
        self.edit_padding = edit_padding
        self.kind, self.value = _compile(spec)
        self.one_per_row = self.kind in ("last", "token")
        """Exactly one column per row, so capture returns ``[batch, d]``."""

    def _with(self, kind: str, value, **changes) -> Positions:
        new = object.__new__(Positions)
        new.__dict__.update(self.__dict__, kind=kind, value=value, **changes)
        return new

    def __repr__(self) -> str:
        return f"Positions({self.spec!r})"

    @property
    def is_all(self) -> bool:
        return self.kind == "all"

    @property
    def needs_text(self) -> bool:
        """A text selector not yet bound to token ids (see :meth:`bind`)."""
        return self.kind in _TEXT

    @property
    def ragged(self) -> bool:
        return self.kind == "cols" and bool((self.value == _PAD).any())

    @property
    def n_rows(self) -> int | None:
        """Rows a per-row form was given for (None when it applies to any batch)."""
        if self.kind in ("cols", "mask") and self.value.shape[0] > 1:
            return int(self.value.shape[0])
        if self.kind in _TEXT and isinstance(self.value, list):
            return len(self.value)
        return None

    def rows(self, start: int, stop: int) -> Positions:
        """The positions of rows ``start..stop-1`` (per-row forms are sliced, others pass through)."""
        return self if self.n_rows is None else self._with(self.kind, self.value[start:stop])

    def fill(self, rows: Sequence[Mapping]) -> Positions:
        """Fill ``{field}`` placeholders of a token string per row, from that row's fields."""
        if self.kind != "token":
            return self
        texts = self.value if isinstance(self.value, list) else [self.value] * len(rows)
        if len(texts) != len(rows):
            raise InputError(f"positions token strings: {len(texts)} given for {len(rows)} rows; give one for "
                             "every row, or a single string")
        if not any(_FIELD.search(t) for t in texts):
            return self
        filled = []
        for i, (text, row) in enumerate(zip(texts, rows)):
            for name in _FIELD.findall(text):
                if name not in row:
                    raise InputError(f"positions token {text!r} names field {name!r}, which row {i} lacks; "
                                     f"its fields: {sorted(row)}")
            filled.append(_FIELD.sub(lambda m, row=row: str(row[m.group(1)]), text))
        return self._with("token", filled, spec={"token": filled})

    def bind(self, input_ids: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"] | None = None, *,
             tokenizer=None, texts: Sequence[str] | None = None) -> Positions:
        """Resolve a text selector to columns of this batch (other forms pass through unchanged).

        ``texts`` are the prompts the ids came from; without them ``chars`` offsets are read from the
        decoded ids (checked to tokenize back to the same ids).
        """
        if not self.needs_text:
            return self
        if tokenizer is None:
            raise InputError(f"positions={self.spec!r} selects by text, so a tokenizer is needed: pass tokenizer=... "
                             "(interp.load_model returns one), or select by column")
        ids = input_ids.detach().cpu().long().reshape(-1, input_ids.shape[-1])
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.detach().cpu().reshape(ids.shape)
        b = ids.shape[0]
        values = self.value if isinstance(self.value, list) else [self.value] * b
        if len(values) != b:
            raise InputError(f"positions={self.spec!r} gives {len(values)} values for a batch of {b} rows; give one "
                             "for every row, or a single one")
        real = [mask[i].bool().nonzero()[:, 0] for i in range(b)]
        if self.kind == "token":
            cols = []
            for i, (s, r) in enumerate(zip(values, real)):
                t = ids[i, r].tolist()
                k = _find_run(tokenizer, t, s)
                if k is None:
                    raise InputError(f"positions {{'token': {s!r}}}: row {i} "
                                     f"({_short(tokenizer.decode(t, **_DECODE))}) "
                                     f"has no token whose text is exactly {s!r}; mind the leading space, or select "
                                     "by {'chars': [a, b]}")
                cols.append([int(r[k])])
            return self._with("cols", torch.tensor(cols, dtype=torch.long))
        if not getattr(tokenizer, "is_fast", False):
            raise InputError(f"positions={self.spec!r} reads character offsets, which only fast tokenizers give; got "
                             f"{type(tokenizer).__name__}: load a fast one (use_fast=True) or select by "
                             "{'token': ...} or by column")
        out = torch.zeros_like(ids, dtype=torch.bool)
        for i, ((a, z), r) in enumerate(zip(values, real)):
            t = ids[i, r].tolist()
            text = None if texts is None else texts[i]
            for k, (s, e) in enumerate(_row_offsets(tokenizer, t, text, i)):
                if e > s and s < (z if z is not None else 1 << 62) and e > a:
                    out[i, r[k]] = True
            if not out[i].any():
                raise InputError(f"positions {{'chars': [{a}, {z}]}} covers no token of row {i} "
                                 f"({_short(text or tokenizer.decode(t, skip_special_tokens=True))}); "
                                 "character indices count from the start of the prompt text")
        return self._with("mask", out)

    def take(self, x: Shaped[Tensor, "batch seq d"], mask: Int[Tensor, "batch seq"],
             rows: Tensor | None = None) -> Tensor:
        """The picked rows of ``x`` (any dtype: activations, or column indices) in capture's output shape for
        this form (module docstring table). ``rows``: a boolean mask's :meth:`flat_index` for this batch, already on
        ``x``'s device (a caller taking from several tensors of one batch finds it once)."""
        kind, v = self.kind, self.value
        b, s = x.shape[:2]
        if kind == "all":
            return x
        if kind == "last":
            return x[torch.arange(b, device=x.device), last_token_index(mask).to(x.device)]
        if kind == "slice":
            return x[:, slice(*v)]
        if kind in _TEXT:
            raise InputError(f"positions={self.spec!r} selects by text: bind it to the token ids first "
                             "(Positions.bind, or pass tokenizer=)")
        if kind == "mask":
            flat = self.flat_index(b, s).to(x.device) if rows is None else rows
            return x.reshape(b * s, *x.shape[2:]).index_select(0, flat)
        pos = v.to(x.device)
        if pos.shape[0] not in (1, b):
            raise InputError(f"positions has {pos.shape[0]} rows; the batch has {b}. Give one list for all rows "
                             "or one per row")
        pos = pos.expand(b, -1)
        real = pos != _PAD
        bad = real & ((pos >= s) | (pos < -s))
        if bool(bad.any()):
            raise InputError(f"positions {pos[bad].tolist()} are out of range for sequences of length {s} "
                             f"(valid: {-s}..{s - 1})")
        pos = torch.where(real, pos % s, 0)
        got = torch.gather(x, 1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if self.one_per_row:
            return got[:, 0]
        return got[real] if self.ragged else got

    def flat_index(self, b: int, s: int) -> Tensor:
        """For a boolean mask: where the rows :meth:`take` picks sit in ``x.reshape(b * s, d)``, in its order (row by
        row), found where the mask lives (on the CPU, for a mask built there: no read back from a GPU). Callers that
        take from several tensors of one batch find it once (:func:`interp.capture.capture`)."""
        m = self.value
        if self.kind != "mask":
            raise InputError(f"flat_index is for a boolean positions mask, not positions={self.spec!r}")
        if m.shape[1] != s or m.shape[0] not in (1, b):
            raise InputError(f"a boolean positions mask must have shape [batch, seq] = {(b, s)}, got "
                             f"{tuple(m.shape)}; build it from the same tokenized inputs")
        return m.expand(b, s).reshape(-1).nonzero().squeeze(1)

    def select(self, batch: int, seq: int, offset: int, prompt_len: int,
               mask: Bool[Tensor, "batch seq"] | None, device: torch.device) -> Picked | None:
        """The rows to edit in a forward pass over columns ``[offset, offset+seq)``; None = all."""
        kind, v = self.kind, self.value
        if kind in _TEXT:
            raise InputError(f"positions={self.spec!r} selects by text: pass tokenizer= to intervene, or bind it "
                             "first with Positions.bind(input_ids, attention_mask, tokenizer=...)")
        if kind == "all":
            if mask is None or self.edit_padding:
                return None
            sel = mask.bool()
        elif kind == "last":
            # the prompt's last real token, then every new token: columns past the prompt (under generate)
            m = mask.bool() if mask is not None else torch.ones(batch, seq, dtype=torch.bool, device=device)
            new = (torch.arange(offset, offset + seq, device=device) >= prompt_len)[None]
            last = last_token_index(m & ~new)
            sel = m & new
            keep = last >= 0
            sel[torch.arange(batch, device=device)[keep], last[keep]] = True
            b_idx, col = sel.nonzero(as_tuple=True)
            return Picked(b_idx, col, None)
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
            # a negative start past the beginning counts from column 0, as Python's slicing (and capture) clamp it
            start = 0 if start is None else (max(start + prompt_len, 0) if start < 0 else start)
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
            skipped = None
            if mask is not None and not self.edit_padding:
                keep = mask[b_idx, col].bool()
                if not bool(keep.all()):
                    skipped = b_idx[~keep].unique()
                b_idx, k_idx, col = b_idx[keep], k_idx[keep], col[keep]
            return Picked(b_idx, col, k_idx, skipped)
        if mask is not None and not self.edit_padding:
            sel = sel & mask.bool()
        b_idx, col = sel.nonzero(as_tuple=True)
        return Picked(b_idx, col, None)


PositionsArg = Positions | None | str | int | slice | Sequence | Mapping | Tensor
"""Anything :class:`Positions` accepts (the module docstring's table)."""


def token(text: str | Sequence[str]) -> Positions:
    """``{"token": text}``: the token whose decoded text is `text` in each row (one string per row allowed)."""
    return Positions({"token": text if isinstance(text, str) else list(text)})


def chars(start: int, stop: int | None) -> Positions:
    """``{"chars": [start, stop]}``: the tokens overlapping characters ``start..stop-1`` of each prompt."""
    return Positions({"chars": [start, stop]})


def as_positions(spec: PositionsArg, *, edit_padding: bool = False) -> Positions:
    """Compile a ``positions=`` argument (a :class:`Positions` passes through, bound or not)."""
    if isinstance(spec, Positions):
        return spec if spec.edit_padding == edit_padding else spec._with(spec.kind, spec.value,
                                                                          edit_padding=edit_padding)
    return Positions(spec, edit_padding=edit_padding)


_FORMS = ("None, 'all', 'last', an int, a list of ints, a list of per-row lists, a slice, {'slice': [a, b]}, "
          "{'token': str}, {'chars': [a, b]}, an integer tensor or a boolean [batch, seq] mask")


def _compile(spec):
    if spec is None or (isinstance(spec, str) and spec == "all"):
        return "all", None
    if isinstance(spec, str):
        if spec != "last":
            raise InputError(f"positions={spec!r}: the named choices are 'last' (last real token of each "
                             "forward pass) and 'all' / None (every real token)")
        return "last", None
    if isinstance(spec, Mapping):
        return _compile_dict(spec)
    if isinstance(spec, slice):
        step = 1 if spec.step is None else int(spec.step)
        if step < 1:
            raise InputError(f"positions slice step must be >= 1, got {spec.step}")
        return "slice", (None if spec.start is None else int(spec.start),
                         None if spec.stop is None else int(spec.stop), step)
    if isinstance(spec, bool):
        raise InputError("positions=True/False is ambiguous: pass None for all tokens or a [batch, seq] mask")
    if isinstance(spec, int):
        return "cols", torch.tensor([[spec]])
    if isinstance(spec, Tensor) and spec.dtype == torch.bool:
        if spec.dim() == 1:
            spec = spec[None]
        if spec.dim() != 2:
            raise InputError(f"a boolean positions mask must be [batch, seq]; got shape {tuple(spec.shape)}")
        return "mask", spec
    if isinstance(spec, Tensor):
        if spec.is_floating_point() or spec.dim() not in (1, 2):
            raise InputError(f"integer positions must be [n] or [batch, n]; got {spec.dtype} {tuple(spec.shape)}")
        return "cols", (spec[None] if spec.dim() == 1 else spec).long()
    if isinstance(spec, Sequence) and spec:
        if all(_is_int(p) for p in spec):
            return "cols", torch.tensor([list(spec)], dtype=torch.long)
        if all(isinstance(r, Sequence) and r and all(_is_int(p) for p in r) for r in spec):
            width = max(len(r) for r in spec)
            return "cols", torch.tensor([list(r) + [_PAD] * (width - len(r)) for r in spec], dtype=torch.long)
    raise InputError(f"positions={spec!r} is not understood: use {_FORMS}")


def is_dict_form(spec) -> bool:
    """Whether `spec` is a dict form of the grammar (one key: ``token``, ``chars`` or ``slice``)."""
    return isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in ("slice", *_TEXT)


def _compile_dict(spec: Mapping):
    if not is_dict_form(spec):
        raise InputError(f"positions={dict(spec)!r}: a dict form has one key, 'token', 'chars' or 'slice'")
    key, v = next(iter(spec.items()))
    if key == "token":
        if isinstance(v, str) and v:
            return "token", v
        if isinstance(v, Sequence) and v and all(isinstance(s, str) and s for s in v):
            return "token", list(v)
        raise InputError(f"positions {{'token': {v!r}}}: give a non-empty string (or one per row), e.g. ' Monday'")
    pair = isinstance(v, Sequence) and len(v) == 2 and _is_int(v[0]) and (v[1] is None or _is_int(v[1]))
    if key == "chars":
        spans = [v] if pair else v
        ok = isinstance(spans, Sequence) and spans and all(
            isinstance(p, Sequence) and len(p) == 2 and _is_int(p[0]) and p[0] >= 0
            and (p[1] is None or (_is_int(p[1]) and p[1] > p[0])) for p in spans)
        if not ok:
            raise InputError(f"positions {{'chars': {v!r}}}: give [start, stop] with 0 <= start < stop (stop may be "
                             "null for the end of the text), or one such pair per row")
        return "chars", tuple(spans[0]) if pair else [tuple(p) for p in spans]
    if not (isinstance(v, Sequence) and 1 <= len(v) <= 3 and all(p is None or _is_int(p) for p in v)):
        raise InputError(f"positions {{'slice': {v!r}}}: give [start, stop] or [start, stop, step] (null for open)")
    return _compile(slice(*(list(v) + [None])[:max(2, len(v))]))


def _is_int(p) -> bool:
    return isinstance(p, int) and not isinstance(p, bool)


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _pieces(tok, ids: list[int], window: int = 4) -> list[tuple[int, str]]:
    """Each token's text in context, as ``(characters it removes from the end, text it adds)``.

    Decoding a token next to a few of its predecessors keeps the leading space that tokenizers drop
    at the start of a text; a token that completes a multi-byte character replaces the partial one.
    """
    out = []
    for j in range(len(ids)):
        k = max(0, j - window)
        before = tok.decode(ids[k:j], **_DECODE) if j > k else ""
        after = tok.decode(ids[k:j + 1], **_DECODE)
        n = 0
        while n < min(len(before), len(after)) and before[n] == after[n]:
            n += 1
        out.append((len(before) - n, after[n:]))
    return out


def _find_run(tok, ids: list[int], target: str) -> int | None:
    """Index of the last token of the first run of whole tokens whose text is exactly `target`."""
    pieces = _pieces(tok, ids)
    for i in range(len(ids)):
        text = ""
        for j in range(i, len(ids)):
            drop, add = pieces[j]
            if drop > len(text):  # the run would start inside a character
                break
            text = text[: len(text) - drop] + add
            if text == target:
                return j
            stem = text.rstrip("\ufffd")
            if len(stem) > len(target) or not target.startswith(stem):
                break
    return None


def _row_offsets(tok, ids: list[int], text: str | None, row: int) -> list[tuple[int, int]]:
    """Character offsets of a row's real tokens in its prompt text (the decoded ids when no text)."""
    text = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) if text is None else text
    for special in (True, False):
        enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return [tuple(o) for o in enc["offset_mapping"]]
    raise InputError(f"positions {{'chars': ...}}: row {row}'s token ids are not what its text {_short(text)} "
                     "tokenizes to, so its character offsets are unknown; pass the prompts as text")
