"""benchmarks/sae_step_phases.py: quick mode times every phase of every step and records every round with the
ceiling measured beside it (timings are not tested); the phases cut each step without gaps or overlaps; the
encoder-kernel A/B trains on each kernel named, in alternating order."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import load_script


@pytest.fixture
def phases(monkeypatch):
    return load_script(monkeypatch, "benchmarks/sae_step_phases.py")


def test_quick_run_records_every_phase_of_every_round(phases, tmp_path):
    from saes import kernels
    from saes import trainer as trainer_module

    wrapped = (kernels.encoder_matmul, kernels.topk_indices, trainer_module.remove_parallel_grad,
               trainer_module.normalize_rows)
    out = tmp_path / "p.json"
    res = phases.main(["--quick", "--rounds", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert (kernels.encoder_matmul, kernels.topk_indices, trainer_module.remove_parallel_grad,
            trainer_module.normalize_rows) == wrapped  # the timers are taken off again
    assert len(res["rounds"]) == 3 and [r["ceiling_kernel"] for r in res["rounds"]]
    for r in res["rounds"]:
        assert r["steps_timed"] == res["steps"] - res["warmup"]
        assert set(r["ms"]) == {"step", *phases.PHASES}
        assert all(v >= 0 for p, v in r["ms"].items() if p not in ("rest", "loss_rest"))
        assert r["fraction_of_ceiling"] == pytest.approx(r["ceiling_ms"] / r["ms"]["step"])
    s = res["summary"]
    assert s["share_of_step"].keys() == set(phases.PHASES) and 0 < s["step_fraction_of_ceiling"]
    assert res["command"].startswith("python benchmarks/sae_step_phases.py --quick")



def test_profile_steps_records_the_free_running_steps_and_their_ops(phases, tmp_path):
    res = phases.main(["--quick", "--rounds", "1", "--profile-steps", "3", "--out", str(tmp_path / "p.json")])
    prof = res["profile"]
    assert prof["steps"] == 3 and len(prof["step_ms"]) == 3 and prof["step_ms_median"] > 0
    names = {op["name"] for op in prof["top_ops"]}
    assert "aten::addmm" in names or "aten::mm" in names  # the encoder matmul among the step's ops
    assert all(op["calls_per_step"] > 0 and op["self_cpu_ms_per_step"] >= 0 and op["on"] == "host"
               for op in prof["top_ops"])
    assert prof["device_ms_per_step"] is None and prof["kernel_launches_per_step"] == 0  # on the CPU
    reads = prof["host_reads_per_step"]  # the CPU's paths: the guard reads the loss every step there
    assert reads["steps"] == 3 and reads["by_op"]["_local_scalar_dense"] >= 1 and reads["total"] >= 1
    assert "profile" not in phases.main(["--quick", "--rounds", "1", "--out", str(tmp_path / "q.json")])

def test_each_step_is_cut_into_phases_that_add_up_to_it(phases):
    clock = phases.Clock("cpu")
    clock.batches = [0.0, 10.0, 20.0]
    for base in (0.0, 10.0):  # two steps with made-up times
        clock.events += [("encoder_matmul", base + 1, base + 3), ("top_k", base + 3, base + 4),
                         ("training_loss", base + 0.5, base + 5), ("projection", base + 6, base + 6.5),
                         ("renorm", base + 8, base + 8.25)]
    steps = clock.steps()
    assert len(steps) == 2
    for row in steps:
        assert row == pytest.approx({"step": 10, "encoder_matmul": 2, "top_k": 1, "loss_rest": 1.5, "backward": 1,
                                     "projection": 0.5, "optimizer": 1.5, "renorm": 0.25, "rest": 2.25})
        assert sum(row[p] for p in phases.PHASES) == pytest.approx(row["step"])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_kernel_ab_forces_each_kernel_in_alternating_order(phases, monkeypatch, tmp_path):
    from saes import kernels

    monkeypatch.setattr(kernels, "ONEDNN_MIN_FLOPS", 0)  # quick mode's tiny matmuls can take oneDNN too
    seen, onednn_calls, training = [], {"onednn": 0, "addmm": 0}, []
    real_run, real_limit, real_linear = phases.sae_train.run_ours, phases.sae_train.matmul_limit, kernels._linear

    def run_ours(*a, **kw):
        training.append("onednn" if kernels.prefer_onednn() else "addmm")
        seen.append(training[-1])
        try:
            return real_run(*a, **kw)
        finally:
            training.clear()

    def linear(*a):
        if training:
            onednn_calls[training[-1]] += 1
        return real_linear(*a)

    def limit(*a, **kw):
        seen.append("ceiling")
        return real_limit(*a, **kw)

    monkeypatch.setattr(phases.sae_train, "run_ours", run_ours)
    monkeypatch.setattr(phases.sae_train, "matmul_limit", limit)
    monkeypatch.setattr(kernels, "_linear", linear)
    res = phases.main(["--quick", "--rounds", "2", "--encoder-kernels", "onednn", "addmm",
                       "--out", str(tmp_path / "ab.json")])
    assert seen == ["ceiling", "onednn", "addmm", "addmm", "onednn", "ceiling"]
    assert onednn_calls["onednn"] > 0 and onednn_calls["addmm"] == 0
    assert res["encoder_kernel"] == ["onednn", "addmm"]
    for r in res["rounds"]:
        assert set(r["by_kernel"]) == {"onednn", "addmm"}
        for row in r["by_kernel"].values():
            assert row["fraction_of_ceiling"] == pytest.approx(r["ceiling_ms"] / row["ms"]["step"])
    s = res["summary"]
    assert set(s["by_kernel"]) == {"onednn", "addmm"}
    assert s["step_addmm_over_onednn"] == pytest.approx(statistics.median(
        r["by_kernel"]["addmm"]["ms"]["step"] / r["by_kernel"]["onednn"]["ms"]["step"] for r in res["rounds"]))


@pytest.mark.parametrize(("argv", "message"), [(["--device", "cuda"], "compares CPU kernels"),
                                                (["--encoder-kernels", "addmm", "addmm"], "names a kernel twice")])
def test_kernel_ab_refuses_what_it_cannot_compare(phases, capsys, argv, message):
    if "--device" in argv:
        argv = [*argv, "--encoder-kernels", "onednn", "addmm"]
    with pytest.raises(SystemExit):
        phases.main(["--quick", *argv])
    assert message in capsys.readouterr().err


def test_step_kernel_ab_trains_with_and_without_the_compiled_kernels(phases, monkeypatch, tmp_path):
    from saes import native

    if native.library() is None:
        with pytest.raises(SystemExit):  # refused with the reason, not timed as if built
            phases.main(["--quick", "--step-kernels", "native", "torch", "--out", str(tmp_path / "x.json")])
        return
    calls, arm = {"native": 0, "torch": 0}, []
    real_run, real_topk = phases.sae_train.run_ours, native.topk

    def run_ours(*a, **kw):
        arm.append("native" if native.library() is not None else "torch")
        try:
            return real_run(*a, **kw)
        finally:
            arm.clear()

    def topk(*a, **kw):
        calls[arm[-1]] += 1
        return real_topk(*a, **kw)

    monkeypatch.setattr(phases.sae_train, "run_ours", run_ours)
    monkeypatch.setattr(native, "topk", topk)
    res = phases.main(["--quick", "--rounds", "2", "--step-kernels", "native", "torch",
                       "--out", str(tmp_path / "ab.json")])
    assert calls["native"] > 0 and calls["torch"] == 0
    assert res["step_kernels"] == ["native", "torch"] and res["encoder_kernel"] in ("onednn", "addmm")
    for r in res["rounds"]:
        one_pass, three = r["by_kernel"]["native"]["ms"], r["by_kernel"]["torch"]["ms"]
        assert one_pass["projection"] == one_pass["renorm"] == 0 < three["projection"] and three["renorm"] > 0
        assert one_pass["optimizer"] > 0
    assert "step_torch_over_native" in res["summary"]
    with pytest.raises(SystemExit):
        phases.main(["--quick", "--step-kernels", "native", "--encoder-kernels", "addmm"])


def test_decode_kernels_ab_trains_each_path_per_round(phases, tmp_path):
    res = phases.main(["--quick", "--rounds", "2", "--decode-kernels", "embedding_bag", "bag_sum",
                       "--out", str(tmp_path / "d.json")])
    assert res["decode_kernel"] == ["embedding_bag", "bag_sum"]
    assert [sorted(r["by_kernel"]) for r in res["rounds"]] == [["bag_sum", "embedding_bag"]] * 2
    assert res["summary"]["step_bag_sum_over_embedding_bag"] > 0
    with pytest.raises(SystemExit):
        phases.main(["--quick", "--decode-kernels", "bag_sum", "--step-kernels", "torch"])
