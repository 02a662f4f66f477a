"""Sparse probing on the embedded SmolLM2-135M: a day-of-week neuron, and the experiment script end to end."""

import json
import runpy
import sys
from pathlib import Path

import pytest

import interp
import interp.models
import probes

pytestmark = pytest.mark.slow

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm():
    return interp.load_model("smollm2-135m", device="cpu")


def test_single_neuron_detects_unseen_day_names(smollm):
    model, tok = smollm
    texts, groups = [], []
    for i, day in enumerate(DAYS * 2):
        texts.append(f"The shop is closed on {day}. We bought fresh bread." if i < 7 else f"I will see you on {day}.")
        groups.append(day)
    texts += ["The shop is closed in June. We bought fresh bread.", "I will see you in March.",
              "The garden needs water.", "It was a long day at work."]
    groups += ["June", "March", "garden", "work"]
    ds = probes.token_dataset(model, tok, texts, ["blocks.4.mlp.hook_post"], progress=False,
                              label_fn=lambda t, i: int(t[i].strip() in DAYS))
    entity = [groups[g] for g in ds.groups.tolist()]
    res = probes.sweep(ds.acts, ds.labels, n_neurons=(1, 4), groups=entity, test_size=0.3, seed=0, progress=False)
    assert res.n_test > 0 and res.metric("blocks.4.mlp.hook_post", 4) >= 0.8


def test_experiment_quick_run(tmp_path, monkeypatch):
    script = ROOT / "experiments" / "sparse_probing_smollm2.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--quick", "--layers", "4,10", "--docs", "16",
                                      "--out", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["features"]) == {"day", "python", "french"}
    for name, feat in report["features"].items():
        assert set(feat["f1"]) == {"blocks.4.mlp.hook_post", "blocks.10.mlp.hook_post"}
        assert feat["best_single_neuron"]["top_held_out_tokens"]
        assert (tmp_path / f"f1_vs_k_{name}.png").is_file() and (tmp_path / f"neuron_{name}.png").is_file()
