"""Scripted intervention experiments from a declarative spec (YAML or JSON); writes a results table.

    interp intervene spec.yaml            # -> <out>/results.csv + <out>/summary.json

A spec::

    model: smollm2-135m                   # name or path (interp.load_model)
    prompts: ["I will see you on Monday. To repeat, I will see you on"]
    # or: dataset: {path: rows.jsonl, text_field: prompt}   (.jsonl, .json list, or .csv)
    site: blocks.12.hook_resid_post
    subspace: out/days/blocks.12        # a Subspace folder (optional; needed by subspace edits)
    positions: last                     # any form of interp.positions: all, last, 3, [0, -1], [[..], [..]],
                                        # {slice: [a, b]}, {token: " {day}"}, {chars: [a, b]}
    edits:                              # each gets its own rows; "none" (no edit) is always measured
      - {name: to_friday, type: rotate, to: Friday}
      - {name: ablate, type: project_out}
    metric: {type: logit_diff, target: " Friday", baseline: " {day}"}
    out: out/intervene_run

Strings holding ``{field}`` are filled in per row from the dataset's fields, so an edit or a metric
can differ per prompt (``to: "{target}"``). Edit types: ``project_out``, ``zero_ablate``,
``mean_ablate`` (``coords``), ``steer`` (``alpha``, ``coords`` or ``vector``), ``set_coords``
(``coords`` or ``value``), ``rotate`` (``angle`` or ``to``), ``replace`` (``vector``), ``patch``
(``source_field``: the row field holding the source prompt; its last token is patched in).
Metrics (at the last real token): ``top_token``, ``prob`` (``token``), ``logit_diff``
(``target``, ``baseline``) and ``kl`` (from the unedited run).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from interp.atomic import atomic_path, write_json
from interp.capture import capture, last_token_index, tokenize
from interp.edits import Edit, MeanAblate, Patch, ProjectOut, Replace, Rotate, SetCoords, Steer, ZeroAblate
from interp.errors import DataError, InputError, InterpError
from interp.intervene import intervene
from interp.positions import Positions, as_positions
from interp.subspace import Subspace

EDIT_TYPES = ("project_out", "zero_ablate", "mean_ablate", "steer", "set_coords", "rotate", "replace", "patch")
METRICS = ("top_token", "prob", "logit_diff", "kl")
_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """A validated intervention experiment."""

    model: str
    """Model name or path for :func:`interp.load_model`."""
    site: str
    """Site every edit is written to (an edit may override it with its own ``site``)."""
    edits: tuple[dict, ...]
    """Edit specs, each ``{name, type, ...params}``."""
    metric: dict
    """Metric spec ``{type, ...params}``."""
    rows: tuple[dict, ...]
    """One dict per prompt; ``text`` is the prompt, other keys are fields for ``{field}``."""
    positions: Any = "last"
    """Positions to edit, any form of :mod:`interp.positions` (``{field}`` in a token string is filled per row)."""
    subspace: str | None = None
    """Folder of a saved Subspace, used by subspace edits."""
    out: str = "intervene_out"
    """Output folder for results.csv and summary.json."""
    batch_size: int = 16
    """Prompts per forward pass."""
    device: str | None = None
    """Device for the model (default: CUDA when available)."""

    def __post_init__(self) -> None:
        if not self.rows:
            raise InputError("spec: no prompts; give prompts: [...] or dataset: {path: ...}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"spec.batch_size must be a positive integer; got {self.batch_size!r}")
        if self.metric.get("type") not in METRICS:
            raise InputError(f"spec.metric.type must be one of {METRICS}; got {self.metric.get('type')!r}")
        names = set()
        for e in self.edits:
            if e.get("type") not in EDIT_TYPES:
                raise InputError(f"spec.edits: type must be one of {EDIT_TYPES}; got {e.get('type')!r} in {e}")
            if e["name"] in names or e["name"] == "none":
                raise InputError(f"spec.edits: names must be unique and not 'none'; got {e['name']!r} twice")
            names.add(e["name"])
        for where, p in [("spec.positions", self.positions)] + [(f"edit {e['name']!r}", e["positions"])
                                                                  for e in self.edits if "positions" in e]:
            try:
                as_positions(p)
            except InputError as err:
                raise InputError(f"{where}: {err}") from None


def read_rows(spec: Mapping, base: Path) -> list[dict]:
    """Rows of a spec's ``prompts: [...]`` or ``dataset: {path, text_field, limit}`` (paths relative to
    ``base``); each row's ``text`` is its prompt and its other keys are the dataset's fields."""
    if "prompts" in spec:
        prompts = spec["prompts"]
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise InputError(f"spec.prompts must be a list of strings; got {type(prompts).__name__}")
        empty = [i for i, p in enumerate(prompts) if not isinstance(p, (str, int, float)) or not str(p).strip()]
        if empty:
            raise InputError(f"spec.prompts {empty[:10]} are empty or not text; every prompt needs at least one "
                             "token (the metrics read its last token)")
        return [{"text": str(p)} for p in prompts]
    ds = spec.get("dataset")
    if not isinstance(ds, Mapping) or "path" not in ds:
        raise InputError("spec needs prompts: [...] or dataset: {path: FILE, text_field: NAME}")
    path = (base / ds["path"]) if not Path(ds["path"]).is_absolute() else Path(ds["path"])
    text_field = ds.get("text_field", "prompt")
    try:
        if path.suffix == ".jsonl":
            data = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        elif path.suffix == ".csv":
            with path.open(newline="") as f:
                data = list(csv.DictReader(f))
        else:
            raise DataError(f"dataset {path}: expected a .jsonl, .json or .csv file")
    except (OSError, ValueError, csv.Error) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise DataError(f"dataset {path} could not be read: {e}") from None
    if not isinstance(data, list) or not all(isinstance(r, Mapping) for r in data):
        raise DataError(f"dataset {path}: expected a list of rows (objects), got {type(data).__name__}")
    if not data or any(text_field not in r for r in data):
        raise DataError(f"dataset {path}: every row needs the text field {text_field!r} (set dataset.text_field)")
    return [{**r, "text": str(r[text_field])} for r in data[: ds.get("limit") or None]]


def load_spec(path: str | os.PathLike, **overrides) -> RunSpec:
    """Read a YAML/JSON spec file into a :class:`RunSpec` (paths resolved relative to the file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"spec file {path} could not be read as text: {e}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:  # syntax errors, and tags such as !!python/object that safe_load refuses
            raise InputError(f"spec {path} is not valid YAML (only plain YAML is read, no !!python tags): "
                             f"{' '.join(str(e).split())}") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"spec {path} is not valid JSON: {e}; a .yaml or .yml file is read as YAML") from None
    if not isinstance(raw, Mapping):
        raise InputError(f"spec {path}: expected a mapping at the top level, got {type(raw).__name__}")
    return spec_from_dict(raw, base=path.parent, **overrides)


