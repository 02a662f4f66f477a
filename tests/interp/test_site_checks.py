"""The layout check's verdicts and the block sites they govern, on tiny random models: blocks run more than
once, low-precision models, nested writes around resid_mid, encoder-decoder stacks, parallel or sequential."""

from __future__ import annotations

import pytest
import torch
import transformers as tr
from conftest import SPECIAL, VOCAB
from test_families import FAMILIES, tiny
from torch import nn
from transformers import CONFIG_MAPPING

from interp import ProjectOut, SiteError, Steer, Subspace, capture, intervene, site_names
from interp.layout_check import check_layout
from interp.layouts import KINDS, LAYOUTS
from interp.sites import find_blocks, is_parallel, resolve

_KV = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)


def _causal(model_type: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return tr.AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**{**_KV, **kw})).eval()


def _ids(batch=2, seq=6, seed=1) -> torch.Tensor:
    return torch.randint(3, 250, (batch, seq), generator=torch.Generator().manual_seed(seed))


# -- blocks the forward pass runs more than once --------------------------------------------------

def test_a_looped_block_gives_none_of_its_sites_not_even_its_boundaries():
    """Dory runs blocks 1 and 2 three times per pass: capture would return their first call only."""
    model = _causal("dory", num_hidden_layers=4, n_input_layers=1, n_recurrent_layers=2, n_output_layers=1,
                    n_recurrent_loops=3, head_dim=8)
    calls = []
    handle = find_blocks(model)[1].register_forward_hook(lambda _m, _a, out: calls.append(out))
    with torch.no_grad():
        model(input_ids=_ids())
    handle.remove()
    assert len(calls) == 3  # the premise: block 1 runs three times
    names = site_names(model)
    for layer in (1, 2):
        assert not [n for n in names if n.startswith(f"blocks.{layer}.")]
        for kind in ("hook_resid_pre", "hook_resid_post"):
            with pytest.raises(SiteError, match="reaches it 3 times"):
                resolve(model, f"blocks.{layer}.{kind}")
            with pytest.raises(SiteError, match="refused"):
                capture(model, _ids(), f"blocks.{layer}.{kind}")
    assert {"blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.3.hook_resid_post"} <= set(names)


