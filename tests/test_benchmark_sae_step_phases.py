"""benchmarks/sae_step_phases.py: quick mode times every phase of every step and records every round with the
ceiling measured beside it (timings are not tested); the phases cut each step without gaps or overlaps."""

from __future__ import annotations

import json

import pytest
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
