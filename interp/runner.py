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

Paths in a spec (``out``, ``subspace``, ``dataset.path``) are relative to the spec file; an ``--out``
flag to the working folder. Give ``prompts`` or ``dataset``, and ``edit`` or ``edits``, not both;
``dataset.limit`` is a number of rows >= 1 (leave it out for every row).

Strings holding ``{field}`` are filled in per row from the dataset's fields, so an edit or a metric
can differ per prompt (``to: "{target}"``). Edit types: ``project_out``, ``zero_ablate``,
``mean_ablate`` (``coords``), ``steer`` (``alpha``, and ``coords`` or ``vector``), ``set_coords``
(``coords`` or ``value``), ``rotate`` (``angle`` or ``to``), ``replace`` (``vector``), ``patch``
(``source_field``: the row field holding the source prompt; its last token is patched in); every edit
may also set ``name``, ``site`` and ``positions``. Metrics (at the last real token): ``top_token``,
``prob`` (``token``), ``logit_diff`` (``target``, ``baseline``) and ``kl`` (from the unedited run).
A key that an edit type, the metric or the dataset does not read is refused when the spec is read
(:data:`EDIT_KEYS`, :data:`METRIC_KEYS`, :data:`DATASET_KEYS`), with the closest valid key named.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from interp.atomic import atomic_path
from interp.capture import capture, last_token_index, tokenize
from interp.edits import Edit, MeanAblate, Patch, ProjectOut, Replace, Rotate, SetCoords, Steer, ZeroAblate
from interp.errors import DataError, InputError, InterpError
from interp.folders import folder_lock, remove_temps
from interp.intervene import intervene
from interp.positions import Positions, as_positions
from interp.subspace import Subspace

EDIT_KEYS: dict[str, tuple[str, ...]] = {
    "project_out": (), "zero_ablate": (), "mean_ablate": ("coords",), "steer": ("alpha", "coords", "vector"),
    "set_coords": ("coords", "value"), "rotate": ("angle", "to"), "replace": ("vector",), "patch": ("source_field",)}
"""The keys each edit type takes, besides the ones every edit takes (:data:`EDIT_COMMON_KEYS`)."""
EDIT_COMMON_KEYS = ("name", "type", "site", "positions")
_EDIT_NEEDS = {"mean_ablate": ("coords",), "replace": ("vector",), "patch": ("source_field",),
               "set_coords": ("coords", "value"), "rotate": ("angle", "to")}
"""Per edit type, the keys of which it needs at least one (several: exactly one)."""
_EDIT_EXCLUSIVE = {"steer": ("vector", "coords"), "set_coords": ("coords", "value"), "rotate": ("angle", "to")}
"""Per edit type, two keys that exclude each other."""
EDIT_TYPES = tuple(EDIT_KEYS)
METRIC_KEYS: dict[str, tuple[str, ...]] = {"top_token": (), "prob": ("token",), "logit_diff": ("target", "baseline"),
                                           "kl": ()}
"""The keys each metric type needs besides ``type`` (it takes no others)."""
_METRIC_EXAMPLES = {"prob": "{type: prob, token: ' Friday'}",
                    "logit_diff": "{type: logit_diff, target: ' Friday', baseline: ' Monday'}"}
METRICS = tuple(METRIC_KEYS)
DATASET_KEYS = ("path", "text_field", "limit")
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
        _check_metric(self.metric)
        names = set()
        for e in self.edits:
            _check_edit(e)
            if e["name"] == "none":
                raise InputError("spec.edits: an edit is named 'none', the name of the unedited run; rename it")
            if e["name"] in names:
                raise InputError(f"spec.edits: names must be unique; got {e['name']!r} twice (names are compared "
                                 "as text: 1 and '1' are the same name)")
            names.add(e["name"])
        for where, p in [("spec.positions", self.positions)] + [(f"edit {e['name']!r}", e["positions"])
                                                                  for e in self.edits if "positions" in e]:
            try:
                as_positions(p)
            except InputError as err:
                raise InputError(f"{where}: {err}") from None


def check_keys(where: str, given: Mapping, allowed: Sequence[str]) -> None:
    """Refuse a key of `given` outside `allowed`, naming it, the allowed keys and the closest of them."""
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(f"{where}: unknown key {key!r}; it takes {', '.join(allowed)}{hint}")


def _check_metric(metric: Mapping) -> None:
    """The metric's type, and exactly the keys that type reads (checked before any model runs)."""
    kind = metric.get("type")
    if kind not in METRICS:
        raise InputError(f"spec.metric.type must be one of {METRICS}; got {kind!r}")
    where = f"spec.metric (type {kind})"
    check_keys(where, metric, ("type", *METRIC_KEYS[kind]))
    missing = [k for k in METRIC_KEYS[kind] if k not in metric]
    if missing:
        raise InputError(f"{where} needs {' and '.join(missing)}; got keys {sorted(map(str, metric))}, e.g. "
                         f"{_METRIC_EXAMPLES[kind]}")