def spec_from_dict(raw: Mapping, *, base: Path | str = ".", **overrides) -> RunSpec:
    raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    base = Path(base)
    known = {"model", "site", "edit", "edits", "metric", "prompts", "dataset", "positions", "subspace", "out",
             "batch_size", "device"}
    extra = set(raw) - known
    if extra:
        raise InputError(f"spec: unknown keys {sorted(extra)}; known keys: {sorted(known)}")
    for key in ("model", "site", "metric"):
        if key not in raw:
            raise InputError(f"spec: missing required key {key!r}")
    edits = raw.get("edits") or ([raw["edit"]] if "edit" in raw else [])
    if isinstance(edits, Mapping):
        edits = [edits]
    if not edits or not isinstance(edits, list):
        raise InputError("spec: give edit: {type: ...} or edits: [{name: ..., type: ...}, ...]")
    for i, e in enumerate(edits):
        if not isinstance(e, Mapping):
            raise InputError(f"spec.edits[{i}] is {e!r}; each edit is a mapping such as {{name: ablate, type: "
                             "project_out}")
    if not isinstance(raw["metric"], Mapping):
        raise InputError(f"spec.metric is {raw['metric']!r}; give a mapping such as {{type: top_token}}")
    edits = tuple({"name": str(e.get("name", e.get("type", f"edit{i}"))), **e} for i, e in enumerate(edits))
    batch_size = raw.get("batch_size", 16)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool):
        raise InputError(f"spec.batch_size must be a positive integer; got {batch_size!r}")
    sub = raw.get("subspace")
    if sub is not None and not Path(sub).is_absolute():
        sub = str(base / sub)
    return RunSpec(model=str(raw["model"]), site=str(raw["site"]), edits=edits, metric=dict(raw["metric"]),
                   rows=tuple(read_rows(raw, base)), positions=raw.get("positions", "last"), subspace=sub,
                   out=str(raw.get("out", "intervene_out")), batch_size=batch_size,
                   device=raw.get("device"))


