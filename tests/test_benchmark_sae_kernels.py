"""benchmarks/sae_kernels.py: quick mode on the CPU writes every row with its checks and every round
(timings are not tested)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from saes import native

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_checks_both_kernels_and_records_every_round(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        mod = importlib.import_module("sae_kernels")
        out = tmp_path / "k.json"
        res = mod.main(["--quick", "--rounds", "3", "--calls", "2", "--out", str(out)])
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        for name in ("sae_kernels", "sae_train"):
            sys.modules.pop(name, None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert [r["sae"] for r in res["rows"]] == ["init", "trained"]
    for row in res["rows"]:
        assert row["topk_same_values"] and row["bag_sum_grads_close"]
        assert 0.0 <= row["rows_with_second_topk"] <= 1.0  # the two-level path ran (4,096 latents)
        dots = row["grad_vals"]  # the compiled dot products, where the kernels are built with OpenMP
        assert (dots is None) == (native.library() is None or not native.library().native_openmp())
        for key in ("topk", "bag_sum_forward_backward", *(["grad_vals"] if dots else [])):
            assert len(row[key]["torch_ms_rounds"]) == len(row[key]["ours_ms_rounds"]) == 3
            assert row[key]["speedup"] > 0
        assert dots is None or dots["close"]
    assert res["command"].startswith("python benchmarks/sae_kernels.py --quick")
