"""Distributed alignment search: a trainable orthonormal rotation learned through an edited forward."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from interp.das import RotatedPatch, fit_das
from interp.edits import EditContext
from interp.errors import InputError
from interp.intervene import intervene

V, D = 40, 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def _acc(model, das, base, labels, site):
    with torch.no_grad(), intervene(model, {site: das}, positions="last"):
        return float((model(**base).logits[:, -1].argmax(-1) == labels).float().mean())


def test_rotated_patch_stays_orthonormal_and_full_rank_is_a_full_patch():
    das = RotatedPatch(D, D)
    w = das.W.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(D), atol=1e-5, rtol=0)
    x, src = torch.randn(3, D), torch.randn(3, D)
    out = das.set_source(src)(x, EditContext(torch.arange(3), torch.zeros(3, dtype=torch.long), None))
    torch.testing.assert_close(out, src, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="rank"):
        RotatedPatch(D, D + 1)


def test_fit_das_learns_a_subspace_that_carries_the_source_answer(model):
    site = "blocks.0.hook_resid_post"
    g = torch.Generator().manual_seed(0)
    n = 32
    base = {"input_ids": torch.randint(0, V, (n, 6), generator=g)}
    base["attention_mask"] = torch.ones_like(base["input_ids"])
    source = {"input_ids": torch.randint(0, V, (n, 6), generator=g)}
    source["attention_mask"] = torch.ones_like(source["input_ids"])
    with torch.no_grad():
        labels = model(**source).logits[:, -1].argmax(-1)  # the answer of the source run
    untrained = RotatedPatch(D, 4, seed=0).set_source(
        __import__("interp").capture(model, source, site, positions="last")[site])
    before = _acc(model, untrained, base, labels, site)
    das = fit_das(model, site, base, source, labels, rank=4, steps=30, lr=0.05)
    after = _acc(model, das, base, labels, site)
    assert after >= before + 0.2, (before, after)
    assert all(p.requires_grad for p in model.parameters())  # model flags restored
    w = das.subspace().basis
    torch.testing.assert_close(w @ w.T, torch.eye(4), atol=1e-4, rtol=0)
