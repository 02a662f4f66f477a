"""The penalised SAEs' sparsity study runs end to end at reduced size on a tiny model's cache."""

from __future__ import annotations

import json

import pytest
from conftest import load_script, tiny_cache

SITE = "blocks.1.hook_resid_post"


def test_study_reduced(tmp_path, monkeypatch):
    from saes.train_config import default_lr

    mod = load_script(monkeypatch, "experiments/sae_sparsity_defaults.py")
    monkeypatch.setattr(mod, "SITES", {12: SITE, 20: SITE})
    cache = tiny_cache(tmp_path / "cache", [SITE], 1200, shard_tokens=400)
    arms = ["topk_k32", "relu_l1_5e-4", "jumprelu_before", "jumprelu_f100", "jumprelu_f30_x4", "batchtopk_k32",
            "mpsae_n32_x0.25"]
    args = ["--cache", str(cache), "--layer20-cache", str(cache), "--out", str(tmp_path / "out"), "--steps", "6",
            "--d-sae", "128", "--batch", "64", "--arms", *arms]
    res = mod.main(args)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == res
    assert (tmp_path / "out" / "heldout_fvu_vs_l0.png").stat().st_size > 0
    assert "CACHE" in res["command"] and str(cache) not in res["command"]
    assert len(res["runs"]) == 2 * len(arms)
    assert all(r["command"] == res["command"] for r in res["runs"].values())  # each run records its invocation
    for r in res["runs"].values():
        assert 0 < r["heldout_fvu"] < 10 and 0 <= r["never_fire_on_heldout"] <= 1
        assert 0 < r["heldout_l0"] <= (32 if r["arch"] == "topk" else r["d_sae"])
        assert r["dense_codes_warning"] == (r["training_l0"][str(r["steps"])] > r["d_model"] / 2)
        assert list(r["training_l0"]) == ["6"] and r["d_model"] == 32
        assert ("threshold_quantiles_10_50_90" in r) == (r["arch"] == "jumprelu")
        scale = r["settings"].get("lr_scale", 4.0)  # TopK's arm: the trainer's default, 4 x the rule
        assert r["lr"] == pytest.approx(default_lr(128) * scale) and r["heldout_fvu_typical"] is not None
    assert set(res["summary"]) == {"layer 12", "layer 20"} and set(res["summary"]["layer 20"]) == set(arms)
    before = res["runs"]["l12/jumprelu_before/128/64/6/0"]["settings"]
    assert before["threshold_lr_factor"] == 1.0 and before["bandwidth"] == 1e-3 and before["lr_scale"] == 1.0
    assert res["runs"]["l12/jumprelu_f30_x4/128/64/6/0"]["lr"] == pytest.approx(4 * default_lr(128))
    again = mod.main(args)  # a rerun into the same folder skips what is there
    assert again["runs"] == res["runs"]
