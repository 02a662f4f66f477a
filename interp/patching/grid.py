"""The grid of a patching sweep: sites (kinds expanded over layers), grid rows (a site, or part of
it), and prompt pairs with the columns the positions grammar picks in each.

Positions name columns of the patched (base) prompt in the one grammar of :mod:`interp.positions`;
``source_positions`` names the matching columns of the source prompt. A per-row form (``[[3], [4]]``,
``{token: [" Monday", " Friday"]}``) gives one entry per prompt pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor, nn

from interp.errors import InputError, SiteError
from interp.patching.metrics import Metric, as_metric
from interp.positions import Positions, as_positions
from interp.sites import find_blocks, resolve, unwrap
from interp.subspace import Subspace

SITE_KINDS = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
              "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "mlp_post": "mlp.hook_post"}
"""Short names expanded over layers by ``sites=`` (``"resid_post"`` -> ``blocks.L.hook_resid_post`` for every L)."""


def expand_sites(model: nn.Module, sites: str | Sequence[str], layers: Sequence[int] | None = None) -> list[str]:
    """Site names from kinds (:data:`SITE_KINDS`, expanded over ``layers``, default all) and full names."""
    items = [sites] if isinstance(sites, str) else list(sites)
    if not items:
        raise InputError(f"sites is empty; give a kind such as 'resid_post' ({list(SITE_KINDS)}) or site names")
    n = len(find_blocks(model))
    layer_list = list(range(n)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layer_list if not 0 <= x < n]
    if bad or not layer_list:
        raise InputError(f"layers {bad or '[]'} do not exist; this model has {n} blocks (layers 0..{n - 1})")
    out: list[str] = []
    for s in items:
        kind = SITE_KINDS.get(s, s if s in SITE_KINDS.values() else None)
        if kind is not None:
            out += [f"blocks.{layer}.{kind}" for layer in layer_list]
            continue
        try:
            resolve(model, s)
        except SiteError as e:
            raise SiteError(f"{e} (or a kind expanded over layers: {list(SITE_KINDS)})") from None
        out.append(s)
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Row:
    """One grid row: a site, and the part of its activation that is patched."""

    site: str
    unit: str = ""
    """'' (the whole activation), 'subspace', or the neurons ('n12', 'n3+n7')."""
    subspace: Subspace | None = None
    neurons: Int[Tensor, " k"] | None = None

    @property
    def label(self) -> str:
        return f"{self.site}[{self.unit}]" if self.unit else self.site


@dataclass
class Pair:
    base: Tensor  # [seq] token ids of the patched run
    source: Tensor  # [seq'] token ids of the source run
    base_cols: Tensor  # [K]
    source_cols: Tensor  # [K]


def _as_ids(prompts, tokenizer, what: str) -> tuple[list[Tensor], list]:
    if isinstance(prompts, (str, Tensor)):
        prompts = [prompts] if isinstance(prompts, str) or prompts.dim() == 1 else list(prompts)
    if not isinstance(prompts, Sequence) or not prompts:
        raise InputError(f"{what}: expected a prompt string, a list of them, or token ids [seq] / [pairs, seq]; got "
                         f"{type(prompts).__name__}{' (empty)' if isinstance(prompts, Sequence) else ''}")
    ids, shown = [], []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise InputError(f"{what} prompts are text, so the sweep needs tokenizer=... (interp.load_model "
                                 "returns one), or pass token ids")
            t = torch.as_tensor(tokenizer(p)["input_ids"], dtype=torch.long)
        else:
            t = torch.as_tensor(p, dtype=torch.long).reshape(-1)
        if t.numel() == 0:
            raise InputError(f"{what} prompt {p!r} has no tokens")
        ids.append(t)
        shown.append(p if isinstance(p, str) else t.tolist())
    return ids, shown


def _columns(pos: Positions, ids: Tensor, text, tokenizer, what: str) -> Tensor:
    """The columns a positions form picks in one prompt, in the form's order."""
    seq = ids.shape[0]
    try:  # what capture would read from a [1, seq, 1] tensor holding each column's index
        if pos.needs_text:
            pos = pos.bind(ids[None], None, tokenizer=tokenizer, texts=[text] if isinstance(text, str) else None)
        cols = pos.take(torch.arange(seq).view(1, seq, 1), torch.ones(1, seq, dtype=torch.long)).reshape(-1)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None
    if cols.numel() == 0:
        raise InputError(f"{what}={pos.spec!r} picks no column of the prompt ({seq} tokens)")
    return cols


def _pair_positions(spec, i: int, n_pairs: int, what: str) -> Positions:
    pos = as_positions(spec)
    if pos.needs_text and isinstance(pos.value, list):
        if len(pos.value) != n_pairs:
            raise InputError(f"{what}={pos.spec!r} gives {len(pos.value)} values for {n_pairs} prompt pairs; give one "
                             "per pair, or one for all")
        return as_positions({pos.kind: pos.value[i]})
    if pos.n_rows is not None and not pos.needs_text:
        if pos.n_rows != n_pairs:
            raise InputError(f"{what}={pos.spec!r} gives {pos.n_rows} rows for {n_pairs} prompt pairs; give one per "
                             "pair, or one for all")
        return pos.rows(i, i + 1)
    return pos


