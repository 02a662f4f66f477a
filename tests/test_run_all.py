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
    # the capture row that keeps its tensors on the model's device, compared with the peers that do the same
    assert heads["capture"]["speedup_vs_nnsight_all30_kept_on_device"] > 0
    assert heads["capture"]["speedup_vs_bridge_all30_kept_on_device"] > 0
    assert heads["sae_step_phases"]["profile.step_ms_median"] > 0  # the profiled free-running steps
    e2e = heads["sae_end_to_end"]["summary.tokens_per_s_ratio"]  # text in, SAE out: interp over each peer
    assert set(e2e) == {"interp_over_saelens", "interp_over_sparsify"} and all(r["median"] > 0 for r in e2e.values())
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


def test_full_mode_warms_up_before_the_timed_benchmarks_and_records_no_machine_paths(run_all, monkeypatch, tmp_path):
    calls = []

    def fake_process(cmd, log, timeout):  # stands in for each benchmark's process: writes the JSON it would
        calls.append([str(c) for c in cmd])
        if "--out" in cmd and cmd[1].endswith(".py") and "--quick" not in cmd:
            out = Path(cmd[cmd.index("--out") + 1])
            (run_all.ROOT / out if not out.is_absolute() else out).write_text(json.dumps({"summary": {}}))
        return "ok", ""

    monkeypatch.setattr(run_all, "run_process", fake_process)
    monkeypatch.setattr(run_all, "ROOT", tmp_path)  # the checkout the benchmark processes run in
    out = tmp_path / "results"
    assert run_all.main(["--device", "cuda", "--only", "sae_train", "sae_step_phases", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    steps = [c[2] if c[1] == "-m" else Path(c[1]).name for c in calls]
    assert steps == ["interp.cli", "sae_train.py", "sae_train.py", "sae_step_phases.py"]
    warm = calls[1]
    assert "--quick" in warm and warm[warm.index("--libraries") + 1:][:3] == list(run_all.LIBRARIES)
    assert summary["warmup"]["status"] == "ok" and "--quick" in summary["warmup"]["command"]
    recorded = [summary["cache"]["command"], summary["warmup"]["command"],
                *(row["command"] for row in summary["benchmarks"].values())]
    for command in recorded:  # the temporary cache is CACHE, the results folder is relative to the checkout
        assert "interp-bench-" not in command and str(tmp_path) not in command, command
    assert "--cache CACHE" in summary["benchmarks"]["sae_train"]["command"]
    assert "--out results/sae_train.json" in summary["benchmarks"]["sae_train"]["command"]
