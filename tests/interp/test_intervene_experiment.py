"""The weekday-circle intervention experiment, reduced, on the embedded model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_weekday_experiment_reduced_run_writes_results(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import weekday_circle_intervention as exp

    rc = exp.main(["--out", str(tmp_path), "--layers", "10", "--positions", "day", "--scales", "1,2",
                   "--select-layers", "8,10", "--select-groups", "8,9,10", "--group-scales", "1",
                   "--fit-templates", "3", "--eval-templates", "1", "--random-seeds", "1", "--max-rows", "12"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "success_by_layer.png").stat().st_size > 0
    assert res["n_rows"] == 12
    # rows are prompts the model copies correctly and targets differ from the source: no edit never succeeds
    assert res["control_none"]["success"] == 0.0 and res["control_none"]["source_kept"] == 1.0
    edits = {(r["edit"], r["position"]) for r in res["results"]}
    assert edits == {("circle", "day"), ("random", "day"), ("replace", "day")}
    assert res["circles"]["10/day"]["order_matches"] is True
    # the selection saw only fit templates: 2 layers x 2 scales, one score per left-out fit template
    sel = res["selection"]
    # (single layers x scales, plus the layer group with an absolute radius)
    got = {(tuple(c["layers"]), c["mode"], c["scale"]) for c in sel["candidates"]}
    assert got == {((8,), "scale", 1.0), ((8,), "scale", 2.0), ((10,), "scale", 1.0), ((10,), "scale", 2.0),
                   ((8, 9, 10), "radius", 1.0)}
    assert all(len(c["per_fold"]) == 3 for c in sel["candidates"])
    best = max(c["success"] for c in sel["candidates"])
    assert sel["chosen_fit_success"] == best
    head, ch = res["headline"], sel["chosen"]
    assert (head["circle"]["layers"], head["circle"]["mode"], head["circle"]["scale"]) == (ch["layers"], ch["mode"], ch["scale"])
    assert head["random"]["scale"] == ch["scale"] and head["random"]["mode"] == ch["mode"]
    assert head["replace"]["edit"] == "replace" and head["replace"]["layers"] == ch["layers"]
    assert res["n_rows_eval"] == 12 and res["n_rows_confirm"] == 0 and res["n_rows_confirm2"] == 0
    for r in res["results"]:
        assert 0.0 <= r["success"] <= 1.0 and r["success"] + r["source_kept"] <= 1.0 + 1e-6
    sys.modules.pop("weekday_circle_intervention", None)
