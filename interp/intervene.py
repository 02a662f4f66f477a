"""Write edited activations back into the model: forward passes, batches, ``generate`` and capture.

>>> with intervene(model, {"blocks.12.hook_resid_post": Rotate(circle, to="Friday")}, positions="last"):
...     logits = model(**batch).logits          # edited
...     out = model.generate(**batch)           # edited at every decode step the positions name
>>> logits = model(**batch).logits              # hooks are gone, even after an exception

Edits on several sites, or several edits on one site (a list), compose in forward order / list
order; nested ``with`` blocks compose (outer first) and unwind independently. For long-lived use,
``h = intervene(...).attach()`` ... ``h.remove()``. Only this module's hooks are added and removed
(by handle): transformers' own hooks are never touched.

Absolute positions stay right under ``generate`` with a KV cache: a pre-hook on the module that
runs the blocks reads how many columns are already cached (``cache`` / ``past_key_values`` /
``cache_position``) and the 2-D attention mask, so each decode step knows which column it is.
Without a cache (``generate(use_cache=False)``) every step runs over all columns again; a pass with
``use_cache=False`` whose ``input_ids`` extend the previous prompt pass's is read as such a step, so
``"last"`` and negative columns still count from the prompt's end and the same columns are edited as
with a cache.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from interp.edits import Edit, EditContext, as_edit
from interp.errors import InputError, SiteError
from interp.positions import Positions, as_positions, is_dict_form
from interp.precision import outside_stacklevel
from interp.sites import Site, add_write_hook, blocks_path, hooks_alive, remove_hooks, resolve, unwrap, warn_if_bridged


@dataclass
class _Pass:
    """What the current forward pass looks like, written by the pre-hook on the blocks' owner."""

    active: bool = False
    seq: int = 0
    offset: int = 0
    prompt_len: int = 0
    mask: Tensor | None = None  # [batch, seq] real-token mask of this pass; None = all real
    calls: int = 0
    edited: dict[str, int] = field(default_factory=dict)
    resolved: dict[int, Positions] = field(default_factory=dict)  # text selectors bound on the prompt pass
    prompt_ids: Tensor | None = None  # input_ids of the prompt pass (to know generate's steps without a cache)
    warned: set[str] = field(default_factory=set)  # sites already warned about positions on padding


_BATCH_ROWS: ContextVar[tuple[int, int] | None] = ContextVar("interp_batch_rows", default=None)


@contextmanager
def batch_rows(first: int, total: int) -> Iterator[None]:
    """Forward passes in this block run rows ``first..`` of a batch of `total` rows (``capture(batch_size=)``
    sets it for each chunk), so that per-row edit values and per-row positions, given for the whole batch,
    pair each row with its own prompt."""
    token = _BATCH_ROWS.set((first, total))
    try:
        yield
    finally:
        _BATCH_ROWS.reset(token)


def blocks_owner(model: nn.Module) -> nn.Module:
    """The module whose forward runs the transformer blocks (``LlamaModel``, ``GPT2Model`` ...)."""
    hf = unwrap(model)
    path, _ = blocks_path(hf)
    return hf.get_submodule(path.rsplit(".", 1)[0]) if "." in path else hf


def _cached_len(kwargs: dict) -> int:
    cp = kwargs.get("cache_position")
    if isinstance(cp, Tensor) and cp.numel():
        return int(cp.reshape(-1)[0])
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
            return int(cache[0][0].shape[-2])
    return 0


