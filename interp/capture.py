"""Capture activations at several sites in one forward pass, stopping after the deepest one.

>>> acts = capture(model, ["Today is Monday."], ["blocks.6.hook_resid_post"], tokenizer=tok)
>>> acts["blocks.6.hook_resid_post"].shape        # [batch, seq, d_model]
>>> acts.attention_mask                            # which positions are real tokens

Only this module's hooks are added and removed (by handle, also when the forward raises), the
model's training flag, attention implementation and parameters are left as they were. Captured
tensors are the caller's: a value that would share memory with a tensor of the forward pass is
copied (the model may still modify it in place, as Falcon adds attention into its MLP output).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from interp.errors import InputError, SiteError
from interp.intervene import batch_rows
from interp.positions import PositionsArg, as_positions, last_token_index
from interp.sites import Site, add_read_hook, remove_hooks, resolve, unwrap, warn_if_bridged

__all__ = ["Activations", "as_batch", "capture", "last_token_index", "position_ids_for", "run_to_sites", "site_widths",
           "tokenize"]


class _StopForward(Exception):
    """Raised by the stop hook once every requested site has been recorded."""


class Activations(dict):
    """``{site name: tensor}`` plus the tokens and attention mask they came from."""

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]


def tokenize(tokenizer, texts: str | Sequence[str], **kwargs) -> dict[str, Tensor]:
    """Tokenize with padding; a tokenizer without a pad token pads with EOS (restored after)."""
    if tokenizer is None:
        raise InputError("inputs are text, so a tokenizer is needed: pass tokenizer=... "
                         "(interp.load_model returns one), or pass input_ids instead")
    texts = [texts] if isinstance(texts, str) else list(texts)
    had_pad = tokenizer.pad_token is not None
    if not had_pad:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, **kwargs)
    finally:
        if not had_pad:
            tokenizer.pad_token = None
    return dict(enc)


def _is_text(inputs) -> bool:
    return isinstance(inputs, str) or (isinstance(inputs, Sequence) and bool(inputs)
                                       and all(isinstance(x, str) for x in inputs))


def as_batch(inputs, tokenizer=None) -> dict[str, Tensor]:
    """Normalise text, token ids or a tokenizer's output to ``{input_ids, attention_mask, ...}``."""
    if _is_text(inputs):
        return tokenize(tokenizer, inputs)
    if isinstance(inputs, Tensor):
        if inputs.dtype not in (torch.int64, torch.int32) or inputs.dim() not in (1, 2):
            raise InputError(f"token ids must be an integer tensor [batch, seq] or [seq]; got "
                             f"{inputs.dtype} with shape {tuple(inputs.shape)}")
        ids = inputs.long().reshape(-1, inputs.shape[-1])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if isinstance(inputs, Mapping) and "input_ids" in inputs:
        batch = {k: v for k, v in inputs.items() if isinstance(v, Tensor)}
        ids = batch["input_ids"]
        if ids.dim() == 1:
            batch = {k: v.unsqueeze(0) for k, v in batch.items()}
        batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
        return batch
    raise InputError(
        "inputs must be a string, a list of strings (with tokenizer=), an integer tensor of token ids, "
        f"or a dict with 'input_ids' (a tokenizer's output); got {type(inputs).__name__}"
        + (" (empty)" if isinstance(inputs, Sequence) and not inputs else "")
    )