class _Block(nn.Module):
    """A pre-norm block whose child names give the Llama layout."""

    def __init__(self, d=8):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.self_attn = nn.Linear(d, d)
        self.post_attention_layernorm = nn.LayerNorm(d)
        self.mlp = nn.Sequential()
        self.mlp.up_proj = nn.Linear(d, 2 * d)
        self.mlp.act = nn.GELU()
        self.mlp.down_proj = nn.Linear(2 * d, d)

    def forward(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class _Twice(nn.Module):
    """Runs its whole stack of blocks twice per forward pass."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for _ in range(2):
            for block in self.layers:
                h = block(h)
        return h


def test_the_check_sees_calls_after_the_deepest_sites_first_call():
    """A pass stopped at the first call of the deepest site saw every site of this model once."""
    torch.manual_seed(0)
    model = _Twice().eval()
    check = check_layout(model)
    assert check.accepted == ()
    every = {f"blocks.{i}.{k}" for i in range(2) for k in KINDS}
    assert set(check.refused) == every
    assert all("reaches it 2 times" in check.refused[n] for n in every)
    assert site_names(model) == []
    with pytest.raises(SiteError, match="reaches it 2 times"):
        capture(model, _ids(), "blocks.0.mlp.hook_post")


# -- low precision ---------------------------------------------------------------------------------

def _doge(dtype: torch.dtype, gain: float) -> nn.Module:
    """Doge (unlisted) scales the residual by a learned gain: resid_mid = gain * resid_pre + attn_out."""
    model = _causal("doge")
    with torch.no_grad():
        for block in find_blocks(model):
            block.input_residual.fill_(gain)
    return model.to(dtype)


def test_a_bfloat16_model_accepts_exactly_what_float32_accepts():
    wrong32, wrong16 = check_layout(_doge(torch.float32, 0.95)), check_layout(_doge(torch.bfloat16, 0.95))
    assert "blocks.1.hook_resid_mid" in wrong32.refused
    assert wrong16.accepted == wrong32.accepted
    assert set(wrong16.refused) == set(wrong32.refused)
    right32, right16 = check_layout(_doge(torch.float32, 1.0)), check_layout(_doge(torch.bfloat16, 1.0))
    assert "blocks.1.hook_resid_mid" in right16.accepted
    assert right16.accepted == right32.accepted
    assert max(right16.errors.values()) <= 1e-6


def test_a_model_too_large_to_copy_in_float32_is_checked_in_bfloat16_at_a_tolerance_that_still_tells(monkeypatch):
    """Above FLOAT32_CHECK_BYTES (a 7B bf16 model would need 28 GB more) the check runs in the model's dtype: the
    correct layout is still accepted and the residual scaled by 0.95 still refused."""
    import interp.layout_check as lc

    monkeypatch.setattr(lc, "FLOAT32_CHECK_BYTES", 0)
    wrong, right = check_layout(_doge(torch.bfloat16, 0.95)), check_layout(_doge(torch.bfloat16, 1.0))
    assert "blocks.1.hook_resid_mid" in wrong.refused and "blocks.1.hook_resid_mid" in right.accepted
    for family in _BF16:
        torch.manual_seed(0)
        model = tr.AutoModelForCausalLM.from_config(FAMILIES[family][0]()).eval().to(torch.bfloat16)
        assert check_layout(model).accepted == tuple(site_names(model)), family


_BF16 = ("llama", "gemma2", "granite", "gpt2", "opt", "phi3", "olmo2", "bloom")


@pytest.mark.parametrize("family", _BF16)
def test_the_check_in_bfloat16_accepts_every_listed_site_and_leaves_the_model_as_it_was(family):
    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(FAMILIES[family][0]()).eval().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    check = check_layout(model)
    assert check.accepted == tuple(site_names(model))
    assert max(check.errors.values()) <= 1e-6  # checked to float32 rounding
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert all(p is params[n] for n, p in model.named_parameters())


# -- resid_mid written through attention, with other writes around it ------------------------------

def _llama():
    torch.manual_seed(0)
    return tr.AutoModelForCausalLM.from_config(tr.LlamaConfig(**_KV, **SPECIAL)).eval()


def test_a_resid_mid_write_sees_the_resid_pre_and_attn_out_edits_whatever_the_nesting():
    model, x = _llama(), _ids()
    d = nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(2)), dim=0)
    mid, pre, attn = "blocks.1.hook_resid_mid", "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out"
    project = {mid: ProjectOut(Subspace(d[None]))}

    def read():
        return capture(model, x, mid)[mid]

    assert float((read() @ d).abs().mean()) > 1e-3
    for other in (pre, attn):
        steer = {other: Steer(3.0 * d)}
        with intervene(model, {**steer, **project}):
            want = read()  # one intervention: sorted into forward order
        with intervene(model, steer), intervene(model, project):
            outer_steer = read()
        with intervene(model, project), intervene(model, steer):
            outer_project = read()
        for got in (want, outer_steer, outer_project):
            assert float((got @ d).abs().max()) < 1e-5, other
            assert torch.allclose(got, want, atol=1e-6), other


def test_a_resid_mid_write_reads_resid_pre_after_a_hook_of_the_users_own():
    model, x = _llama(), _ids()
    d = nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(2)), dim=0)
    mid = "blocks.1.hook_resid_mid"
    block = find_blocks(model)[1]
    with intervene(model, {mid: ProjectOut(Subspace(d[None]))}):
        handle = block.register_forward_pre_hook(lambda _m, args: (args[0] + 3.0 * d, *args[1:]))
        try:
            got = capture(model, x, mid)[mid]
        finally:
            handle.remove()
    assert float((got @ d).abs().max()) < 1e-5


# -- encoder-decoder models --------------------------------------------------------------------------

_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
_BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)


@pytest.mark.parametrize(("build", "enc", "dec"), [
    (lambda: tr.BartModel(tr.BartConfig(**_BART)), "encoder.layers", "decoder.layers"),
    (lambda: tr.BartForConditionalGeneration(tr.BartConfig(**_BART)), "model.encoder.layers", "model.decoder.layers"),
    (lambda: tr.T5ForConditionalGeneration(tr.T5Config(**_T5)), "encoder.block", "decoder.block"),
])
def test_block_sites_of_an_encoder_decoder_are_refused_naming_both_stacks(build, enc, dec):
    torch.manual_seed(0)
    model = build().eval()
    for call in (lambda: site_names(model), lambda: resolve(model, "blocks.0.hook_resid_post"),
                 lambda: capture(model, _ids(1), "blocks.0.hook_resid_post")):
        with pytest.raises(SiteError) as err:
            call()
        said = str(err.value)
        assert "\n" not in said and f"'{enc}'" in said and f"'{dec}'" in said and f"'{enc}.0'" in said
    batch = {"input_ids": _ids(1), "decoder_input_ids": _ids(1, 4, seed=2)}
    got = capture(model, batch, f"{enc}.0")[f"{enc}.0"]
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert torch.equal(got, out.encoder_hidden_states[1])
    with pytest.raises(SiteError, match="intervene edits models with one stack of blocks; .* not supported"):
        intervene(model, {f"{enc}.0": Steer(torch.ones(32))})


def test_an_encoder_alone_keeps_its_block_sites():
    torch.manual_seed(0)
    model = tr.T5EncoderModel(tr.T5Config(**_T5)).eval()
    assert {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"} <= set(site_names(model))
    x = _ids(1)
    got = capture(model, x, "blocks.0.hook_resid_post")["blocks.0.hook_resid_post"]
    with torch.no_grad():
        assert torch.equal(got, model(input_ids=x, output_hidden_states=True).hidden_states[1])


# -- parallel or sequential -----------------------------------------------------------------------

@pytest.mark.parametrize(("model_type", "norm", "kw"), [("apertus", "feedforward_layernorm", {}),
                                                        ("vaultgemma", "pre_feedforward_layernorm", {"head_dim": 8})])
def test_unlisted_sequential_families_are_sequential_and_give_resid_mid(model_type, norm, kw):
    model = _causal(model_type, **kw)
    assert model_type not in LAYOUTS
    assert is_parallel(model) is False
    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_resid_mid"]
    block = find_blocks(model)[1]
    seen = []
    handle = block.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        acts = capture(model, _ids(), names, stop_early=False)
    finally:
        handle.remove()
    pre, attn, mid = (acts[n] for n in names)
    assert torch.allclose(mid, pre + attn, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(seen[0], block.get_submodule(norm)(mid))  # the MLP reads norm(resid_mid)


@pytest.mark.parametrize(("model_type", "kw"), [("apertus", {}), ("vaultgemma", {"head_dim": 8})])
def test_without_a_known_pre_mlp_norm_the_check_reads_the_mlp_input_to_tell(monkeypatch, model_type, kw):
    monkeypatch.setattr("interp.layouts._MID_NORM_NAMES", ("no_such_norm",))
    model = _causal(model_type, **kw)
    assert is_parallel(model) is False
    with pytest.raises(SiteError, match="the block is sequential"):
        resolve(model, "blocks.1.hook_resid_mid")
    assert "blocks.1.hook_attn_out" in site_names(model)


@pytest.mark.parametrize("family", ["gptj", "phi"])
def test_an_unlisted_parallel_family_is_found_parallel(monkeypatch, family):
    monkeypatch.delitem(LAYOUTS, family)
    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(FAMILIES[family][0]()).eval()
    assert is_parallel(model) is True
    with pytest.raises(SiteError, match="both read resid_pre.*hook_resid_pre' plus"):
        resolve(model, "blocks.1.hook_resid_mid")
    assert {"blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"} <= set(site_names(model))


def test_is_parallel_refuses_where_the_check_cannot_tell():
    class _NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8)
            self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            for block in self.layers:
                h = block(h)
            return h

    with pytest.raises(SiteError, match="cannot tell whether attention and MLP read the same residual"):
        is_parallel(_NoAttention().eval())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_check_tells_parallel_from_sequential_on_every_listed_family(family):
    structure = FAMILIES[family][1]
    check = check_layout(tiny(family))
    assert check.parallel is (None if structure is None else structure == "par")
    assert is_parallel(tiny(family)) is (structure == "par")
