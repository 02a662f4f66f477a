"""Activation patching and attribution patching over a grid of sites x positions, on any HF causal LM.

>>> res = activation_patching(model, clean, corrupted, logit_diff(" Monday", " Friday"),
...                           sites=["resid_post", "attn_out", "mlp_out"], tokenizer=tok)
>>> res.plot("patching.png"); res.table()[:3]
>>> est = attribution_patching(model, clean, corrupted, logit_diff(" Monday", " Friday"), tokenizer=tok)
>>> agreement(res, est)["spearman"]

A *cell* is one grid row (a site, or part of it: a subspace or MLP neurons) at one position. With
``direction="denoise"`` (default) the *source* run is the clean prompt and the patched (*base*) run
the corrupted one: a cell's effect is ``metric(corrupted run with that cell taken from the clean
run) - metric(corrupted run)``. ``direction="noise"`` swaps the roles.

Exact patching is built on :func:`interp.intervene` and :class:`interp.edits.Patch`: one reference
pass records every site of both prompts (clean and corrupted batched together when they have the
same length), then the cells run as the rows of batched forward passes over the base prompt (one
patched cell per row; ``batch_size`` rows a pass), so the unpatched runs are never repeated per cell.
Where the model's KV cache can be cut back (not sliding-window caches), a pass starts at its first
patched column and continues the base run's cached prefix: a causal model leaves the columns before
a patch as they were, so they are not recomputed either.
Attribution patching estimates every cell from one forward and one backward pass per prompt pair:
``(a_source - a_base) . d metric / d a`` at the base run, with the difference and the gradient
projected on the subspace (or restricted to the neurons) when only those are patched. The gradient is
taken through a zero added to each site's activation by the same hooks, so the forward pass is the
model's own, bit for bit.

Positions use the one positions grammar (:mod:`interp.positions`) on the base prompt; each picked
column is a grid column. Prompts of different lengths are refused unless ``source_positions`` picks
the matching columns of the source prompt (the same number). Several prompt pairs may be given
(lists); every pair must pick the same number of columns, and effects are averaged over pairs.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from interp.edits import Edit, Patch
from interp.errors import InputError
from interp.intervene import intervene
from interp.patching.grid import Pair, Plan, Row, grid_rows, plan
from interp.patching.result import PatchingResult
from interp.provenance import model_label
from interp.sites import unwrap
from interp.subspace import Subspace


class _Tap(Edit):
    """Records a site's activation; with ``grad``, adds a zero leaf tensor whose gradient is d metric / d act."""

    def __init__(self, store: dict, deltas: dict, site: str, grad: bool):
        self.store, self.deltas, self.site, self.grad = store, deltas, site, grad

    def __call__(self, x, ctx):
        if self.site in self.store:  # a module run twice: the first call is the site
            return x
        # a copy: a model may add into this tensor in place later in the pass (Falcon adds attention into its
        # MLP output), which would change what was recorded as the site's value
        self.store[self.site] = x.detach().clone()
        if not self.grad:
            return x
        delta = torch.zeros_like(x, requires_grad=True)
        self.deltas[self.site] = delta
        return x + delta


def _last_logits(model: nn.Module, ids: Tensor, cache=None) -> Tensor:
    """Next-token logits at the last column ``[b, vocab]`` (float32); ``cache``: the KV cache of the
    columns before ``ids``, which then continue that prefix."""
    params = inspect.signature(model.forward).parameters
    kw = {k: v for k, v in (("logits_to_keep", 1), ("use_cache", cache is not None)) if k in params}
    if cache is not None:
        kw[_cache_arg(model)] = cache
    out = model(input_ids=ids, **kw)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise InputError(f"{type(unwrap(model)).__name__} returns no logits; patching metrics read the next-token "
                         "logits of a causal language model (load it with its LM head, e.g. AutoModelForCausalLM)")
    return logits[:, -1].float()


