"""Capture's positions against the model's own forward: RoBERTa's own position numbering, sites whose output is
flattened over tokens, and slices that start before the prompt."""

from __future__ import annotations

import pytest
import torch
import transformers as tr

from interp import Steer, capture, intervene

_C = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=128)
_P = dict(bos_token_id=256, eos_token_id=257, pad_token_id=258)


@pytest.mark.parametrize("config,model_class", [(tr.RobertaConfig, tr.RobertaModel),
                                                (tr.XLMRobertaConfig, tr.XLMRobertaModel),
                                                (tr.CamembertConfig, tr.CamembertModel)])
def test_roberta_family_activations_are_the_models_own(config, model_class):
    """Capture passed positions counted from 0; RoBERTa numbers them from its padding token + 1 (every activation
    was off by up to 2.5). Its own numbering is used, right padding (with its pad token) included."""
    torch.manual_seed(0)
    model = model_class(config(**_C, pad_token_id=1)).eval()
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 1, 0
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    acts = capture(model, {"input_ids": ids, "attention_mask": mask}, ["blocks.0.hook_resid_pre",
                                                                       "blocks.0.hook_resid_post"])
    real = mask.bool()
    assert torch.equal(acts["blocks.0.hook_resid_pre"][real], hs[0][real])
    assert torch.equal(acts["blocks.0.hook_resid_post"][real], hs[1][real])


def _opt():
    torch.manual_seed(0)
    return tr.AutoModelForCausalLM.from_config(tr.OPTConfig(
        vocab_size=300, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, **_P)).eval()


def test_a_module_output_flattened_over_tokens_is_read_per_token():
    """OPT's fc1 returns [batch * seq, width]: positions read dim 1 as the sequence ('last' gave column 5 of every
    token's row; a slice the first features). It is now read as [batch, seq, width]."""
    model, site = _opt(), "model.decoder.layers.0.fc1"
    x = torch.randint(3, 250, (2, 5), generator=torch.Generator().manual_seed(1))
    seen = []
    handle = model.model.decoder.layers[0].fc1.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model(input_ids=x)
    handle.remove()
    ref = seen[0].reshape(2, 5, 64)
    assert torch.equal(capture(model, x, site)[site], ref)
    assert torch.equal(capture(model, x, site, positions="last")[site], ref[:, -1])
    assert torch.equal(capture(model, x, site, positions=[0, 3])[site], ref[:, [0, 3]])
    assert torch.equal(capture(model, x, site, positions=slice(1, 3))[site], ref[:, 1:3])


@pytest.mark.parametrize("cols", [slice(-10, None, 3), slice(-8, None, 2), slice(-10, 4), slice(-3, -1),
                                  slice(1, None, 4)])
def test_intervene_edits_the_columns_capture_reads_for_slices_starting_before_the_prompt(cols):
    """slice(-10, None, 3) on 6 tokens is columns 0 and 3 in Python and capture; intervene edited 2 and 5."""
    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(tr.LlamaConfig(**{**_C, "num_key_value_heads": 2}, **_P)).eval()
    x = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(1))
    site = "blocks.0.hook_resid_post"
    clean = capture(model, x, site)[site]
    with intervene(model, {site: Steer(torch.ones(32))}, positions=cols):
        edited = capture(model, x, site)[site]
    assert (edited != clean).any(-1)[0].nonzero()[:, 0].tolist() == list(range(6))[cols]
