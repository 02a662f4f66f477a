"""benchmarks/sae_train.py: the held-out FVU curve each library records and the time to a target FVU
(quick mode on the CPU, and the arithmetic on hand-made curves; tests never assert a wall-clock time)."""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ["interp", "interp-noguard", "sparsify", "saelens"]


@pytest.fixture(scope="module")
def sae_train():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("sae_train")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("sae_train", None)


@pytest.fixture(scope="module")
def quick(sae_train, tmp_path_factory):
    """One quick run with the default curve (4 steps: a point before every step and one after the last)."""
    return sae_train.main(["--quick", "--device", "cpu", "--out", str(tmp_path_factory.mktemp("q") / "q.json")])


def curve(*points):
    return [{"train_seconds": t, "heldout_fvu": f} for t, f in points]


def test_time_to_target_interpolates_between_the_bracketing_points(sae_train):
    c = curve((0.0, 1.0), (2.0, 0.5), (4.0, 0.2))
    assert sae_train.time_to_target(c, 0.35) == pytest.approx(3.0)
    assert sae_train.time_to_target(c, 0.5) == 2.0  # a point exactly on the target
    assert sae_train.time_to_target(c, 0.1) is None  # below every point: never reached
    assert sae_train.time_to_target(c, 1.5) == 0.0  # above the first point: there from the start
    # the first crossing counts, not a later one
    assert sae_train.time_to_target(curve((0.0, 1.0), (1.0, 0.3), (2.0, 0.8), (3.0, 0.1)), 0.5) == pytest.approx(5 / 7)
    # a non-finite point does not reach the target and brackets nothing
    assert sae_train.time_to_target(curve((0.0, 1.0), (1.0, math.nan), (2.0, 0.2)), 0.5) == 2.0


def test_target_summary_takes_sparsify_per_round_and_medians_of_per_round_ratios(sae_train):
    def run(final, points):
        return {"final_fvu": final, "fvu_curve": curve(*points)}

    runs = {"sparsify": [run(0.5, [(0, 1.0), (4, 0.5)]), run(0.4, [(0, 1.0), (6, 0.4)])],
            "interp": [run(0.3, [(0, 1.0), (1, 0.3)]), run(0.2, [(0, 1.0), (2, 0.2)])],
            "saelens": [run(0.45, [(0, 1.0), (3, 0.45)]), run(0.6, [(0, 1.0), (3, 0.6)])]}
    out = sae_train.target_summary(runs, None)
    assert out["target_fvu_per_round"] == [0.5, 0.4]  # sparsify's final FVU of each round
    lib = out["libraries"]
    assert lib["sparsify"]["time_to_target_s_per_round"] == [4, 6] and lib["sparsify"]["vs_sparsify"] == 1.0
    assert lib["interp"]["time_to_target_s_per_round"] == pytest.approx([1 * 0.5 / 0.7, 2 * 0.6 / 0.8])
    ratios = [1 * 0.5 / 0.7 / 4, 2 * 0.6 / 0.8 / 6]
    assert lib["interp"]["vs_sparsify_per_round"] == pytest.approx(ratios)
    assert lib["interp"]["vs_sparsify"] == pytest.approx(sum(ratios) / 2) and lib["interp"]["rounds_reached"] == 2
    # reached in one round of two: the per-round values say so, the medians are not made up
    assert lib["saelens"]["time_to_target_s_per_round"][1] is None and lib["saelens"]["rounds_reached"] == 1
    assert lib["saelens"]["time_to_target_s"] is None and lib["saelens"]["vs_sparsify"] is None
    fixed = sae_train.target_summary(runs, 0.6)
    assert fixed["target_fvu_per_round"] == [0.6, 0.6] and fixed["libraries"]["saelens"]["rounds_reached"] == 2
    assert sae_train.target_summary({"interp": runs["interp"]}, None) == {}  # no sparsify, no target: nothing
    assert out["rows"] == "all"