def _fill(value, rows: list[dict]):
    """A value with ``{field}`` placeholders becomes one value per row."""
    if isinstance(value, str) and _FIELD.search(value):
        try:
            return [value.format(**r) for r in rows]
        except KeyError as e:
            raise InputError(f"spec: {value!r} names field {e} that the dataset rows lack") from None
        except (IndexError, ValueError) as e:
            raise InputError(f"spec: {value!r} is not a valid {{field}} template ({e}); write {{name}} with a "
                             "dataset field's name, and {{{{ }}}} for literal braces") from None
    return value


def _need_sub(sub: Subspace | None, kind: str) -> Subspace:
    if sub is None:
        raise InputError(f"edit type {kind!r} needs a subspace: set spec.subspace to a saved Subspace folder")
    return sub


def build_edit(e: dict, sub: Subspace | None, rows: list[dict], *, model=None, tok=None, site: str = "") -> Edit:
    """One edit object for a batch of rows from an edit spec."""
    try:
        return _build_edit(e, sub, rows, model=model, tok=tok, site=site)
    except InterpError:
        raise
    except KeyError as err:
        raise InputError(f"edit {e['name']!r} (type {e['type']}) needs the key {err}; see the spec format "
                         "(interp/runner.py)") from None
    except (TypeError, ValueError, RuntimeError) as err:  # e.g. alpha: abc, vector: [1, [2]]
        raise InputError(f"edit {e['name']!r} (type {e['type']}): a value is not what this edit takes "
                         f"({' '.join(str(err).split())})") from None


def _build_edit(e: dict, sub: Subspace | None, rows: list[dict], *, model=None, tok=None, site: str = "") -> Edit:
    kind = e["type"]
    p = {k: _fill(v, rows) for k, v in e.items() if k not in ("name", "type", "site", "positions")}
    if kind == "project_out":
        return ProjectOut(_need_sub(sub, kind))
    if kind == "zero_ablate":
        return ZeroAblate(_need_sub(sub, kind))
    if kind == "mean_ablate":
        s = _need_sub(sub, kind)
        return MeanAblate(s, torch.tensor(p.get("coords", [0.0] * s.rank)))
    if kind == "steer":
        if "vector" in p:
            return Steer(torch.tensor(p["vector"]), float(p.get("alpha", 1.0)))
        s = _need_sub(sub, kind)
        return Steer(s, float(p.get("alpha", 1.0)), coords=torch.tensor(p["coords"]) if "coords" in p else None)
    if kind == "set_coords":
        s = _need_sub(sub, kind)
        return SetCoords(s, torch.tensor(p["coords"]) if "coords" in p else None, value=p.get("value"))
    if kind == "rotate":
        s = _need_sub(sub, kind)
        return Rotate(s, angle=p.get("angle"), to=p.get("to"))
    if kind == "replace":
        return Replace(torch.tensor(p["vector"]))
    # patch: the source prompt's last-token activation at the site, subspace component only when given
    field_name = e.get("source_field")
    if not field_name or any(field_name not in r for r in rows):
        raise InputError("edit type 'patch' needs source_field: the dataset field holding each row's source prompt")
    src = capture(model, [r[field_name] for r in rows], site, positions="last", tokenizer=tok)[site]
    return Patch(src, sub)


