"""Scripted intervention experiments: run a spec (:mod:`interp.intervene_spec`, the format and its checks) and
write a results table.

    interp intervene spec.yaml            # -> <out>/results.csv + <out>/summary.json

Each edit of the spec gets its own forward passes over every prompt ("none", no edit, is always measured); the
metric is read at each prompt's last real token. Strings holding ``{field}`` are filled per row from the
dataset's fields. ``results.csv`` and ``summary.json`` are written under the folder's lock, ``summary.json`` last.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from interp.atomic import atomic_path
from interp.capture import capture, last_token_index, tokenize
from interp.edits import Edit, MeanAblate, Patch, ProjectOut, Replace, Rotate, SetCoords, Steer, ZeroAblate
from interp.errors import InputError, InterpError
from interp.folders import folder_lock, remove_temps
from interp.intervene import intervene
from interp.intervene_spec import RunSpec
from interp.positions import Positions, as_positions
from interp.subspace import Subspace

_FIELD = re.compile(r"\{(\w+)\}")


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
