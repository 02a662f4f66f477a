"""The SmolLM2 SAE experiment and the CLI, reduced, on the embedded model."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_experiment_runs_reduced(tmp_path):
    mod = runpy.run_path(str(ROOT / "experiments" / "train_sae_smollm2.py"))
    res = mod["main"](["--out", str(tmp_path), "--tokens", "8192", "--batch-tokens", "1024", "--d-sae", "1152",
                       "--eval-tokens", "2048", "--eval-windows", "2", "--checkpoint-every", "4"])
    ev = res["eval"]
    assert 0 < ev["l0_mean"] <= 32 and ev["n_rows"] == 2048
    assert ev["explained_variance"] < 1 and ev["ce_with_sae"] >= ev["ce_clean"] - 0.5
    assert ev["n_predicted_tokens"] == 2 * 127
    site = tmp_path / "blocks.12.hook_resid_post"
    for f in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        assert (site / f).exists(), f
    assert json.loads((tmp_path / "report.json").read_text())["train_tokens"] == 8192
    assert (tmp_path / "eval" / "latent_density.png").exists()


@pytest.mark.slow
def test_cli_train_then_eval(tmp_path, capsys):
    from saes.cli import register
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"arch": "topk", "d_sae": 1152, "k": 16, "tokens": 2048, "batch_tokens": 1024,
                               "sites": ["blocks.3.hook_resid_post"], "context_size": 64}))
    args = parser.parse_args(["sae", "train", "--config", str(cfg), "--out", str(tmp_path / "run"),
                              "--checkpoint-every", "1"])
    assert args.func(args) == 0
    assert (tmp_path / "run" / "blocks.3.hook_resid_post" / "cfg.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "latest.json").exists()
    args = parser.parse_args(["sae", "eval", str(tmp_path / "run" / "blocks.3.hook_resid_post"), "--tokens", "1024",
                              "--windows", "1", "--context-size", "64", "--out", str(tmp_path / "ev")])
    assert args.func(args) == 0
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert rep["n_rows"] == 1024 and "ce_loss_recovered" in rep
    # --out naming the checkpoint itself stores the metrics in it, and it still loads
    folder = tmp_path / "run" / "blocks.3.hook_resid_post"
    args = parser.parse_args(["sae", "eval", str(folder), "--tokens", "1024", "--windows", "0", "--context-size", "64",
                              "--out", str(folder)])
    assert args.func(args) == 0
    from saes.checkpoint import read

    ck = read(folder)
    assert ck.training["metrics"]["n_rows"] == 1024 and ck.sparsity is not None


def test_cli_rejects_unknown_config_keys(tmp_path):
    import argparse

    from saes import SAEError
    from saes.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"arch": "topk", "d_sea": 10}))
    args = parser.parse_args(["sae", "train", "--config", str(cfg), "--out", str(tmp_path)])
    with pytest.raises(SAEError, match="d_sea"):
        args.func(args)
