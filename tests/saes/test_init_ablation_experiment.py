"""The encoder-initialisation ablation runs end to end at reduced size on a tiny model's cache."""

from __future__ import annotations

import json

import pytest
from conftest import load_script, tiny_cache

SITE = "blocks.1.hook_resid_post"


@pytest.fixture
def experiment(monkeypatch):
    """The script, reading the tiny model's site instead of the embedded model's layer 12."""
    mod = load_script(monkeypatch, "experiments/sae_init_ablation.py")
    monkeypatch.setattr(mod.bench, "SITE", SITE)
    return mod


def test_ablation_reduced(tmp_path, experiment):
    cache = tiny_cache(tmp_path / "cache", [SITE], 1500, shard_tokens=500)
    args = ["--cache", str(cache), "--out", str(tmp_path / "out"), "--shrink", "64", "--cells", "base",
            "batch1024_steps200", "archs"]
    res = experiment.main(args)
    assert (tmp_path / "out" / "heldout_fvu_by_scale.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == res
    # sparsify's encoder scale is measured on its own SparseCoder: nn.Linear's rows, about 1/sqrt(3)
    sp = res["sparsify_enc_init_scale_measured"]
    assert abs(sp - 3 ** -0.5) < 0.02
    runs = res["runs"]
    base = experiment.CELLS["base"]
    assert {r["arm"] for r in runs.values() if r["cell"] == "base"} == {"sparsify", *base["arms"]}
    assert runs["base/scale=sparsify"]["enc_init_scale"] == sp and runs["base/scale=1"]["enc_init_scale"] == 1.0
    assert runs["base/scale=sparsify lr=x2"]["lr"] == 2 * runs["base/scale=sparsify"]["lr"]
    assert runs["batch1024_steps200/scale=sparsify aux=1/8 dead=20480"]["aux_coeff"] == 1 / 8
    assert runs["base/init=sparsify"]["weights"] == "sparsify"
    for r in runs.values():
        assert 0 < r["heldout_fvu"] < 10 and r["tokens"] == r["batch"] * r["steps"]
        assert r["batch"] == (1024 if "batch1024" in r["cell"] else 4096) // 64
        if r["library"] == "interp":
            assert 0 <= r["heldout_l0"] <= (r["k"] if r["arch"] == "topk" else r["d_sae"])
            assert 0 <= r["heldout_fired_fraction"] <= 1
    archs = res["summary"]["archs"]  # the other architectures: no sparsify run, FVU and L0 at both scales
    assert set(archs) == set(experiment.CELLS["archs"]["arms"]) and "archs/sparsify" not in runs
    assert {a["enc_init_scale"] for a in archs.values()} == {1.0, sp}
    summary = res["summary"]["base"]
    assert set(summary["heldout_fvu_by_enc_init_scale"]) == {"1", f"{sp:.4g}", "0.3", "0.1"}
    assert summary["sparsify"] == runs["base/sparsify"]["heldout_fvu"]
    assert summary["best_scale"] in (1.0, sp, 0.3, 0.1)
    # a rerun into the same folder skips what is there
    again = experiment.main(args)
    assert again["runs"] == runs


def test_arms_change_one_setting_each(experiment):
    plain = experiment.arm_settings("scale=1", 0.5)
    for arm, changed in (("scale=0.3", {"enc_init_scale": 0.3}), ("scale=sparsify", {"enc_init_scale": 0.5}),
                         ("scale=sparsify b_dec=mean", {"enc_init_scale": 0.5, "b_dec_init": "mean"}),
                         ("scale=1 lr=x2", {"lr_mult": 2.0}),
                         ("init=sparsify", {"enc_init_scale": None, "weights": "sparsify"}),
                         ("arch=relu scale=sparsify", {"enc_init_scale": 0.5, "arch": "relu"}),
                         ("scale=sparsify aux=1/8 dead=20480", {"enc_init_scale": 0.5, "aux_coeff": 0.125,
                                                                "dead_tokens": 20480})):
        got = experiment.arm_settings(arm, 0.5)
        assert {k: v for k, v in got.items() if plain[k] != v} == changed, arm
    for cell in experiment.CELLS.values():
        for arm in cell["arms"]:
            experiment.arm_settings(arm, 0.5)  # every arm of the study parses
    with pytest.raises(ValueError, match="unknown arm setting 'lr=2'"):
        experiment.arm_settings("scale=1 lr=2", 0.5)
    # sparsify's scale does not depend on the dictionary's width
    assert abs(experiment.sparsify_enc_scale(64, 256) - experiment.sparsify_enc_scale(64, 4096)) < 0.02
