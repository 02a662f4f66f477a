"""The weekday-circle experiment, reduced, on the embedded model (slow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_weekday_circle_experiment_reduced(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import weekday_circle_features as exp
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    out = tmp_path / "out"
    rc = exp.main(["--out", str(out), "--layers", "15", "--plot-layers", "15", "--templates", "4",
                   "--d-sae", "64", "--k", "4", "--sae-tokens", "4096", "--batch", "256", "--day-docs", "10",
                   "--corpus-docs", "0", "--eval-docs", "6", "--n-clusters", "8", "--min-points", "10", "--quiet",
                   "--save-subspaces", str(tmp_path / "subspaces")])
    assert rc == 0
    res = json.loads((out / "weekday_circle_features.json").read_text())
    (row,) = res["class_mean_by_layer"]
    # the measured property of the embedded model this experiment is about
    assert row["order_matches"] is True
    assert row["loco_angle_error"] < row["loco_error_shuffled_order"]
    assert (out / "days_class_mean_L15.png").stat().st_size > 1000
    assert (tmp_path / "subspaces" / "days_L15" / "subspace.json").exists()
    sae = res["sae_clusters"]
    assert sae["eval_fvu"] < 1.0 and sae["eval_day_tokens"] > 0
    assert set(sae["methods"]) == {"graph", "spectral"}
    assert sae["methods"]["spectral"]["n_scored"] >= 1
    assert "| 15 | yes |" in (out / "days_class_mean_table.md").read_text()
