"""The circle-edit defaults experiment, reduced, on the embedded model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_circle_edit_defaults_reduced_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import circle_edit_defaults as exp

    rc = exp.main(["--out", str(tmp_path), "--families", "days,months", "--fit-templates", "2",
                   "--held-out-templates", "1", "--folds", "2", "--targets", "1", "--random-seeds", "1"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["selection"]) == set(res["held_out"]) == {"days", "months"}
    assert set(res["pooled"]) == set(res["candidates"]) == {"keep x1", "keep x3", "circle x2", "circle x3", "circle x4"}
    chosen = f"{res['chosen']['mode']} x{res['chosen']['scale']:g}"
    assert res["pooled"][chosen] == max(res["pooled"].values())  # the choice is the best pooled fit-template score
    for fam, h in res["held_out"].items():
        assert h["rows"] > 0 and h["no_edit"] == 0.0  # rows: the model copies the item; the target differs
        for k in ("chosen", "pure_rotation", "pure_rotation_random", "probe_chosen", "chosen_random_mean"):
            assert 0.0 <= h[k] <= 1.0
        assert res["templates"][fam]["held_out"] and not set(res["templates"][fam]["held_out"]) & set(
            res["templates"][fam]["fit"])
    sys.modules.pop("circle_edit_defaults", None)
    sys.modules.pop("weekday_circle_intervention", None)
