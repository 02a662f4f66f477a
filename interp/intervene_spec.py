"""The intervention spec format (YAML or JSON) of :mod:`interp.runner` and ``interp intervene``: reading it and
checking it before any model loads.

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
A key that the spec, an edit type, the metric or the dataset does not read is refused when the spec is read
(:data:`SPEC_KEYS`, :data:`EDIT_KEYS`, :data:`METRIC_KEYS`, :data:`DATASET_KEYS`), with the closest valid key named.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interp.errors import DataError, InputError
from interp.positions import as_positions

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
SPEC_KEYS = ("model", "site", "edit", "edits", "metric", "prompts", "dataset", "positions", "subspace", "out",
             "batch_size", "device")
"""The keys a spec takes at its top level."""


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
    check_keys("spec", raw, SPEC_KEYS)
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
