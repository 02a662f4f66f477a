"""The embedded SmolLM2-135M model: loads offline, captures, and agrees with TransformerLens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from interp import capture, load_model
from interp.cache import CachedActivations
from interp.models import _embedded_copy
from interp.store import ActivationStore

pytestmark = pytest.mark.slow
PROMPTS = ["I will see you on Monday. To repeat, I will see you on", "Today is Friday."]


def test_loads_offline_and_predicts_the_copied_day(smol):
    model, tok = smol
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    enc = tok(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        top = model(**enc).logits[0, -1].argmax()
    assert tok.decode(top) == " Monday"


def test_capture_on_embedded_model_matches_hidden_states(smol):
    model, tok = smol
    acts = capture(model, PROMPTS, ["blocks.0.hook_resid_pre", "blocks.12.hook_resid_post"], tokenizer=tok)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    mask = enc["attention_mask"].bool()
    assert torch.equal(acts["blocks.12.hook_resid_post"][mask], hs[13][mask])
    assert acts["blocks.12.hook_resid_post"].shape == (2, enc["input_ids"].shape[1], 576)


def test_capture_through_transformer_bridge_equals_bare_model(smol):
    from transformer_lens.model_bridge import TransformerBridge

    _, tok = smol
    model, _ = load_model("smollm2-135m", device="cpu")  # the bridge switches attention in place
    sites = ["blocks.3.hook_resid_post", "blocks.5.hook_resid_mid", "blocks.7.mlp.hook_post"]
    bare = capture(model, PROMPTS, sites, tokenizer=tok)
    bridge = TransformerBridge.boot_transformers(str(_embedded_copy()), hf_model=model, tokenizer=tok)
    with pytest.warns(RuntimeWarning, match="TransformerBridge, which computes attention eagerly"):
        through = capture(bridge, PROMPTS, sites, tokenizer=tok)
    for s in sites:
        torch.testing.assert_close(through[s], bare[s], rtol=1e-4, atol=1e-4)
    # and TransformerLens' own cache agrees with ours at the residual stream
    ids = tok(PROMPTS[:1], return_tensors="pt")["input_ids"]
    _, cache = bridge.run_with_cache(ids)
    ours = capture(bridge, ids, "blocks.3.hook_resid_post")["blocks.3.hook_resid_post"]
    torch.testing.assert_close(cache["blocks.3.hook_resid_post"], ours, rtol=1e-4, atol=1e-4)


def test_live_store_on_default_corpus(smol):
    model, tok = smol
    store = ActivationStore(model, tok, "blocks.6.hook_resid_post", batch_tokens=256, buffer_tokens=512,
                            context_size=64, max_windows=16)
    batch = next(iter(store))["blocks.6.hook_resid_post"]
    assert batch.shape == (256, 576) and torch.isfinite(batch).all()
    # position 0 (attention sink, norms in the hundreds) is excluded by default
    assert batch.norm(dim=-1).max() < 10 * batch.norm(dim=-1).median()


def test_capture_cli_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m interp.cli capture ...` writes one cache from two ranks."""
    out = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "interp.cli", "capture",
           "--sites", "blocks.2.hook_resid_post", "--tokens", "600", "--out", str(out), "--context-size", "64",
           "--shard-tokens", "200"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    ranks = sorted(p.name for p in out.glob("manifest.rank*.json"))
    assert ranks == ["manifest.rank0.json", "manifest.rank1.json"]
    assert all(json.loads((out / r).read_text())["complete"] for r in ranks)
    reader = CachedActivations(out, batch_tokens=100)
    assert reader.n_tokens >= 600 and reader.d_model == 576
