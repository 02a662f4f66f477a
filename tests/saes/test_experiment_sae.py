"""The SmolLM2 SAE experiment, reduced, on the embedded model."""

from __future__ import annotations

import json
import runpy
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