def position_ids_for(mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def derives_positions(hf: nn.Module) -> bool:
    """Whether the model numbers positions from its input ids itself, skipping its padding token and starting past
    it (RoBERTa, XLM-R, CamemBERT, ESM, ...: an embeddings module with ``create_position_ids_from_input_ids``).
    Positions counted from 0 are wrong there (every activation of RoBERTa was off by up to 2.5), so
    :func:`capture` passes none and the model's own are used."""
    known = _DERIVES.get(hf)
    if known is None:
        known = _DERIVES[hf] = any(callable(getattr(m, "create_position_ids_from_input_ids", None))
                                   for m in hf.modules())
    return known


_DERIVES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward_kwargs(hf: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    params = inspect.signature(hf.forward).parameters
    kw = {k: v for k, v in batch.items() if k in params or k in ("input_ids", "attention_mask")}
    if "position_ids" in params and "position_ids" not in kw and not derives_positions(hf):
        kw["position_ids"] = position_ids_for(batch["attention_mask"])
    if "use_cache" in params:
        kw["use_cache"] = False
    return kw


def run_to_sites(model: nn.Module, batch: dict[str, Tensor], sites: Sequence[Site], stop_early: bool = True):
    """Run the forward pass; with `stop_early`, raise out of it once the deepest site is reached.

    Returns the model output, or None when the pass was stopped early.
    """
    hf = unwrap(model)
    handles: list = []
    deepest = max(sites, key=lambda s: s.order)
    if stop_early and deepest.order[0] < (1 << 30):
        if deepest.block is not None and deepest.order[1] >= 6:  # raw path inside a block
            stop = Site("stop", deepest.block, "output", deepest.layer, deepest.order)
        else:
            stop = deepest

        def raise_stop(_value):
            raise _StopForward

        handles += add_read_hook(stop, raise_stop)
    device = next(hf.parameters()).device
    kw = _forward_kwargs(hf, {k: v.to(device) for k, v in batch.items()})
    try:
        with torch.no_grad():
            return hf(**kw)
    except _StopForward:
        return None
    finally:
        remove_hooks(handles)


def _own(kept: Tensor, value: Tensor) -> Tensor:
    """`kept`, copied if it shares memory with the forward pass's `value` (a view, or the tensor itself)."""
    if kept.device == value.device and kept.untyped_storage().data_ptr() == value.untyped_storage().data_ptr():
        return kept.clone()
    return kept


def _to(t: Tensor, device: str | torch.device, dtype: torch.dtype, pending: set) -> Tensor:
    """``t`` on ``device`` in ``dtype``. A CUDA tensor bound for CPU memory is copied into page-locked memory
    without the host waiting for it (a plain copy would wait for the device to reach this site, at every site of
    the pass); its device goes into ``pending``, and the caller waits for those devices once before reading any
    copy (:func:`capture` does, after the pass). The copy runs in the stream's order, before any later kernel
    that could reuse or change ``t``."""
    if t.device.type == "cuda" and torch.device(device).type == "cpu":
        src = t.to(dtype)
        host = torch.empty(src.shape, dtype=dtype, pin_memory=True)
        host.copy_(src, non_blocking=True)
        pending.add(t.device)
        return host
    return t.to(device=device, dtype=dtype)


def _check_ids(model: nn.Module, ids: Tensor) -> None:
    """Token ids outside the model's embedding table are refused here, not deep inside the embedding lookup."""
    hf = unwrap(model)
    vocab = getattr(hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None, "num_embeddings", None)
    if vocab is None or ids.is_floating_point():
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()
    if lo < 0 or hi >= vocab:
        raise InputError(f"input_ids hold token ids {lo}..{hi}, but the model's embedding has {vocab} rows "
                         f"(ids 0..{vocab - 1}); tokenize with this model's own tokenizer")


def capture(
    model: nn.Module,
    inputs,
    sites: str | Sequence[str],
    *,
    positions: PositionsArg = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    tokenizer=None,
    batch_size: int | None = None,
    stop_early: bool = True,
    progress: bool | None = None,
) -> Activations:
    """Capture the activations at `sites` for `inputs`.

    Args:
        model: a Hugging Face model, or a TransformerLens ``TransformerBridge`` around one.
        inputs: text (with ``tokenizer=``), token ids ``[batch, seq]``, or a tokenizer's output.
        sites: one name or several (see :mod:`interp.sites`); all are read in one forward pass.
        positions: which token columns to keep, in the grammar of :mod:`interp.positions`. The
            shape of each returned tensor follows the form:

            - None / ``"all"``: every column, padding included: ``[batch, seq, d]`` (see
              ``attention_mask``);
            - ``"last"`` (last real token) or ``{"token": s}`` (one token per row): ``[batch, d]``;
            - integers ``[n]``, ``[batch, n]`` or a slice: ``[batch, n, d]`` (an integer out of
              ``-seq..seq-1`` raises; a slice clips like Python's);
            - a boolean ``[batch, seq]`` mask, ``{"chars": [a, b]}`` or ragged per-row lists:
              ``[n_picked, d]``, rows in order.

            Text selectors (``token``, ``chars``) need ``tokenizer=``; ``chars`` offsets come from
            the text inputs (or, for token ids, from their decoded text).
        dtype: dtype of the returned tensors (default: the model's).
        tokenizer: tokenizes text inputs and reads text selectors.
        device: where the returned tensors live (default CPU, so GPU memory is not held). From a GPU to the CPU
            each site's rows are copied into page-locked memory as the pass runs, and the host waits for the
            copies once per batch, after the pass, instead of at every site.
        batch_size: split the rows into forward passes of this many (with a progress bar).
        stop_early: stop the forward pass after the deepest requested site.
    """
    names = [sites] if isinstance(sites, (str, Site)) else list(sites)
    if not names:
        raise InputError("sites is empty: name at least one site, e.g. 'blocks.6.hook_resid_post'")
    resolved = [resolve(model, n) for n in names]
    warn_if_bridged(model)
    batch = as_batch(inputs, tokenizer)
    n = batch["input_ids"].shape[0]
    if n == 0 or batch["input_ids"].shape[1] == 0:
        raise InputError(f"inputs hold no tokens (input_ids shape {tuple(batch['input_ids'].shape)})")
    _check_ids(model, batch["input_ids"])
    step = batch_size or n
    pos = as_positions(positions)
    if pos.needs_text:
        texts = [inputs] if isinstance(inputs, str) else list(inputs) if _is_text(inputs) else None
        pos = pos.bind(batch["input_ids"], batch["attention_mask"], tokenizer=tokenizer, texts=texts)
    if pos.n_rows not in (None, n):
        raise InputError(f"positions={pos.spec!r} gives {pos.n_rows} rows for {n} inputs; give one per input row, "
                         "or one for all rows")
    out: dict[str, list[Tensor]] = {s.name: [] for s in resolved}
    chunks = range(0, n, step)
    bar = tqdm(chunks, desc="capture", unit="batch",
               disable=not (progress if progress is not None else len(chunks) > 1))
    for start in bar:
        chunk = {k: v[start:start + step] for k, v in batch.items()}
        mask = chunk["attention_mask"]
        chunk_pos = pos.rows(start, start + step)
        got: dict[str, Tensor] = {}
        handles: list = []
        masks: dict[torch.device, Tensor] = {}  # the mask on each device a site ran on: moved there once a chunk
        shape = tuple(chunk["input_ids"].shape)
        # a boolean positions mask's picked rows: found once a chunk (where the mask lives), moved once per device
        found = chunk_pos.flat_index(*shape) if chunk_pos.kind == "mask" else None
        rows: dict[torch.device, Tensor] = {}
        pending: set = set()  # devices with copies to CPU memory still running

        def recorder(site: Site, got: dict[str, Tensor] = got, chunk_pos=chunk_pos, mask: Tensor = mask,
                     masks: dict = masks, rows: dict = rows, found=found, shape: tuple = shape, pending: set = pending):
            def record(value: Tensor) -> None:
                if site.name in got:  # a module called twice records its first call
                    return
                x = value.detach()
                if tuple(x.shape[:2]) != shape:
                    if x.dim() >= 2 and x.shape[0] == shape[0] * shape[1]:  # [batch * seq, ...] (OPT's fc1, a router)
                        x = x.reshape(*shape, *x.shape[1:])
                    elif chunk_pos.kind != "all":
                        raise SiteError(f"{site.name} outputs {tuple(x.shape)}, not [batch, seq, ...] = [{shape[0]}, "
                                        f"{shape[1]}, ...]: positions cannot pick its token columns. Capture it with "
                                        "positions=None, or pick a site whose output is per token")
                if x.device not in masks:
                    masks[x.device] = mask.to(x.device)
                picked = None
                if found is not None and tuple(x.shape[:2]) == shape:
                    if x.device not in rows:
                        rows[x.device] = found.to(x.device)
                    picked = rows[x.device]
                taken = chunk_pos.take(x, masks[x.device], picked)
                got[site.name] = _own(_to(taken, device, dtype or value.dtype, pending), value)
            return record

        try:
            for s in resolved:
                handles += add_read_hook(s, recorder(s))
            with batch_rows(start, n):  # edits active around capture pair per-row values with these rows
                run_to_sites(model, chunk, resolved, stop_early)
        finally:
            remove_hooks(handles)
            for dev in pending:  # every copy to CPU memory has landed before anything reads it
                torch.cuda.synchronize(dev)
        missing = [s.name for s in resolved if s.name not in got]
        if missing:
            raise SiteError(f"sites {missing} were registered but never reached by the forward pass of "
                            f"{type(unwrap(model)).__name__}; they cannot be captured on this model")
        for k, v in got.items():
            out[k].append(v)
    acts = Activations({k: torch.cat(v) for k, v in out.items()})
    acts.input_ids = batch["input_ids"]
    acts.attention_mask = batch["attention_mask"]
    return acts


def site_widths(model: nn.Module, sites: Sequence[str] | None = None) -> dict[str, int]:
    """``{site: width}`` for `sites` (default: every name :func:`interp.sites.site_names` lists), from one
    forward pass over two tokens, stopped after the deepest site."""
    from interp.sites import site_names

    names = list(sites) if sites is not None else site_names(model)
    acts = capture(model, torch.zeros((1, 2), dtype=torch.long), names)
    return {name: int(acts[name].shape[-1]) for name in names}