def test_typical_target_reads_the_typical_rows_of_the_reference_and_of_every_curve(sae_train):
    """One massive held-out row can rule the FVU over every row: the typical-row target leaves it out on both
    sides (the reference's final FVU and each curve)."""
    def run(final, final_typical, points):
        return {"final_fvu": final, "final_fvu_typical": final_typical,
                "fvu_curve": [{"train_seconds": t, "heldout_fvu": f, "heldout_fvu_typical": ft} for t, f, ft in points]}

    runs = {"sparsify": [run(0.65, 0.46, [(0, 1.0, 1.0), (10, 0.65, 0.46)])],
            "interp": [run(0.40, 0.47, [(0, 1.0, 1.0), (1, 0.40, 0.50), (3, 0.39, 0.45)])]}
    every = sae_train.target_summary(runs, None)
    assert every["libraries"]["interp"]["time_to_target_s_per_round"] == [pytest.approx(1 * 0.35 / 0.6)]
    typical = sae_train.target_summary(runs, None, typical=True)
    assert typical["rows"] == "typical" and typical["target_fvu_per_round"] == [0.46]
    assert typical["target"] == "sparsify's final held-out FVU (typical rows) in the same round"
    assert every["target"] == "sparsify's final held-out FVU (every row) in the same round"
    assert typical["libraries"]["interp"]["time_to_target_s_per_round"] == [pytest.approx(1 + 2 * 0.04 / 0.05)]
    assert typical["libraries"]["interp"]["vs_sparsify"] == pytest.approx((1 + 2 * 0.04 / 0.05) / 10)
    # curves without the typical figure (older results) reach nothing, rather than reading the all-rows one
    old = {lib: [{**r, "fvu_curve": [{k: v for k, v in p.items() if k != "heldout_fvu_typical"}
                                     for p in r["fvu_curve"]]} for r in rs] for lib, rs in runs.items()}
    assert sae_train.target_summary(old, None, typical=True)["libraries"]["interp"]["rounds_reached"] == 0
    assert sae_train.target_summary({"sparsify": [{"final_fvu": 0.5, "fvu_curve": []}]}, None, typical=True) == {}


