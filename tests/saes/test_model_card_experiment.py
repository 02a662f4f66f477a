"""experiments/model_card_example.py runs end to end at a reduced size (train, evaluate, render the card)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_model_card_experiment_reduced(tmp_path):
    out, work = tmp_path / "card", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "experiments" / "model_card_example.py"), "--work", str(work), "--out", str(out),
           "--d-sae", "256", "--k", "8", "--tokens", "4096", "--batch-tokens", "1024", "--buffer-batches", "2",
           "--context-size", "64", "--eval-batches", "1", "--eval-windows", "2"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900, cwd=tmp_path)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "blocks.6.hook_resid_post" in card
    assert (out / "latent_density.png").is_file() and (out / "run.json").is_file()
