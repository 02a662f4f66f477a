"""The patching benchmark's code path, at its --quick size on the tiny Llama (timings are not tested)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_patching_benchmark_quick_runs_every_method_and_records_every_round(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import patching as bench

    out = tmp_path / "patching.json"
    assert bench.main(["--quick", "--model", str(tiny_dir), "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["quick"] and res["rounds"] == 2 and res["layers"] == 1 and res["cells"] == res["seq"]
    assert set(res["times_s"]) == {"interp exact", "interp attribution", "nnsight loop"}
    assert all(len(v) == 2 for v in res["times_s"].values())
    assert len(res["ratio_nnsight_over_exact_per_cell"]["rounds"]) == 2 and res["nnsight_layers"] == [0]
    # nnsight's loop and interp's batched sweep patch the same cells: the same effects
    assert res["max_abs_diff_nnsight_vs_exact"] < 1e-4 < res["max_abs_effect"]
    assert -1.0 <= res["spearman_attribution_vs_exact"] <= 1.0
    assert 0 < res["effect_cells"] <= res["cells"] and -1.0 <= res["spearman_attribution_vs_exact_effect_cells"] <= 1.0
    # the nnsight loop on a subset of the swept layers: its cells are compared with the same cells of the sweep
    assert bench.main(["--quick", "--layers", "2", "--nnsight-layers", "1", "--model", str(tiny_dir), "--device", "cpu",
                       "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["layers"] == 2 and res["nnsight_layers"] == [1] and res["nnsight_cells"] == res["seq"]
    assert res["max_abs_diff_nnsight_vs_exact"] < 1e-4
    sys.modules.pop("patching", None)
    sys.modules.pop("patching_weekday", None)