def test_timer_takes_evaluation_time_off_the_training_clock(sae_train, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(sae_train.time, "perf_counter", lambda: clock[0])

    def slow_eval(sae, recon, held):  # each evaluation "takes" 100 s
        clock[0] += 100.0
        return {"fvu": 0.5, "fvu_typical": 0.4}

    monkeypatch.setattr(sae_train, "heldout_report", slow_eval)
    timer = sae_train.Timer(steps=5, every=2, held=[None], batch=8)
    timer.watch(None, lambda x: x)
    for _ in range(5):
        timer.tick()
        clock[0] += 1.0  # a training step takes 1 s
    timer.tick()
    assert [p["step"] for p in timer.curve] == [0, 2, 4]
    assert [p["train_seconds"] for p in timer.curve] == [0.0, 2.0, 4.0]
    assert [p["tokens"] for p in timer.curve] == [0, 16, 32]
    assert [(p["heldout_fvu"], p["heldout_fvu_typical"]) for p in timer.curve] == [(0.5, 0.4)] * 3
    assert timer.t[-1] - timer.t[0] == 5.0 and timer.eval_seconds == 300.0


def test_timer_on_cuda_stamps_events_and_waits_only_at_evaluations(sae_train, monkeypatch):
    stream = [0.0]  # the device's clock: an event "runs" when recorded, at the stream's time then
    waits = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            self.at = stream[0]

        def elapsed_time(self, other):
            return (other.at - self.at) * 1000

        def synchronize(self):
            waits.append("event")

    monkeypatch.setattr(sae_train.torch.cuda, "Event", Event)
    monkeypatch.setattr(sae_train.torch.cuda, "synchronize", lambda: waits.append("device"))
    monkeypatch.setattr(sae_train.Timer, "_on_cuda", lambda self: True)

    def slow_eval(sae, recon, held):  # each evaluation keeps the stream busy 100 s
        stream[0] += 100.0
        return {"fvu": 0.5}

    monkeypatch.setattr(sae_train, "heldout_report", slow_eval)
    timer = sae_train.Timer(steps=6, every=3, held=[None], batch=8)
    timer.watch(None, lambda x: x)
    for _ in range(6):
        timer.tick()
        stream[0] += 1.0  # a training step keeps it busy 1 s
    assert waits == ["device", "event"] * 2  # at each evaluation only: reading t, and the evaluation's end
    timer.tick()
    assert [p["train_seconds"] for p in timer.curve] == [0.0, 3.0]
    assert timer.t == [float(s) for s in range(7)] and timer.eval_seconds == 200.0


def test_quick_run_records_a_curve_per_library_ending_at_the_final_fvu(quick):
    assert quick["eval_every"] == 1 and quick["steps"] == 4
    batch = quick["batch_tokens"]
    for lib in LIBRARIES:
        row = quick["results"][lib]
        for pts in [row["fvu_curve"], *row["fvu_curve_all_repeats"]]:
            steps = [p["step"] for p in pts]
            assert steps == list(range(quick["steps"] + 1)), (lib, steps)
            assert [p["tokens"] for p in pts] == [s * batch for s in steps]
            seconds = [p["train_seconds"] for p in pts]
            assert seconds[0] == 0.0 and all(a <= b for a, b in zip(seconds, seconds[1:])), (lib, seconds)
            assert all(math.isfinite(p["heldout_fvu"]) and p["heldout_fvu"] > 0 for p in pts), (lib, pts)
        assert row["fvu_curve"][-1]["heldout_fvu"] == row["final_fvu"]
        # the FVU without massive held-out rows, every repeat: one such row can rule the all-rows figure
        assert len(row["final_fvu_typical_all_repeats"]) == len(row["final_fvu_all_repeats"])
        assert row["final_fvu_typical"] in row["final_fvu_typical_all_repeats"]
        assert row["fvu_curve"][-1]["train_seconds"] == row["train_seconds"] and row["eval_seconds_excluded"] > 0


def test_quick_run_summary_times_each_library_to_sparsify_final_fvu(sae_train, quick):
    reach = quick["summary"]["time_to_target"]
    target = quick["results"]["sparsify"]["final_fvu"]
    assert reach["target_fvu_per_round"] == [target]
    for lib in LIBRARIES:
        row = reach["libraries"][lib]
        assert row["time_to_target_s_per_round"] == [sae_train.time_to_target(quick["results"][lib]["fvu_curve"],
                                                                              target)]
    spars = reach["libraries"]["sparsify"]["time_to_target_s"]
    assert spars is not None and 0 < spars <= quick["results"]["sparsify"]["train_seconds"]  # reaches its own FVU
    ours = reach["libraries"]["interp"]["time_to_target_s"]
    if ours is None:
        assert quick["summary"]["time_to_target_vs_sparsify"] is None
    else:
        assert quick["summary"]["time_to_target_vs_sparsify"] == pytest.approx(ours / spars)
    typical = quick["summary"]["time_to_target_typical"]
    assert typical["rows"] == "typical"
    assert typical["target_fvu_per_round"] == [quick["results"]["sparsify"]["final_fvu_typical"]]
    for lib in LIBRARIES:
        pts = quick["results"][lib]["fvu_curve"]
        assert all(math.isfinite(p["heldout_fvu_typical"]) for p in pts)
        assert pts[-1]["heldout_fvu_typical"] == quick["results"][lib]["final_fvu_typical"]


def test_curve_leaves_training_alone_and_follows_eval_every_and_target(sae_train, quick, tmp_path):
    off = sae_train.main(["--quick", "--device", "cpu", "--eval-every", "0", "--out", str(tmp_path / "off.json")])
    assert "time_to_target" not in off["summary"]
    for lib in LIBRARIES:  # the evaluations do not change what any library trains
        assert "fvu_curve" not in off["results"][lib]
        assert off["results"][lib]["final_fvu"] == quick["results"][lib]["final_fvu"], lib
    sparse = sae_train.main(["--quick", "--device", "cpu", "--eval-every", "3", "--target-fvu", "2.0",
                             "--libraries", "interp", "sparsify", "--out", str(tmp_path / "three.json")])
    assert [p["step"] for p in sparse["results"]["interp"]["fvu_curve"]] == [0, 3, 4]
    assert sparse["summary"]["time_to_target"]["target_fvu_per_round"] == [2.0]
    with pytest.raises(SystemExit, match="--eval-every is -1"):
        sae_train.main(["--quick", "--eval-every", "-1", "--out", str(tmp_path / "bad.json")])


def test_recorded_command_names_no_cache_path(sae_train):
    cmd = sae_train.recorded_command("benchmarks/sae_train.py", ["--cache", "/data/c12", "--steps", "5"])
    assert cmd == "python benchmarks/sae_train.py --cache CACHE --steps 5"
    assert sae_train.recorded_command("x.py", ["--cache=/data/c12", "--quick"]) == "python x.py --cache=CACHE --quick"
    assert (sae_train.recorded_command("x.py", ["--tune-cache", "/a", "--check-cache=/b", "--out", "o"])
            == "python x.py --tune-cache TUNE_CACHE --check-cache=CHECK_CACHE --out o")


def test_rows_at_each_library_defaults_record_their_own_rate_and_evaluate_without_changing_training(sae_train,
                                                                                                   tmp_path):
    from saes.topk import TopKSAE
    from saes.train_config import default_lr

    libs = ["interp-default", "sparsify-signum"]
    on = sae_train.main(["--quick", "--device", "cpu", "--lr", "0.001", "--libraries", *libs,
                         "--out", str(tmp_path / "on.json")])
    d_sae = on["d_sae"]
    # the trainer's own default for TopK, not the --lr every other row shares
    assert on["results"]["interp-default"]["lr"] == default_lr(d_sae) * TopKSAE.default_lr_factor
    assert TopKSAE.default_lr_factor == 4
    assert on["results"]["sparsify-signum"]["lr"] == pytest.approx(5e-3 / (d_sae / 2**14) ** 0.5)
    off = sae_train.main(["--quick", "--device", "cpu", "--lr", "0.001", "--eval-every", "0", "--libraries", *libs,
                          "--out", str(tmp_path / "off.json")])
    for lib in libs:  # evaluating the schedule-free average mid-run leaves the training weights exactly alone
        assert on["results"][lib]["final_fvu"] == off["results"][lib]["final_fvu"], lib
        assert math.isfinite(on["results"][lib]["final_fvu"])


def test_seed_summary_pairs_each_seed_and_counts_the_seeds_where_this_project_is_at_or_below(sae_train):
    def run(seed, fvu):
        return {"seed": seed, "final_fvu": fvu}

    runs = {"interp": [run(0, 0.30), run(1, 0.32), run(2, 0.31), run(0, 0.30)],  # seed 0 twice: one FVU
            "sparsify": [run(0, 0.31), run(1, 0.31), run(2, 0.33), run(0, 0.31)],
            "saelens": [run(0, 0.40)]}  # one seed only: no comparison
    out = sae_train.seed_summary(runs)
    assert out["final_fvu_by_seed"]["interp"] == {"0": 0.30, "1": 0.32, "2": 0.31}
    sp = out["vs_interp"]["sparsify"]
    assert sp["seeds"] == [0, 1, 2]
    assert sp["fvu_minus_interp_per_seed"] == pytest.approx([0.01, -0.01, 0.02])
    assert sp["mean"] == pytest.approx(0.02 / 3) and sp["seeds_interp_at_or_below"] == 2
    assert sp["standard_error"] == pytest.approx(statistics.stdev([0.01, -0.01, 0.02]) / 3 ** 0.5)
    assert "saelens" not in out["vs_interp"]


def test_a_seed_sets_the_initial_weights_and_the_batch_order(sae_train):
    def fvu(seed: int, lib: str = "interp") -> float:
        args = argparse.Namespace(cache=None, batch=128, steps=4, eval_batches=1, device="cpu", lr=None, k=8,
                                  d_sae=256, eval_every=0, worker=lib, seed=seed)
        return sae_train.worker(args)["final_fvu"]

    first, second = sae_train.load_batches(None, 128, 4, 1, 0), sae_train.load_batches(None, 128, 4, 1, 1)
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))  # the same held-out rows
    assert not torch.equal(first[0][0], second[0][0])  # training rows in another order
    assert fvu(0) == fvu(0) != fvu(1)
    assert fvu(0, "sparsify") != fvu(1, "sparsify")