def _check_edit(e: Mapping) -> None:
    """An edit's type, name and keys: only the keys its type reads, no two that exclude each other, and the
    ones it cannot run without (checked before any model runs)."""
    kind = e.get("type")
    if kind not in EDIT_TYPES:
        raise InputError(f"spec.edits: type must be one of {EDIT_TYPES}; got {kind!r} in {e}")
    name = e.get("name")
    if not isinstance(name, str) or not name:
        raise InputError(f"spec.edits: an edit's name must be non-empty text; got {name!r} in {e}")
    where = f"edit {name!r} (type {kind})"
    check_keys(where, e, EDIT_COMMON_KEYS + EDIT_KEYS[kind])
    pair = _EDIT_EXCLUSIVE.get(kind)
    if pair and all(k in e for k in pair):
        raise InputError(f"{where} takes {pair[0]} or {pair[1]}, not both; got both: drop one")
    need = _EDIT_NEEDS.get(kind, ())
    if need and not any(k in e for k in need):
        raise InputError(f"{where} needs {' or '.join(need)}; got keys {sorted(map(str, e))}")


def read_rows(spec: Mapping, base: Path) -> list[dict]:
    """Rows of a spec's ``prompts: [...]`` or ``dataset: {path, text_field, limit}`` (paths relative to
    ``base``); each row's ``text`` is its prompt and its other keys are the dataset's fields."""
    if "prompts" in spec and "dataset" in spec:
        raise InputError("spec: give prompts: [...] or dataset: {path: ...}, not both; got both")
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
    if isinstance(ds, Mapping):
        check_keys("spec.dataset", ds, DATASET_KEYS)
    if not isinstance(ds, Mapping) or "path" not in ds:
        raise InputError("spec needs prompts: [...] or dataset: {path: FILE, text_field: NAME}")
    path = (base / ds["path"]) if not Path(ds["path"]).is_absolute() else Path(ds["path"])
    text_field = ds.get("text_field", "prompt")
    if not isinstance(text_field, str):
        raise InputError(f"spec.dataset.text_field must be the name of a field; got {text_field!r}")
    limit = ds.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InputError(f"spec.dataset.limit must be a number of rows >= 1 (leave it out to read every row); "
                         f"got {limit!r}")
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
    return [{**r, "text": str(r[text_field])} for r in data[:limit]]


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


def _edit_name(e: Mapping, i: int):
    """An edit's name as text (a YAML ``name: 1`` is the name ``"1"``); other kinds are left for the check."""
    name = e.get("name", e.get("type", f"edit{i}"))
    return str(name) if isinstance(name, (int, float)) and not isinstance(name, bool) else name


def spec_from_dict(raw: Mapping, *, base: Path | str = ".", **overrides) -> RunSpec:
    """A :class:`RunSpec` from a parsed spec; ``overrides`` (not None) replace its keys. Paths in the spec
    (``subspace``, ``out``, ``dataset.path``) are relative to ``base``; overrides are taken as given."""
    base = Path(base)
    raw = dict(raw)
    if isinstance(raw.get("out"), (str, os.PathLike)) and not Path(raw["out"]).is_absolute():
        raw["out"] = str(base / raw["out"])
    raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    known = ["model", "site", "edit", "edits", "metric", "prompts", "dataset", "positions", "subspace", "out",
             "batch_size", "device"]
    extra = sorted(map(str, set(raw) - set(known)))
    if extra:
        close = difflib.get_close_matches(extra[0], known, n=1)
        hint = f"; did you mean {close[0]!r} for {extra[0]!r}?" if close else ""
        raise InputError(f"spec: unknown keys {extra}; known keys: {sorted(known)}{hint}")
    for key in ("model", "site", "metric"):
        if key not in raw:
            raise InputError(f"spec: missing required key {key!r}")
    if "edit" in raw and "edits" in raw:
        raise InputError("spec: give edit: {...} (one edit) or edits: [...] (a list of edits), not both; got both")
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
    edits = tuple({**e, "name": _edit_name(e, i)} for i, e in enumerate(edits))
    batch_size = raw.get("batch_size", 16)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool):
        raise InputError(f"spec.batch_size must be a positive integer; got {batch_size!r}")
    sub = raw.get("subspace")
    if sub is not None and not Path(sub).is_absolute():
        sub = str(base / sub)
    out = raw.get("out")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise InputError(f"spec.out must be a folder path; got {out!r}")
    return RunSpec(model=str(raw["model"]), site=str(raw["site"]), edits=edits, metric=dict(raw["metric"]),
                   rows=tuple(read_rows(raw, base)), positions=raw.get("positions", "last"), subspace=sub,
                   out=str(out if out is not None else "intervene_out"), batch_size=batch_size,
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
        return MeanAblate(s, torch.tensor(p["coords"]))
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
    """Write ``results.csv`` and ``summary.json`` atomically into `out`, holding the folder's lock.

    Both files are written to temporary files first; then the old ``summary.json`` is removed,
    ``results.csv`` renamed into place and ``summary.json`` last. A write that fails part way leaves the
    previous run's pair, or a ``results.csv`` without a ``summary.json`` (no complete run), never one run's
    table beside another run's summary. Temporary files left by a killed run are removed first.

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

    with folder_lock(out, ".interp-lock", f"the intervention output folder {out}"):
        for name in ("results.csv", "summary.json"):
            remove_temps(out, name)
        # summary.json's context is entered first, so it exits last: results.csv is in place before it
        with atomic_path(out / "summary.json") as summary_tmp, atomic_path(out / "results.csv") as csv_tmp:
            with open(csv_tmp, "w", newline="") as f:
                write_csv(f)
            summary_tmp.write_text(json.dumps(result.summary, indent=2), encoding="utf-8")
            (out / "summary.json").unlink(missing_ok=True)  # never beside the new results.csv
    return out