def resolve_positions(spec_pos, rows: list[dict], batch: Mapping[str, torch.Tensor], tok, *, first_row: int = 0,
                      n_rows: int | None = None) -> Positions:
    """Spec positions (any form of :mod:`interp.positions`) bound to this batch of rows, rows ``first_row..`` of
    the spec's `n_rows` (per-row forms are given for all of them); ``{field}`` in a token string is filled from
    each row's fields."""
    pos = as_positions(spec_pos)
    total = len(rows) if n_rows is None else n_rows
    if pos.n_rows is not None and pos.n_rows != total:
        raise InputError(f"positions={pos.spec!r} gives {pos.n_rows} rows for {total} prompts; give one per prompt, "
                         "or one for all")
    if pos.n_rows is not None:
        pos = pos.rows(first_row, first_row + len(rows))
    return pos.fill(rows).bind(batch["input_ids"], batch["attention_mask"], tokenizer=tok,
                               texts=[r["text"] for r in rows])


def check_reach(pos: Positions, batch: Mapping[str, torch.Tensor], edit: str, first_row: int) -> None:
    """Refuse positions that would leave a row unedited: a column outside the prompt, or a form that
    picks no real token of some row. The runner raises rather than warns: a row measured without its
    edit would still be averaged into that edit's results as if it had been edited."""
    mask = batch["attention_mask"]
    b, s = mask.shape
    if pos.kind == "cols":  # take() checks every column against the padded length
        try:
            pos.take(torch.zeros(b, s, 1, device=mask.device), mask)
        except InputError as err:
            raise InputError(f"edit {edit!r}: {err}; these prompts are at most {s} tokens long") from None
    picked = pos.select(b, s, 0, s, mask.bool(), mask.device)
    if picked is None:
        return
    hit = torch.zeros(b, dtype=torch.bool, device=mask.device)
    hit[picked.batch_idx] = True
    if not bool(hit.all()):
        rows = (~hit).nonzero().flatten()
        lengths = mask.sum(1)[rows].tolist()
        raise InputError(f"edit {edit!r}: positions={pos.spec!r} pick no real token of rows "
                         f"{(rows + first_row).tolist()[:10]} (prompts of {lengths[:10]} tokens); the edit would "
                         "change nothing there: choose positions inside every prompt (e.g. 'last', each prompt's last "
                         "real token; with right padding, -1 is the padded batch's last column)")


def _token_ids(tok, value, n: int) -> torch.Tensor:
    texts = value if isinstance(value, list) else [value] * n
    out = []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise InputError(f"metric token {t!r} is {len(ids)} tokens; metrics need single tokens "
                             "(mind the leading space)")
        out.append(ids[0])
    return torch.tensor(out)


def metric_values(metric: dict, logits: torch.Tensor, base_logits: torch.Tensor, rows: list[dict], tok) -> dict:
    """Per-row metric columns from last-token logits ``[n, vocab]``."""
    kind, n = metric["type"], len(rows)
    logp = logits.float().log_softmax(-1)
    if kind == "top_token":
        top = logits.argmax(-1)
        return {"top_token": [tok.decode([int(t)]) for t in top],
                "changed": (top != base_logits.argmax(-1)).tolist()}
    if kind == "prob":
        t = _token_ids(tok, _fill(metric["token"], rows), n)
        return {"prob": logp[torch.arange(n), t].exp().tolist()}
    if kind == "logit_diff":
        t = _token_ids(tok, _fill(metric["target"], rows), n)
        b = _token_ids(tok, _fill(metric["baseline"], rows), n)
        return {"logit_diff": (logits[torch.arange(n), t] - logits[torch.arange(n), b]).float().tolist()}
    base_logp = base_logits.float().log_softmax(-1)
    return {"kl": (base_logp.exp() * (base_logp - logp)).sum(-1).tolist()}


