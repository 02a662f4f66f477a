"""benchmarks/run_all.py: every benchmark's code path at tiny sizes on the CPU (timings are not tested),
and the full-size GPU plan parsed by every benchmark, so that neither rots before a GPU runs it."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module("run_all")
    yield module
    sys.modules.pop("run_all", None)


def test_quick_run_of_every_benchmark_writes_every_result(run_all, tmp_path):
    out = tmp_path / "gpu"
    assert run_all.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] and summary["device"] == "cpu"
    assert list(summary["benchmarks"]) == list(run_all.BENCHMARKS)
    for name, row in summary["benchmarks"].items():
        assert row["status"] == "ok", (name, row.get("error"))
        assert "--device cpu" in row["command"] and (out / f"{name}.json").is_file()
    heads = {name: row["headlines"] for name, row in summary["benchmarks"].items()}
    bf16 = heads["sae_train"]["summary"]["bf16"]
    assert set(bf16) == {"interp", "saelens", "sparsify"}  # every library with a bf16 path ran both rows
    for row in bf16.values():
        assert row["final_fvu_fp32"] > 0 and row["final_fvu_bf16"] > 0 and row["tokens_per_s_ratio"] > 0
    assert "speedup_bf16_vs_sparsify_bf16" in heads["sae_train"]["summary"]
    quality = heads["capture"]["bf16_quality.max_over_sites"]
    assert 0 < quality["relative_error"] < 0.1  # a bf16 copy of the model: close to fp32, not equal
    assert heads["mp_sae"]["speedup"]["encode_bf16_pursuit_vs_fp32_warm"] > 0
    sae = json.loads((out / "sae_train.json").read_text())["results"]
    assert set(sae) >= {"interp", "interp-bf16", "sparsify", "sparsify-bf16", "saelens", "saelens-bf16"}
    for row in sae.values():  # a held-out FVU curve per row, ending at its final FVU
        assert row["fvu_curve"][0]["step"] == 0 and row["fvu_curve"][-1]["heldout_fvu"] == row["final_fvu"]
    reach = heads["sae_train"]["summary"]["time_to_target"]
    assert set(reach["libraries"]) == set(sae) and reach["libraries"]["sparsify"]["rounds_reached"] == 1
    assert "time_to_target_vs_sparsify" in heads["sae_train"]["summary"]


class Parsed(Exception):
    """Raised in place of running a benchmark once its arguments parsed."""


def test_full_gpu_plan_parses_in_every_benchmark(run_all, tmp_path, monkeypatch):
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for name in run_all.BENCHMARKS:
        argv = run_all.plan(name, device="cuda", quick=False, out=tmp_path, work=tmp_path, cache=tmp_path / "c")
        assert argv[argv.index("--device") + 1] == "cuda"
        module = importlib.import_module(name)
        try:
            with pytest.raises(Parsed) as parsed:
                module.main(argv)
        finally:
            sys.modules.pop(name, None)
        assert vars(parsed.value.args[0])["device"] == "cuda" and not vars(parsed.value.args[0]).get("quick")
