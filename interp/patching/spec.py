"""Patching sweeps from a declarative spec (YAML or JSON): what ``interp patch SPEC`` runs.

A spec (paths in it, ``out`` included, are relative to the file; a ``--out`` flag to the working folder)::

    model: smollm2-135m                         # name or path (interp.load_model)
    clean: "I will see you on Monday. To repeat, I will see you on"
    corrupted: "I will see you on Friday. To repeat, I will see you on"
    # or several pairs:  pairs: [{clean: ..., corrupted: ..., day: Monday}, ...]
    # or a file:         dataset: {path: pairs.jsonl, clean_field: clean, corrupted_field: corrupted, limit: 20}
    metric: {type: logit_diff, target: " Monday", baseline: " Friday"}   # or {type: prob, token}, {type: kl}
    sites: [resid_post, attn_out, mlp_out]      # kinds expanded over layers, or site names
    layers: [0, 5, 10]                          # layers the kinds expand over (default: all)
    positions: all                              # any form of interp.positions, on the patched prompt
    source_positions: null                      # the matching columns of the source prompt (unequal lengths)
    method: both                                # exact | attribution | both
    direction: denoise                          # denoise: clean into corrupted; noise: corrupted into clean
    subspace: null                              # folder of a saved Subspace: patch only its component
    neurons: null                               # [i, j, ...] or all: patch only these coordinates
    per_neuron: false                           # each neuron its own grid row
    batch_size: 32                              # patched runs per forward pass
    device: null                                # default: CUDA when available
    out: patch_out

Strings of the metric and of a ``{token: ...}`` position holding ``{field}`` are filled per pair from
that pair's fields (``target: " {day}"``), so every pair may read its own answer.

Writes into ``out``: for each method run, ``exact.csv`` / ``exact.json`` / ``exact.png`` and
``attribution.csv`` / ``.json`` / ``.png`` (fields: :mod:`interp.patching.result`), and
``summary.json``: ``model``, ``spec`` (the spec as run, ``pairs`` included), ``clean_metric`` and
``corrupted_metric`` (means over pairs), ``top`` (per method, the 10 cells with the largest
|effect|, as table rows), ``seconds`` (per method) and, when both methods ran, ``agreement``
(:func:`interp.patching.agreement` of attribution against exact: ``spearman``, ``pearson``,
``sign_agreement``, ``top_overlap``, ``per_row_spearman``, ``disagreements``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from interp.atomic import write_json
from interp.errors import InputError
from interp.intervene_spec import check_keys, read_rows
from interp.patching.metrics import as_metric, fill_fields
from interp.patching.result import PatchingResult, agreement
from interp.patching.sweep import activation_patching, attribution_patching
from interp.positions import as_positions

_KEYS = {"model", "clean", "corrupted", "pairs", "dataset", "metric", "sites", "layers", "positions",
         "source_positions", "method", "direction", "subspace", "neurons", "per_neuron", "batch_size", "device", "out"}


@dataclass(frozen=True, kw_only=True)
class PatchSpec:
    """A validated patching sweep."""

    model: str
    """Model name or path for interp.load_model."""
    pairs: tuple[dict, ...]
    """One dict per prompt pair: its clean and corrupted prompts, and fields for {field} placeholders."""
    metric: dict
    """Metric spec: {type: logit_diff, target, baseline}, {type: prob, token} or {type: kl}."""
    sites: tuple[str, ...] = ("resid_post",)
    """Site kinds expanded over the layers (resid_pre, resid_mid, resid_post, attn_out, mlp_out, mlp_post) or site
    names."""
    layers: tuple[int, ...] | None = None
    """Layers the site kinds expand over (default: every layer)."""
    positions: Any = None
    """Columns of the patched prompt, any form of the positions grammar (default: every column)."""
    source_positions: Any = None
    """The matching columns of the source prompt, needed when the two prompts differ in length."""
    method: Literal["exact", "attribution", "both"] = "exact"
    """exact (every cell run), attribution (gradient estimate) or both, with their agreement."""
    direction: Literal["denoise", "noise"] = "denoise"
    """denoise: clean activations into the corrupted run; noise: corrupted into clean."""
    subspace: str | None = None
    """Folder of a saved Subspace: patch only its component."""
    neurons: Any = None
    """Patch only these coordinates: a list of indices, or 'all'."""
    per_neuron: bool = False
    """Make each neuron its own grid row."""
    batch_size: int = 32
    """Patched runs per forward pass (exact patching)."""
    device: str | None = None
    """Device of the model (default: CUDA when available)."""
    out: str = "patch_out"
    """Output folder."""

    def __post_init__(self) -> None:
        if not self.pairs:
            raise InputError("spec: no prompt pairs; give clean: and corrupted:, pairs: [...] or dataset: {path: ...}")
        for i, p in enumerate(self.pairs):
            if not (isinstance(p.get("clean"), str) and isinstance(p.get("corrupted"), str)):
                raise InputError(f"spec pair {i}: needs 'clean' and 'corrupted' prompt strings; got keys {sorted(p)}")
        _check_choices({"method": self.method, "direction": self.direction})
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise InputError(f"spec.batch_size must be a positive integer; got {self.batch_size!r}")
        if isinstance(self.sites, str) or not self.sites or not all(isinstance(s, str) for s in self.sites):
            raise InputError(f"spec.sites must be a list of site kinds or names; got {self.sites!r}")
        if self.layers is not None and not all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers):
            raise InputError(f"spec.layers must be a list of layer numbers; got {self.layers!r}")
        as_metric(self.metric)
        for key in ("positions", "source_positions"):
            try:
                as_positions(getattr(self, key))
            except InputError as e:
                raise InputError(f"spec.{key}: {e}") from None


_CHOICES = {"method": ("exact", "attribution", "both"), "direction": ("denoise", "noise")}


def _check_choices(values: Mapping) -> None:
    """One-line errors for the keys with a fixed set of values (checked before the spec is built)."""
    for key, allowed in _CHOICES.items():
        if key in values and values[key] not in allowed:
            raise InputError(f"spec.{key} must be {', '.join(allowed[:-1])} or {allowed[-1]}; got {values[key]!r}")


def _pairs(raw: Mapping, base: Path) -> list[dict]:
    given = [k for k in ("clean", "pairs", "dataset") if k in raw]
    if len(given) != 1:
        raise InputError(f"spec: give exactly one of clean:/corrupted:, pairs: or dataset:; got {given or 'none'}")
    if "clean" in raw:
        clean, bad = raw["clean"], raw.get("corrupted")
        clean, bad = ([clean], [bad]) if isinstance(clean, str) else (clean, bad)
        if not isinstance(clean, list) or not isinstance(bad, list) or len(clean) != len(bad):
            raise InputError("spec: clean and corrupted must both be a prompt or lists of the same length")
        return [{"clean": c, "corrupted": b} for c, b in zip(clean, bad)]
    if "pairs" in raw:
        if not isinstance(raw["pairs"], list) or not all(isinstance(p, Mapping) for p in raw["pairs"]):
            raise InputError("spec.pairs must be a list of {clean: ..., corrupted: ..., other fields}")
        return [dict(p) for p in raw["pairs"]]
    ds = raw["dataset"]
    if not isinstance(ds, Mapping) or "path" not in ds:
        raise InputError("spec.dataset must be {path: FILE, clean_field: NAME, corrupted_field: NAME, limit: N}")
    check_keys("spec.dataset", ds, ("path", "clean_field", "corrupted_field", "limit"))
    cf, bf = ds.get("clean_field", "clean"), ds.get("corrupted_field", "corrupted")
    rows = read_rows({"dataset": {"path": ds["path"], "text_field": cf, "limit": ds.get("limit")}}, base)
    missing = [i for i, r in enumerate(rows) if bf not in r]
    if missing:
        raise InputError(f"dataset {ds['path']}: rows {missing[:5]} lack the corrupted field {bf!r} "
                         "(set dataset.corrupted_field)")
    return [{**{k: v for k, v in r.items() if k != "text"}, "clean": str(r[cf]), "corrupted": str(r[bf])}
            for r in rows]


def spec_from_dict(raw: Mapping, *, base: Path | str = ".", **overrides) -> PatchSpec:
    """A :class:`PatchSpec` from a parsed spec; ``overrides`` (not None) replace its keys. Paths in the
    spec (``subspace``, ``out``, ``dataset.path``) are relative to ``base``; overrides are taken as given."""
    base = Path(base)
    raw = {**raw, **{k: str(base / raw[k]) for k in ("subspace", "out")
                     if isinstance(raw.get(k), str) and not Path(raw[k]).is_absolute()}}
    raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    check_keys("spec", raw, sorted(_KEYS))
    for key in ("model", "metric"):
        if key not in raw:
            raise InputError(f"spec: missing required key {key!r}")
    sub = raw.get("subspace")
    sites = raw.get("sites", ("resid_post",))
    fields = {f.name for f in dataclasses.fields(PatchSpec)} - {"pairs", "sites", "subspace", "layers"}
    kw = {k: v for k, v in raw.items() if k in fields}
    _check_choices(kw)
    layers = raw.get("layers")
    return PatchSpec(**kw, pairs=tuple(_pairs(raw, base)), sites=(sites,) if isinstance(sites, str) else tuple(sites),
                     subspace=sub, layers=None if layers is None else tuple(layers))


def load_spec(path: str | os.PathLike, **overrides) -> PatchSpec:
    """Read a YAML/JSON spec file into a :class:`PatchSpec` (paths resolved relative to the file)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"spec file {path} could not be read: {e.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001 - a parse error of either format is the user's to fix
        raise InputError(f"spec {path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: "
                         f"{' '.join(str(e).split())}") from None
    if not isinstance(raw, Mapping):
        raise InputError(f"spec {path}: expected a mapping at the top level, got {type(raw).__name__}")
    return spec_from_dict(raw, base=path.parent, **overrides)


