"""The weekday patching experiment, reduced, on the embedded model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_patching_experiment_reduced_run_writes_results(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import patching_weekday as exp

    rc = exp.main(["--out", str(tmp_path), "--layers", "0,25", "--pairs", "2", "--peak-cells", "1",
                   "--fit-templates", "3"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    main = res["main"]
    assert main["clean_metric"] > 0 > main["corrupted_metric"]  # the model repeats the day of each prompt
    exact = json.loads((tmp_path / "exact.json").read_text())
    assert len(exact["rows"]) == 3 * 2 and len(exact["positions"]) == 15
    assert exact["tokens"][5] == " Friday" and exact["source_tokens"][5] == " Monday"
    day = exact["rows"].index("blocks.0.hook_resid_post")
    assert exact["effects"][0][day][5] > 0.9 * (main["clean_metric"] - main["corrupted_metric"])
    assert -1.0 <= main["agreement"]["spearman"] <= 1.0 and set(main["agreement"]["per_kind_spearman"]) == set(
        exp.KINDS)
    assert len(res["pairs"]["per_pair_gap"]) == 2 and all(g > 0 for g in res["pairs"]["per_pair_gap"])
    cells = res["circle"]["cells"]
    assert [c["where"] for c in cells] == ["day", "last"]
    for c in cells:
        assert abs(c["random_plane"]) < 0.2 and c["full_residual"] > 0.5
    for name in ("exact", "attribution", "exact_vs_attribution", "pairs_exact_vs_attribution", "circle_cells"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    sys.modules.pop("patching_weekday", None)
