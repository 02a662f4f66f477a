"""The learning-rate study runs end to end at reduced size on a tiny model's caches of two sites."""

from __future__ import annotations

import json
import math

import pytest
from conftest import load_script, tiny_cache

SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


@pytest.fixture
def experiment(monkeypatch):
    return load_script(monkeypatch, "experiments/sae_lr_rule.py")


def test_lr_study_reduced(tmp_path, experiment, capsys):
    # one cache per site: the study reads a cache of one site
    caches = [tiny_cache(tmp_path / site, [site], 3000, shard_tokens=1000) for site in SITES]
    out = tmp_path / "out"
    args = ["--tune-cache", str(caches[0]), "--check-cache", str(caches[1]), "--out", str(out), "--shrink", "64",
            "--cells", "d9216_b4096_1ep", "check_d9216_b4096_1ep"]
    res = experiment.main(args)
    assert (out / "heldout_fvu_by_lr.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text()) == res
    assert all(str(c) not in res["command"] for c in caches) and "--tune-cache TUNE_CACHE" in res["command"]
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    peer = experiment.PEER
    assert set(runs) == {f"{c}_{a}" if a == peer else f"{c}_x{a:g}"
                         for c in ("d9216_b4096_1ep", "check_d9216_b4096_1ep")
                         for a in experiment.CELLS[c]["mults"]}
    for r in runs.values():
        assert r["site"] == SITES[0 if r["kind"] == "tune" else 1]
        assert r["d_sae"] == experiment.CELLS[r["cell"]]["d_sae"] // 64 and r["batch"] == 4096 // 64
        assert r["tokens"] == r["steps"] * r["batch"] and r["held_out_rows"] == experiment.HELD_OUT // 64
        if r["lr_mult"] == peer:  # sparsify's own signum rule, not a factor of ours
            assert r["lr"] == pytest.approx(5e-3 / (r["d_sae"] / 2**14) ** 0.5)
        else:
            assert r["lr"] == pytest.approx(r["lr_mult"] * experiment.old_rule(r["d_sae"]))
        assert math.isfinite(r["heldout_fvu"]) and math.isfinite(r["heldout_fvu_all_rows"])
        assert r["curve"][-1] == {"step": r["steps"], "tokens": r["tokens"], "heldout_fvu": r["heldout_fvu"]}
    one_pass = res["summary"]["d9216_b4096_1ep"]
    fvu = one_pass["heldout_fvu_by_lr_mult"]
    assert set(fvu) == {"x1", "x2", "x4", "x8", "x16"} and one_pass["best_lr_mult"] == min((v, float(k[1:]))
                                                                                    for k, v in fvu.items())[1]
    assert one_pass[peer] == runs[f"d9216_b4096_1ep_{peer}"]["heldout_fvu"]
    capsys.readouterr()
    assert experiment.main(args) == res  # a rerun finds every run done and trains nothing
    assert "held-out FVU" not in capsys.readouterr().out


def test_lr_study_step_and_decay_cells(tmp_path, experiment, monkeypatch):
    """A cell of a fixed step count trains that many steps whatever the cache's size, and a cell's
    ``decay_frac`` reaches the trainer's schedule (the other cells keep the trainer's)."""
    cache = tiny_cache(tmp_path / "c", [SITES[0]], 3000, shard_tokens=1000)
    seen = []
    real = experiment.TrainConfig

    def recording(*a, **kw):  # the schedule each run's config really holds
        cfg = real(*a, **kw)
        seen.append(cfg.decay_frac)
        return cfg

    monkeypatch.setattr(experiment, "TrainConfig", recording)
    cells = ["d9216_b1024_200st", "d9216_b1024_200st_decay50"]
    res = experiment.main(["--tune-cache", str(cache), "--out", str(tmp_path / "out"), "--shrink", "64",
                           "--cells", *cells])
    runs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*.json")}
    assert set(runs) == {"d9216_b1024_200st_x4", "d9216_b1024_200st_x8", f"d9216_b1024_200st_{experiment.PEER}",
                         "d9216_b1024_200st_decay50_x4", "d9216_b1024_200st_decay50_x8"}
    assert all(r["steps"] == 200 and r["batch"] == 1024 // 64 and r["tokens"] == 200 * 16 for r in runs.values())
    assert sorted(seen) == [0.2, 0.2, 0.5, 0.5]  # x4 and x8 of each cell; the peer has no such schedule
    assert all(runs[n]["decay_frac"] == 0.5 for n in runs if "decay50" in n)
    assert res["summary"]["d9216_b1024_200st_decay50"]["heldout_fvu_by_lr_mult"].keys() == {"x4", "x8"}