def run_spec(spec: PatchSpec, model=None, tok=None, *, progress: bool | None = None) -> dict[str, PatchingResult]:
    """Run the spec's sweeps; returns ``{method: PatchingResult}`` (``exact`` and/or ``attribution``)."""
    if model is None:
        from interp.models import load_model
        model, tok = load_model(spec.model, device=spec.device)
    sub = None
    if spec.subspace is not None:
        from interp.subspace import Subspace
        sub = Subspace.load(spec.subspace)
    rows = list(spec.pairs)
    positions = spec.positions
    if positions is not None:
        positions = as_positions(positions).fill(rows)
    source_positions = None if spec.source_positions is None else as_positions(spec.source_positions).fill(rows)
    common = dict(sites=list(spec.sites), layers=spec.layers, positions=positions, source_positions=source_positions,
                  subspace=sub, neurons=spec.neurons, per_neuron=spec.per_neuron, direction=spec.direction,
                  tokenizer=tok)
    clean, bad = [p["clean"] for p in rows], [p["corrupted"] for p in rows]
    metric = fill_fields(spec.metric, rows)
    out = {}
    if spec.method in ("exact", "both"):
        out["exact"] = activation_patching(model, clean, bad, metric, batch_size=spec.batch_size, progress=progress,
                                           **common)
    if spec.method in ("attribution", "both"):
        out["attribution"] = attribution_patching(model, clean, bad, metric, **common)
    for r in out.values():
        r.model = spec.model
    return out


def write_results(results: Mapping[str, PatchingResult], spec: PatchSpec, out: str | os.PathLike | None = None) -> dict:
    """Write each result's CSV/JSON/PNG and ``summary.json`` into ``out`` (default ``spec.out``); returns the
    summary."""
    folder = Path(out or spec.out)
    for method, res in results.items():
        res.save(folder, method)
    first = next(iter(results.values()))
    summary = {"model": spec.model, "spec": dataclasses.asdict(spec), "clean_metric": first.clean_metric,
               "corrupted_metric": first.corrupted_metric,
               "top": {m: r.top(10) for m, r in results.items()},
               "seconds": {m: r.seconds for m, r in results.items()}}
    if {"exact", "attribution"} <= set(results):
        summary["agreement"] = agreement(results["exact"], results["attribution"])
    write_json(folder / "summary.json", summary, indent=2)
    return summary