@dataclass
class RunResult:
    """The table (one row per prompt and edit, 'none' included) and the per-edit means."""

    table: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def run_spec(spec: RunSpec, model=None, tok=None, *, progress: bool | None = None) -> RunResult:
    """Run every edit of `spec` on every prompt; returns the table and a summary (not written)."""
    if model is None:
        from interp.models import load_model
        model, tok = load_model(spec.model, device=spec.device)
    sub = Subspace.load(spec.subspace) if spec.subspace else None
    device = next(model.parameters()).device
    result = RunResult()
    rows = list(spec.rows)
    chunks = range(0, len(rows), spec.batch_size)
    for start in tqdm(chunks, desc="intervene", disable=not (progress if progress is not None else len(chunks) > 1)):
        chunk = rows[start:start + spec.batch_size]
        batch = {k: v.to(device) for k, v in tokenize(tok, [r["text"] for r in chunk]).items()}
        last = last_token_index(batch["attention_mask"])
        ar = torch.arange(len(chunk), device=device)
        with torch.no_grad():
            base = model(**batch).logits[ar, last]
        outs = {"none": base}
        for e in spec.edits:
            site = e.get("site", spec.site)
            pos = resolve_positions(e.get("positions", spec.positions), chunk, batch, tok, first_row=start,
                                    n_rows=len(rows))
            check_reach(pos, batch, e["name"], start)
            edit = build_edit(e, sub, chunk, model=model, tok=tok, site=site)
            with intervene(model, {site: edit}, positions=pos), torch.no_grad():
                outs[e["name"]] = model(**batch).logits[ar, last]
        for name, logits in outs.items():
            cols = metric_values(spec.metric, logits.cpu(), base.cpu(), chunk, tok)
            for i, r in enumerate(chunk):
                result.table.append({"row": start + i, "prompt": r["text"], "edit": name,
                                     **{k: v[i] for k, v in cols.items()}})
    result.summary = summarize(result.table, spec)
    return result


def summarize(table: list[dict], spec: RunSpec) -> dict:
    keys = [k for k in table[0] if k not in ("row", "prompt", "edit", "top_token")]
    means = {}
    for name in ["none"] + [e["name"] for e in spec.edits]:
        rs = [r for r in table if r["edit"] == name]
        means[name] = {k: sum(float(r[k]) for r in rs) / len(rs) for k in keys}
    return {"model": spec.model, "site": spec.site, "metric": spec.metric, "n_prompts": len(spec.rows),
            "edits": list(spec.edits), "positions": spec.positions, "subspace": spec.subspace, "mean": means}


def write_result(result: RunResult, out: str | os.PathLike) -> Path:
    """Write ``results.csv`` and ``summary.json`` atomically into `out`.

    ``results.csv``: one row per prompt and edit (``none`` included): ``row``, ``prompt``, ``edit`` and
    the metric's columns (``top_token`` + ``changed``, ``prob``, ``logit_diff`` or ``kl``).
    ``summary.json``: ``model``, ``site``, ``metric``, ``n_prompts``, ``edits`` (the edit specs),
    ``positions``, ``subspace`` and ``mean`` (per edit, the mean of every numeric metric column)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in result.table for k in r))

    def write_csv(f):
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(result.table)

    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        write_csv(f)
    write_json(out / "summary.json", result.summary, indent=2)
    return out