def test_bf16_summary_compares_the_two_rows_of_each_round(sae_train):
    def run(tps, fvu):
        return {"tokens_per_s": tps, "final_fvu": fvu}

    runs = {"interp": [run(10, 0.30), run(20, 0.40)], "interp-bf16": [run(15, 0.303), run(50, 0.38)]}
    out = sae_train.bf16_summary(runs)["interp"]
    assert out["tokens_per_s_ratio_per_round"] == [1.5, 2.5] and out["tokens_per_s_ratio"] == 2.0
    assert out["final_fvu_relative_change_per_round"] == pytest.approx([0.01, -0.05])
    assert out["final_fvu_relative_change"] == pytest.approx(-0.02)
    assert (out["final_fvu_fp32"], out["final_fvu_bf16"]) == (0.30, 0.303)


def test_done_runs_skips_what_is_there_and_refuses_another_shrink(tmp_path, sae_train):
    path = tmp_path / "results.json"
    assert sae_train.done_runs(path, 1) == {}
    path.write_text('{"shrink": 4, "runs": {"cell/arm/0": {"heldout_fvu": 0.5}}}')
    assert sae_train.done_runs(path, 4) == {"cell/arm/0": {"heldout_fvu": 0.5}}
    with pytest.raises(SystemExit, match="written with --shrink 4; use another --out"):
        sae_train.done_runs(path, 1)