@dataclass
class Plan:
    """A checked sweep: the sites, the prompt pairs with their columns, the metric and the column labels."""

    sites: list[str]
    pairs: list[Pair]
    prompts: dict
    """``{clean: [...], corrupted: [...]}`` as given (text, or token id lists)."""
    metric: Metric
    tokens: list[str]
    """The patched prompt's token at each grid column (pair 0)."""
    source_tokens: list[str]
    direction: str
    tokenizer: object


def plan(model, clean, corrupted, metric, *, sites, layers, positions, source_positions, direction, tokenizer,
         batch_size, subspace, neurons, per_neuron) -> Plan:
    """Check every argument of a sweep (no forward pass) and tokenize the prompt pairs."""
    if subspace is not None and neurons is not None:
        raise InputError("give subspace= or neurons=, not both (a neuron set is the subspace of those coordinates)")
    if per_neuron and neurons is None:
        raise InputError("per_neuron=True needs neurons= (a list of neuron indices, or 'all')")
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' (clean activations into the corrupted run) or 'noise' "
                         f"(corrupted into clean); got {direction!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}")
    if unwrap(model).training:
        raise InputError("the model is in training mode (dropout would make every cell random); call model.eval()")
    site_list = expand_sites(model, sites, layers)
    clean_ids, clean_shown = _as_ids(clean, tokenizer, "clean")
    bad_ids, bad_shown = _as_ids(corrupted, tokenizer, "corrupted")
    if len(clean_ids) != len(bad_ids):
        raise InputError(f"{len(clean_ids)} clean prompts but {len(bad_ids)} corrupted ones; give one corrupted prompt "
                         "per clean prompt")
    if direction == "denoise":
        base_ids, src_ids, base_txt, src_txt = bad_ids, clean_ids, bad_shown, clean_shown
    else:
        base_ids, src_ids, base_txt, src_txt = clean_ids, bad_ids, clean_shown, bad_shown
    n = len(base_ids)
    pairs = []
    for i in range(n):
        b, s = base_ids[i], src_ids[i]
        where = "positions" if n == 1 else f"positions (pair {i})"
        cols = _columns(_pair_positions(positions, i, n, "positions"), b, base_txt[i], tokenizer, where)
        if source_positions is None:
            if b.shape[0] != s.shape[0]:
                raise InputError(f"pair {i}: the clean prompt has {clean_ids[i].shape[0]} tokens and the corrupted one "
                                 f"{bad_ids[i].shape[0]}; patching pairs columns one to one, so give source_positions= "
                                 "(the matching columns of the source prompt) or prompts of equal length")
            src_cols = cols
        else:
            src_cols = _columns(_pair_positions(source_positions, i, n, "source_positions"), s, src_txt[i],
                                tokenizer, "source_" + where)
            if src_cols.numel() != cols.numel():
                raise InputError(f"pair {i}: positions picks {cols.numel()} columns of the patched prompt but "
                                 f"source_positions picks {src_cols.numel()} of the source prompt; they pair one to "
                                 "one")
        if pairs and cols.numel() != pairs[0].base_cols.numel():
            raise InputError(f"positions picks {pairs[0].base_cols.numel()} columns in pair 0 but {cols.numel()} in "
                             f"pair {i}; the grid needs the same number in every pair")
        pairs.append(Pair(b, s, cols, src_cols))

    def show(t):
        return tokenizer.decode([int(t)]) if tokenizer is not None else str(int(t))

    p0 = pairs[0]
    return Plan(site_list, pairs, {"clean": clean_shown, "corrupted": bad_shown}, as_metric(metric),
                 [show(p0.base[c]) for c in p0.base_cols], [show(p0.source[c]) for c in p0.source_cols], direction,
                 tokenizer)


def grid_rows(sites: list[str], widths: Mapping[str, int], subspace, neurons, per_neuron: bool) -> list[Row]:
    """The grid rows: per site the whole activation, its subspace, its neuron set, or one row per neuron."""
    rows = []
    for site in sites:
        if subspace is not None:
            sub = subspace.get(site) if isinstance(subspace, Mapping) else subspace
            if sub is None:
                raise InputError(f"subspace has no entry for site {site!r}; it covers {sorted(subspace)}")
            sub = sub if isinstance(sub, Subspace) else Subspace(torch.as_tensor(sub).float())
            if sub.d_model != widths[site]:
                raise InputError(f"the subspace for {site!r} has width {sub.d_model} but the site's width is "
                                 f"{widths[site]}")
            rows.append(Row(site, "subspace", subspace=sub))
        elif neurons is not None:
            idx = torch.arange(widths[site]) if isinstance(neurons, str) and neurons == "all" else \
                torch.as_tensor(neurons, dtype=torch.long).reshape(-1)
            if idx.numel() == 0 or bool(((idx < 0) | (idx >= widths[site])).any()):
                raise InputError(f"neurons must be indices in 0..{widths[site] - 1} at {site!r} (or 'all'); got "
                                 f"{idx.tolist()[:8]}")
            groups = [idx[j:j + 1] for j in range(idx.numel())] if per_neuron else [idx]
            rows += [Row(site, "+".join(f"n{int(v)}" for v in g) if g.numel() <= 4 else f"{g.numel()} neurons",
                         neurons=g) for g in groups]
        else:
            rows.append(Row(site))
    return rows