def _cache_arg(model: nn.Module) -> str | None:
    """The forward argument that takes a KV cache (``cache`` in transformers >= 5.2, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _prefix_cache(model: nn.Module, ids: Tensor):
    """The KV cache of the base prompt (a ``DynamicCache``-like object that can be cropped and repeated),
    or None when the model gives none, so every patched run starts from column 0."""
    if _cache_arg(model) is None:
        return None
    with torch.no_grad():
        out = model(input_ids=ids[None], use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    ok = all(hasattr(cache, m) for m in ("crop", "batch_repeat_interleave", "get_seq_length"))
    sliding = getattr(cache, "is_sliding", False)  # a sliding-window layer cannot be cut back once full
    if not ok or not getattr(cache, "is_croppable", True) or any(sliding if isinstance(sliding, list) else [sliding]):
        return None
    try:
        if cache.get_seq_length() != ids.shape[0] or _cache_for(cache, 1, 2).get_seq_length() != 1:
            return None
    except (RuntimeError, ValueError, NotImplementedError):
        return None
    return cache


def _cache_for(cache, start: int, n: int):
    """A copy of the prefix cache cut to the first ``start`` columns, repeated for ``n`` rows."""
    cache = copy.deepcopy(cache)
    cache.crop(start - cache.get_seq_length())  # a negative count removes that many columns (every version)
    cache.batch_repeat_interleave(n)
    return cache


def _record(model, sites: list[str], ids: Tensor, grad: bool):
    """One forward over ``ids`` [b, seq] recording every site; returns (acts, last-token logits, deltas)."""
    store: dict[str, Tensor] = {}
    deltas: dict[str, Tensor] = {}
    with torch.set_grad_enabled(grad), intervene(model, {s: _Tap(store, deltas, s, grad) for s in sites}):
        logits = _last_logits(model, ids)
    return store, logits, deltas


def _reference(model, plan: Plan, pair: Pair, grad: bool, pair_index: int):
    """Both runs of a pair (batched when the lengths match): acts, bound metric, metrics, gradients at the base."""
    device = next(unwrap(model).parameters()).device
    b, s = pair.base.to(device), pair.source.to(device)
    if b.shape == s.shape:
        acts, logits, deltas = _record(model, plan.sites, torch.stack([b, s]), grad)
        base_acts = {k: v[0] for k, v in acts.items()}
        src_acts = {k: v[1] for k, v in acts.items()}
        base_logits, src_logits = logits[:1], logits[1:]
    else:
        with torch.no_grad():
            src, src_logits, _ = _record(model, plan.sites, s[None], False)
        base, base_logits, deltas = _record(model, plan.sites, b[None], grad)
        base_acts, src_acts = {k: v[0] for k, v in base.items()}, {k: v[0] for k, v in src.items()}
    clean_logits = src_logits if plan.direction == "denoise" else base_logits
    fn = plan.metric.bind(pair=pair_index, n_pairs=len(plan.pairs), clean_logits=clean_logits[0].detach(),
                          tokenizer=plan.tokenizer)
    with torch.set_grad_enabled(grad):
        m_base = fn(base_logits)
    grads = {}
    if grad:
        keys = list(deltas)
        got = torch.autograd.grad(m_base.sum(), [deltas[k] for k in keys], allow_unused=True)
        grads = {k: (torch.zeros_like(deltas[k]) if g is None else g)[0] for k, g in zip(keys, got)}
    with torch.no_grad():
        m_src = fn(src_logits)
    return base_acts, src_acts, grads, fn, float(m_base.detach()[0]), float(m_src[0])


def _exact_cells(model, pair: Pair, rows: list[Row], src_acts, fn, batch_size: int, bar) -> Tensor:
    """The metric of every cell, ``batch_size`` patched runs per forward pass. Cells run in column order;
    with a prefix cache, a pass starts at its first patched column (the columns before it are the base
    run's, which a causal model does not change) and continues the base run's cached prefix."""
    device = next(unwrap(model).parameters()).device
    n_cols, seq = pair.base_cols.numel(), pair.base.shape[0]
    base = pair.base.to(device)
    cache = _prefix_cache(model, base)
    cells = sorted(((r, k) for r in range(len(rows)) for k in range(n_cols)), key=lambda c: int(pair.base_cols[c[1]]))
    out = torch.empty(len(rows), n_cols)
    for start in range(0, len(cells), batch_size):
        chunk = cells[start:start + batch_size]
        n = len(chunk)
        first = min(int(pair.base_cols[k]) for _, k in chunk) if cache is not None else 0
        by_site: dict[str, list[int]] = {}
        for j, (r, _) in enumerate(chunk):
            by_site.setdefault(rows[r].site, []).append(j)
        edits, where = {}, {}
        for site, js in by_site.items():
            j_idx = torch.tensor(js)
            k_idx = torch.tensor([chunk[j][1] for j in js])
            mask = torch.zeros(n, seq, dtype=torch.bool)
            mask[j_idx, pair.base_cols[k_idx]] = True
            acts = src_acts[site]
            src = acts.new_zeros(n, acts.shape[-1])
            src[j_idx.to(device)] = acts[pair.source_cols[k_idx].to(device)]
            row = rows[chunk[js[0]][0]]
            if row.neurons is not None:
                nidx = torch.zeros(n, row.neurons.numel(), dtype=torch.long)
                nidx[j_idx] = torch.stack([rows[chunk[j][0]].neurons for j in js])
                edits[site] = Patch(src, neurons=nidx)
            else:
                edits[site] = Patch(src, row.subspace)
            where[site] = mask.to(device)
        prefix = _cache_for(cache, first, n) if first > 0 else None
        with torch.no_grad(), intervene(model, edits, positions=where):
            values = fn(_last_logits(model, base[first:][None].expand(n, -1), prefix)).cpu()
        for (r, k), v in zip(chunk, values):
            out[r, k] = v
        bar.update(1)
    return out


def _attribution_cells(pair: Pair, rows: list[Row], base_acts, src_acts, grads) -> Tensor:
    out = torch.empty(len(rows), pair.base_cols.numel())
    for r, row in enumerate(rows):
        dev = base_acts[row.site].device
        a_b = base_acts[row.site][pair.base_cols.to(dev)].float()
        diff = src_acts[row.site][pair.source_cols.to(dev)].float() - a_b
        g = grads[row.site][pair.base_cols.to(dev)].float()
        if row.subspace is not None:
            basis = row.subspace.basis.to(diff)
            out[r] = ((diff @ basis.T) * (g @ basis.T)).sum(-1).cpu()
        elif row.neurons is not None:
            idx = row.neurons.to(dev)
            out[r] = (diff[:, idx] * g[:, idx]).sum(-1).cpu()
        else:
            out[r] = (diff * g).sum(-1).cpu()
    return out


def _sweep(method: str, model, clean, corrupted, metric, *, sites, layers, positions, source_positions, subspace,
           neurons, per_neuron, direction, tokenizer, batch_size, progress) -> PatchingResult:
    t0 = time.perf_counter()
    grid = plan(model, clean, corrupted, metric, sites=sites, layers=layers, positions=positions,
                source_positions=source_positions, direction=direction, tokenizer=tokenizer, batch_size=batch_size,
                subspace=subspace, neurons=neurons, per_neuron=per_neuron)
    rows: list[Row] = []
    effects, base_m, src_m = [], [], []
    bar = None
    try:
        for i, pair in enumerate(grid.pairs):
            base_acts, src_acts, grads, fn, m_base, m_src = _reference(model, grid, pair, method == "attribution", i)
            if not rows:
                widths = {k: v.shape[-1] for k, v in base_acts.items()}
                rows = grid_rows(grid.sites, widths, subspace, neurons, per_neuron)
                n_chunks = -(-len(rows) * pair.base_cols.numel() // batch_size) * len(grid.pairs)
                show = progress if progress is not None else (method == "exact" and n_chunks > 1)
                bar = tqdm(total=n_chunks, desc=f"{method} patching", unit="batch", disable=not show)
            if method == "exact":
                eff = _exact_cells(model, pair, rows, src_acts, fn, batch_size, bar) - m_base
            else:
                eff = _attribution_cells(pair, rows, base_acts, src_acts, grads)
            effects.append(eff)
            base_m.append(m_base)
            src_m.append(m_src)
    finally:
        if bar is not None:
            bar.close()
    p0 = grid.pairs[0]
    return PatchingResult(
        method=method, direction=direction, metric=grid.metric.describe(), rows=[r.label for r in rows],
        sites=[r.site for r in rows], units=[r.unit for r in rows], positions=p0.base_cols.tolist(),
        source_positions=p0.source_cols.tolist(), tokens=grid.tokens, source_tokens=grid.source_tokens,
        effects=torch.stack(effects).float(), base_metric=torch.tensor(base_m), source_metric=torch.tensor(src_m),
        prompts=grid.prompts, model=model_label(unwrap(model)),
        seconds=time.perf_counter() - t0)


def activation_patching(model: nn.Module, clean, corrupted, metric, *, sites: str | Sequence[str] = "resid_post",
                        layers: Sequence[int] | None = None, positions=None, source_positions=None,
                        subspace: Subspace | Tensor | Mapping | None = None, neurons: Sequence[int] | str | None = None,
                        per_neuron: bool = False, direction: str = "denoise", tokenizer=None, batch_size: int = 32,
                        progress: bool | None = None) -> PatchingResult:
    """Exact patching of every cell of the grid ``sites x positions``; see the module docstring.

    Args:
        model: a Hugging Face causal LM in eval mode (or a TransformerLens bridge around one).
        clean, corrupted: a prompt each (text with ``tokenizer=``, or token ids), or lists of pairs.
        metric: ``logit_diff(target, baseline)``, ``prob(token)``, ``kl()``, a spec dict, or a callable
            ``logits [n, vocab] -> [n]`` (last-token logits).
        sites: site names and/or kinds expanded over ``layers`` (:data:`SITE_KINDS`, e.g. ``"resid_post"``,
            ``["resid_post", "attn_out", "mlp_out"]``, ``"mlp_post"`` for MLP neurons).
        layers: layers the kinds expand over (default: every layer).
        positions: columns of the patched run's prompt, any form of :mod:`interp.positions` (default: all).
        source_positions: the matching columns of the source prompt (needed when the lengths differ).
        subspace: patch only this subspace's component (a :class:`Subspace`, a ``[rank, width]`` basis, or
            ``{site: subspace}``).
        neurons: patch only these coordinates (indices, or ``"all"``); ``per_neuron=True`` makes each
            neuron its own grid row.
        direction: ``"denoise"`` (clean into corrupted) or ``"noise"`` (corrupted into clean).
        batch_size: patched runs per forward pass.

    Returns a :class:`PatchingResult`.
    """
    return _sweep("exact", model, clean, corrupted, metric, sites=sites, layers=layers, positions=positions,
                  source_positions=source_positions, subspace=subspace, neurons=neurons, per_neuron=per_neuron,
                  direction=direction, tokenizer=tokenizer, batch_size=batch_size, progress=progress)


def attribution_patching(model: nn.Module, clean, corrupted, metric, *, sites: str | Sequence[str] = "resid_post",
                         layers: Sequence[int] | None = None, positions=None, source_positions=None,
                         subspace: Subspace | Tensor | Mapping | None = None,
                         neurons: Sequence[int] | str | None = None, per_neuron: bool = False,
                         direction: str = "denoise", tokenizer=None) -> PatchingResult:
    """First-order estimate of :func:`activation_patching` (same arguments, same result type) from one
    forward and one backward pass per prompt pair: ``(a_source - a_base) . d metric / d a`` per cell,
    both projected on the subspace (or restricted to the neurons) when one is given."""
    return _sweep("attribution", model, clean, corrupted, metric, sites=sites, layers=layers, positions=positions,
                  source_positions=source_positions, subspace=subspace, neurons=neurons, per_neuron=per_neuron,
                  direction=direction, tokenizer=tokenizer, batch_size=1, progress=False)