def test_quick_run_records_the_machine_that_sets_its_speeds(quick):
    import torch

    m = quick["machine"]
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["eai-sparsify"]


def test_bf16_rows_are_left_out_with_the_reason_where_bf16_products_are_slow(sae_train, monkeypatch):
    from interp import precision

    args = argparse.Namespace(bf16=True, quick=False, device="cpu")
    monkeypatch.setattr(precision, "matmul_slowdown", lambda kind, dtype: 50.0)
    why = sae_train.slow_bf16(args)
    assert why.startswith("--bf16 rows left out") and "50x" in why
    assert sae_train.slow_bf16(argparse.Namespace(bf16=True, quick=True, device="cpu")) is None  # tiny sizes run
    assert sae_train.slow_bf16(argparse.Namespace(bf16=False, quick=False, device="cpu")) is None
    monkeypatch.setattr(precision, "matmul_slowdown", lambda kind, dtype: 0.7)
    assert sae_train.slow_bf16(args) is None


def test_runs_alternate_with_the_ceiling_timed_beside_each_round(sae_train):
    assert sae_train.run_order(["a", "b"], 3, [7, 8]) == [
        ("ceiling", 0), ("a", 7), ("b", 7), ("b", 8), ("a", 8), ("ceiling", 1), ("ceiling", 2), ("a", 7), ("b", 7)]


def test_quick_run_pairs_each_round_with_its_own_ceiling(quick):
    limits = quick["encoder_matmul_limit"]["per_round"]
    assert len(limits) == len(quick["summary"]["fraction_of_encoder_matmul_limit_per_round"]) == 1
    for lib, key in (("interp", ""), ("saelens", "saelens_"), ("sparsify", "sparsify_")):
        per_round = [t / lim["tokens_per_s"] for t, lim in
                     zip(quick["results"][lib]["tokens_per_s_all_repeats"], limits)]
        assert quick["summary"][f"{key}fraction_of_encoder_matmul_limit_per_round"] == pytest.approx(per_round)
        assert quick["summary"][f"{key}fraction_of_encoder_matmul_limit_paired"] == pytest.approx(
            statistics.median(per_round))
    assert all(lim["kernel"] in lim for lim in limits)