def _input_shape(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    for v in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(v, Tensor) and v.dim() >= 2:
            return v.shape[0], v.shape[1]
    return None


class PaddingWarning(UserWarning):
    """Explicit positions fell on padding in some rows, which were left unedited there."""


def _checked(new, rows: Tensor, name: str) -> Tensor:
    """An edit's output, refused unless it is a tensor of the rows' shape; in the rows' dtype."""
    if not isinstance(new, Tensor) or new.shape != rows.shape:
        got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise InputError(f"the edit at {name!r} returned {got} for rows of shape {tuple(rows.shape)}; an edit must "
                         "return a tensor of the shape it was given")
    return new.to(rows.dtype)


class Intervention:
    """Edits bound to sites; a context manager, or a handle with :meth:`attach` / :meth:`remove`."""

    def __init__(self, model: nn.Module, edits: Mapping[str | Site, Edit | Callable | list | tuple], *,
                 positions=None, edit_padding: bool = False, tokenizer=None):
        if not isinstance(edits, Mapping) or not edits:
            raise InputError("edits must be a non-empty dict {site name: edit}, e.g. "
                             "{'blocks.6.hook_resid_post': ProjectOut(subspace)}; got "
                             f"{type(edits).__name__}{' (empty)' if isinstance(edits, Mapping) else ''}")
        self.model = model
        sites = [resolve(model, s) for s in edits]
        warn_if_bridged(model)
        per_site = isinstance(positions, Mapping) and not is_dict_form(positions)
        pos_of = positions if per_site else {}
        unknown = set(pos_of) - {s if isinstance(s, str) else s.name for s in edits}
        if unknown:
            raise InputError(f"positions names sites {sorted(unknown)} that have no edit; edited sites: "
                             f"{[s.name for s in sites]}")
        self.bound: list[tuple[Site, Edit, Positions]] = []
        for key, site in zip(edits, sites):
            p = pos_of.get(key, None) if per_site else positions
            self.bound.append((site, as_edit(edits[key]), as_positions(p, edit_padding=edit_padding)))
        self.bound.sort(key=lambda t: t[0].order)
        self.tokenizer = tokenizer
        text = [p for _, _, p in self.bound if p.needs_text]
        if text and tokenizer is None:
            raise InputError(f"positions={text[0].spec!r} selects by text, so intervene needs tokenizer=... to read "
                             "the prompt's tokens (or bind it first with Positions.bind)")
        try:
            self._owner = blocks_owner(model)
        except SiteError as e:
            if "two stacks of blocks" not in str(e):
                raise
            raise SiteError(f"intervene edits models with one stack of blocks; {type(unwrap(model)).__name__} has an "
                            "encoder and a decoder (capture reads either through an HF module path, e.g. "
                            "'encoder.layers.0'; editing them is not supported)") from None
        self._pass = _Pass()
        self._handles: list = []
        self._depth = 0  # nested `with` blocks on this object

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Intervention({[s.name for s, _, _ in self.bound]}, {state})"

    @property
    def attached(self) -> bool:
        """Whether this intervention's hooks are registered (False also when something else removed them)."""
        return bool(self._handles) and hooks_alive(self._handles)

    @property
    def stats(self) -> dict[str, int]:
        """Rows edited so far at each site (counts every forward pass while attached)."""
        return dict(self._pass.edited)

    # -- hooks -----------------------------------------------------------------------------
    def _pre(self, _module, args, kwargs):
        st = self._pass
        shape = _input_shape(args, kwargs)
        st.active = shape is not None
        st.calls += 1
        if shape is None:
            return None
        b, s = shape
        st.seq = s
        st.offset = _cached_len(kwargs)
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        ids = args[0] if ids is None and args else ids
        ids = ids if isinstance(ids, Tensor) and not ids.is_floating_point() else None
        if st.offset == 0 and not self._continues_prompt(ids, kwargs):
            st.prompt_len = s
            st.prompt_ids = ids
            if self.tokenizer is not None:
                self._bind_text(ids, mask)
        st.mask = None
        if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[0] == b:
            if mask.shape[1] >= st.offset + s:
                window = mask[:, st.offset:st.offset + s]
            elif mask.shape[1] == s:
                window = mask
            else:
                window = None
            if window is not None and not bool(window.bool().all()):
                st.mask = window.bool()
        return None

    def _continues_prompt(self, ids: Tensor | None, kwargs: dict) -> bool:
        """Whether this pass is a step of ``generate(use_cache=False)``: it runs without a cache over the last
        prompt pass's tokens plus new ones. Positions then keep counting from that prompt's end, so the
        same columns are edited as with a cache."""
        p = self._pass.prompt_ids
        return (kwargs.get("use_cache") is False and ids is not None and p is not None and ids.shape[0] == p.shape[0]
                and ids.shape[1] > p.shape[1] and torch.equal(ids[:, :p.shape[1]], p.to(ids.device)))

    def _bind_text(self, ids: Tensor | None, mask) -> None:
        """Resolve text selectors to this prompt's columns (kept for the decode steps that follow); `ids` is the
        pass's token ids (None when it got embeddings)."""
        st = self._pass
        st.resolved = {}
        for i, (_, _, pos) in enumerate(self.bound):
            if not pos.needs_text:
                continue
            if ids is None:
                raise InputError(f"positions={pos.spec!r} selects by text, which needs input_ids; this forward pass "
                                 "got embeddings: bind it first with Positions.bind(input_ids, ...)")
            full = mask if isinstance(mask, Tensor) and tuple(mask.shape) == tuple(ids.shape) else None
            st.resolved[i] = pos.bind(ids, full, tokenizer=self.tokenizer)

    def _post(self, _module, _args, _output):
        self._pass.active = False

    def _write_fn(self, site: Site, edit: Edit, given: Positions, index: int):
        st = self._pass
        name = site.name

        def fn(value: Tensor) -> Tensor:
            pos = st.resolved.get(index, given) if given.needs_text else given
            if value.dim() < 3:
                raise InputError(f"site {name!r} produced shape {tuple(value.shape)}; interventions expect "
                                 "[batch, seq, d] activations")
            b, s = value.shape[:2]
            first, n_rows = _BATCH_ROWS.get() or (0, b)
            if first or n_rows != b:  # a chunk of a larger batch: per-row positions are the chunk's rows
                pos = pos.rows(first, first + b) if pos.n_rows == n_rows else pos
            if st.active and st.seq == s:
                offset, mask, prompt_len = st.offset, st.mask, st.prompt_len
            else:
                offset, mask, prompt_len = 0, None, s
            if mask is not None:
                mask = mask.to(value.device)
            if pos.is_all:
                ctx = EditContext(first + torch.arange(b, device=value.device)[:, None].expand(b, s),
                                  torch.arange(offset, offset + s, device=value.device)[None].expand(b, s), None, name,
                                  n_rows)
                new = _checked(edit(value, ctx), value, name)
                if mask is None or pos.edit_padding:
                    st.edited[name] = st.edited.get(name, 0) + b * s
                    return new
                # every real token: edit everything, keep padding as it was
                st.edited[name] = st.edited.get(name, 0) + int(mask.sum())
                return torch.where(mask[..., None], new, value)
            sel = pos.select(b, s, offset, prompt_len, mask, value.device)
            if sel.on_padding is not None and name not in st.warned:
                st.warned.add(name)
                rows = (sel.on_padding + first).tolist()
                warnings.warn(f"positions={pos.spec!r} fall on padding in rows {rows[:10]} at {name!r}, which stay "
                              "unedited there (columns count over the padded batch, negative ones from its end); "
                              "use positions='last' for each row's last real token, or edit_padding=True",
                              PaddingWarning, stacklevel=outside_stacklevel(sys._getframe(), through_torch=True))
            n = sel.batch_idx.numel()
            if n == 0:
                return value
            st.edited[name] = st.edited.get(name, 0) + n
            rows = value[sel.batch_idx, sel.col]
            ctx = EditContext(first + sel.batch_idx, sel.col + offset, sel.slot, name, n_rows)
            new = _checked(edit(rows, ctx), rows, name)
            return value.index_put((sel.batch_idx, sel.col), new)

        return fn

    def attach(self) -> Intervention:
        """Register the hooks (idempotent); returns self. If another library removed some of them
        (e.g. by clearing a module's hook dicts), they are registered again, with a warning."""
        if self._handles:
            if hooks_alive(self._handles):
                return self
            warnings.warn("some hooks of this intervention were removed by something else (another library "
                          "cleared a module's hooks); attaching them again", RuntimeWarning, stacklevel=2)
            remove_hooks(self._handles)
        handles: list = []
        try:
            handles.append(self._owner.register_forward_pre_hook(self._pre, with_kwargs=True))
            handles.append(self._owner.register_forward_hook(self._post, always_call=True))
            for i, (site, edit, pos) in enumerate(self.bound):
                handles += add_write_hook(site, self._write_fn(site, edit, pos, i))
        except BaseException:
            remove_hooks(handles)
            raise
        self._handles = handles
        return self

    def remove(self) -> None:
        """Remove exactly this intervention's hooks (safe to call twice)."""
        remove_hooks(self._handles)
        self._pass.active = False
        self._pass.prompt_ids = None  # a later attach starts from a fresh prompt (and holds no input tensor)

    def __enter__(self) -> Intervention:
        self.attach()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        # the same object entered again inside its own block: only the outermost exit removes the hooks
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self.remove()


def intervene(model: nn.Module, edits: Mapping[str | Site, Edit | Callable | list | tuple], *, positions=None,
              edit_padding: bool = False, tokenizer=None) -> Intervention:
    """Bind edits to sites of `model`: ``with intervene(model, {site: edit}): ...``.

    Args:
        model: a Hugging Face model (or a TransformerLens bridge around one).
        edits: ``{site: edit}``; an edit is an :class:`interp.edits.Edit`, a callable ``fn(x, ctx)``,
            or a list of them (applied in order).
        positions: which positions to edit, in the grammar of :mod:`interp.positions`: None (every
            real token), ``"last"``, absolute columns, per-row lists, a slice, a boolean mask,
            ``{"token": s}`` or ``{"chars": [a, b]}``; or a dict ``{site: positions}`` for different
            positions per site (a dict whose only key is ``token``, ``chars`` or ``slice`` is a form).
        edit_padding: also edit padded positions (default: padding is left untouched).
        tokenizer: reads the prompt's tokens for text selectors, which are bound on each prompt
            pass (the first forward pass of ``generate``, every plain forward).

    Returns an :class:`Intervention`: use it in a ``with`` block, or call ``.attach()`` and later
    ``.remove()``.
    """
    return Intervention(model, edits, positions=positions, edit_padding=edit_padding, tokenizer=tokenizer)
