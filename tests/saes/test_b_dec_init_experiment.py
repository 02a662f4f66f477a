"""The b_dec initialisation study runs end to end at reduced size on a tiny model's cache."""

from __future__ import annotations

import json

import pytest
from conftest import load_script, tiny_cache

SITE = "blocks.1.hook_resid_post"
CELLS = ["l12_b1024", "l20_b1024", "l12_batchtopk", "l12_relu", "l12_jumprelu", "l12_mpsae", "l20_mpsae"]


@pytest.fixture
def experiment(monkeypatch):
    """The script, reading the tiny model's site for both layers."""
    mod = load_script(monkeypatch, "experiments/sae_b_dec_init.py")
    monkeypatch.setattr(mod, "SITES", {12: SITE, 20: SITE})
    monkeypatch.setattr(mod.bench, "SITE", SITE)
    return mod


def test_study_reduced(tmp_path, experiment):
    cache = tiny_cache(tmp_path / "cache", [SITE], 1500, shard_tokens=500)
    args = ["--cache", str(cache), "--layer20-cache", str(cache), "--out", str(tmp_path / "out"), "--shrink", "64",
            "--cells", *CELLS]
    res = experiment.main(args)
    assert (tmp_path / "out" / "heldout_fvu_vs_typical_mean.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == res
    assert "CACHE" in res["command"] and str(cache) not in res["command"]
    runs = res["runs"]
    assert all(r["command"] == res["command"] for r in runs.values())  # each run records its invocation
    cells = experiment.CELLS
    for name in CELLS:
        arms = {*experiment.ARMS, *(["sparsify"] if cells[name]["sparsify"] else []), *cells[name].get("extra", [])}
        for seed in range(cells[name]["seeds"]):
            assert {r["arm"] for r in runs.values() if r["cell"] == name and r["seed"] == seed} == arms
    for r in runs.values():
        assert 0 < r["heldout_fvu"] < 10 and r["tokens"] == r["batch"] * r["steps"]
        assert r["dist_typical_mean_geometric_median"] >= 0 and r["first_batch_massive_rows"] >= 0
        # without a massive row in the first batch the typical rows' mean is the plain mean
        if r["first_batch_massive_rows"] == 0:
            assert r["dist_mean_typical_mean"] == 0
        if r["arm"] == "sparsify":
            assert "heldout_l0" not in r
        else:  # MP-SAE's pursuit adds at most one atom per step
            assert 0 < r["heldout_l0"] <= (r["k"] if r["arch"] in ("topk", "batchtopk", "mpsae") else r["d_sae"])
    cell = res["summary"]["l12_b1024"]
    fvu = cell["heldout_fvu_by_seed"]
    gm = cell["vs_typical_mean"]["geometric_median"]
    assert gm["other_minus_typical_mean_per_seed"] == pytest.approx(
        [fvu["geometric_median"][s] - fvu["typical_mean"][s] for s in sorted(fvu["typical_mean"])])
    assert gm["seeds"] == list(range(cells["l12_b1024"]["seeds"]))
    assert "sparsify" in cell["vs_typical_mean"]
    assert "sparsify" not in res["summary"]["l12_batchtopk"]["vs_typical_mean"]
    assert "sparsify_init" in res["summary"]["l20_b1024"]["vs_typical_mean"]
    # a rerun into the same folder skips what is there
    again = experiment.main(args)
    assert again["runs"] == runs


def test_a_missing_cache_is_named(tmp_path, experiment):
    with pytest.raises(SystemExit, match="cell l20_b1024 reads layer 20: pass --layer20-cache"):
        experiment.main(["--cache", str(tmp_path), "--out", str(tmp_path / "o"), "--cells", "l20_b1024"])
