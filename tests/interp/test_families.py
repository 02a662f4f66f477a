"""Every block site of every listed family is right or refused, held against each family's own forward
code on tiny random models: the block algebra (both padding sides), writes, refusals and site_names."""

from __future__ import annotations

import functools
import inspect
import warnings

import pytest
import torch
import transformers as tr
from conftest import SPECIAL, VOCAB
from torch import nn

from interp import SiteError, Steer, capture, intervene, site_names
from interp.capture import position_ids_for
from interp.layout_check import check_layout
from interp.layouts import KINDS, LAYOUTS
from interp.sites import find_blocks, resolve

TOL = 1e-6  # relative to the largest magnitude involved
_C = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
          max_position_embeddings=128, **SPECIAL)
_KV = dict(_C, num_key_value_heads=2)
_GPT = dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_inner=64, n_positions=128, **SPECIAL)
_FALCON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, **SPECIAL)
_OPT = dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=32, **SPECIAL)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

# family -> (config, block structure as each family's decoder layer computes it):
# "seq": mid = pre + attn, post = mid + mlp;  "par": post = pre + attn + mlp;
# (norm_1, norm_2): post-norm, mid = norm_1(pre + attn), post = norm_2(mid + mlp).
FAMILIES = {
    "llama": (lambda: tr.LlamaConfig(**_KV), "seq"),
    "mistral": (lambda: tr.MistralConfig(**_KV), "seq"),
    "mixtral": (lambda: tr.MixtralConfig(**_KV, num_local_experts=4, num_experts_per_tok=2), "seq"),
    "qwen2": (lambda: tr.Qwen2Config(**_KV), "seq"),
    "qwen2_moe": (lambda: tr.Qwen2MoeConfig(**_KV, **_MOE, num_experts=4, shared_expert_intermediate_size=32), "seq"),
    "qwen3": (lambda: tr.Qwen3Config(**_KV, head_dim=8), "seq"),
    "qwen3_moe": (lambda: tr.Qwen3MoeConfig(**_KV, **_MOE, head_dim=8, num_experts=4, mlp_only_layers=[1]), "seq"),
    "gemma": (lambda: tr.GemmaConfig(**_KV, head_dim=8), "seq"),
    "gemma2": (lambda: tr.Gemma2Config(**_KV, head_dim=8, query_pre_attn_scalar=8, sliding_window=16), "seq"),
    "gemma3": (lambda: tr.Gemma3TextConfig(**_KV, head_dim=8, query_pre_attn_scalar=8, sliding_window=16), "seq"),
    "phi3": (lambda: tr.Phi3Config(**_KV), "seq"),
    "phi": (lambda: tr.PhiConfig(**_KV), "par"),
    "olmo": (lambda: tr.OlmoConfig(**_KV), "seq"),
    "olmo2": (lambda: tr.Olmo2Config(**_KV), "seq"),
    "olmo3": (lambda: tr.Olmo3Config(**_KV), "seq"),
    "granite": (lambda: tr.GraniteConfig(**_KV, residual_multiplier=0.22, embedding_multiplier=12.0,
                                         attention_multiplier=0.0625, logits_scaling=8.0), "seq"),
    "gpt2": (lambda: tr.GPT2Config(**_GPT), "seq"),
    "gpt_bigcode": (lambda: tr.GPTBigCodeConfig(**_GPT), "seq"),
    "gpt_neox": (lambda: tr.GPTNeoXConfig(**_C, use_parallel_residual=True), "par"),
    "gpt_neox_seq": (lambda: tr.GPTNeoXConfig(**_C, use_parallel_residual=False), "seq"),
    "gptj": (lambda: tr.GPTJConfig(**_GPT, rotary_dim=4), "par"),
    "codegen": (lambda: tr.CodeGenConfig(**_GPT, rotary_dim=4, n_ctx=128), "par"),
    "falcon": (lambda: tr.FalconConfig(**_FALCON, parallel_attn=True, new_decoder_architecture=False), "par"),
    "falcon_seq": (lambda: tr.FalconConfig(**_FALCON, parallel_attn=False, new_decoder_architecture=False), "seq"),
    "falcon_new": (lambda: tr.FalconConfig(**_FALCON, num_kv_heads=2, new_decoder_architecture=True), "par"),
    "bloom": (lambda: tr.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=4, **SPECIAL), "seq"),
    "bloom_post_ln_residual": (lambda: tr.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=4,
                                                      apply_residual_connection_post_layernorm=True, **SPECIAL), None),
    "opt": (lambda: tr.OPTConfig(**_OPT), "seq"),
    "opt_post_ln": (lambda: tr.OPTConfig(**_OPT, do_layer_norm_before=False),
                    ("self_attn_layer_norm", "final_layer_norm")),
    "starcoder2": (lambda: tr.Starcoder2Config(**_KV), "seq"),
    "stablelm": (lambda: tr.StableLmConfig(**_KV), "seq"),
    "stablelm_parallel": (lambda: tr.StableLmConfig(**_KV, use_parallel_residual=True), "par"),
    "cohere": (lambda: tr.CohereConfig(**_KV), "par"),
    "smollm3": (lambda: tr.SmolLM3Config(**_KV), "seq"),
    "bert": (lambda: tr.BertConfig(**_C), ("attention.output.LayerNorm", "output.LayerNorm")),
    "roberta": (lambda: tr.RobertaConfig(**{**_C, "pad_token_id": 1}),
                ("attention.output.LayerNorm", "output.LayerNorm")),
}
_ALL = range(3)
REFUSED = {  # family -> {kind: (words the reason must contain, blocks)}; parallel blocks also refuse resid_mid
    "mixtral": {"mlp.hook_post": ("mixture of experts", _ALL)},
    "qwen2_moe": {"mlp.hook_post": ("mixture of experts", _ALL)},
    "qwen3_moe": {"mlp.hook_post": ("mixture of experts", (0, 2))},  # block 1 has a dense MLP
    "bloom_post_ln_residual": {k: ("apply_residual_connection_post_layernorm", _ALL)
                               for k in ("hook_attn_out", "hook_resid_mid", "hook_mlp_out")},
}


def expected_refused(family: str) -> dict[str, str]:
    out = {f"blocks.{i}.{k}": words for k, (words, blocks) in REFUSED.get(family, {}).items() for i in blocks}
    if FAMILIES[family][1] == "par":
        out |= {f"blocks.{i}.hook_resid_mid": "parallel" for i in _ALL}
    return out


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = FAMILIES[family][0]()
    if family in ("bert", "roberta"):
        return tr.AutoModel.from_config(cfg).eval()
    return tr.AutoModelForCausalLM.from_config(cfg).eval()


tiny = functools.lru_cache(maxsize=None)(build)


def rel(got, want, *terms) -> float:
    size = max(float(t.abs().max()) for t in (got, want, *terms))
    return float((got - want).abs().max()) / size


def assert_algebra(model, family, acts, layer, mask=None, after=None):
    """The block's own equations on captured values (real tokens only); `after`: only those whose
    left-hand side the forward pass reaches after that kind."""
    structure = FAMILIES[family][1]
    v = {k: acts[f"blocks.{layer}.{k}"] for k in KINDS if f"blocks.{layer}.{k}" in acts}
    if mask is not None:
        v = {k: t[mask] for k, t in v.items()}
    block = find_blocks(model)[layer]
    if structure == "par":
        eqs = [("hook_resid_post", ("hook_resid_pre", "hook_attn_out", "hook_mlp_out"), lambda a, b, c: a + b + c)]
    else:
        n1, n2 = ((block.get_submodule(p) for p in structure) if isinstance(structure, tuple)
                  else (nn.Identity(), nn.Identity()))
        eqs = [("hook_resid_mid", ("hook_resid_pre", "hook_attn_out"), lambda a, b: n1(a + b)),
               ("hook_resid_post", ("hook_resid_mid", "hook_mlp_out"), lambda a, b: n2(a + b))]
    checked = 0
    for lhs, rhs, fn in eqs:
        if (after is not None and KINDS.index(lhs) <= KINDS.index(after)) or not all(k in v for k in (lhs, *rhs)):
            continue
        with torch.no_grad():
            err = rel(v[lhs], fn(*(v[k] for k in rhs)), *(v[k] for k in rhs))
        assert err <= TOL, (family, layer, lhs, err)
        checked += 1
    return checked


def padded_batch(side: str):
    lengths, seq = [7, 12, 4], 12
    ids = torch.full((3, seq), SPECIAL["pad_token_id"])
    mask = torch.zeros(3, seq, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    for i, n in enumerate(lengths):
        cols = slice(seq - n, seq) if side == "left" else slice(0, n)
        ids[i, cols], mask[i, cols] = torch.randint(3, 250, (n,), generator=g), 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_capture_of_every_listed_site_obeys_the_block_algebra(family, side):
    model = tiny(family)
    batch = padded_batch(side)
    names = site_names(model)
    acts = capture(model, batch, names)  # every listed name is accepted, in one pass
    mask = batch["attention_mask"].bool()
    kw = dict(batch)
    # RoBERTa numbers positions from its ids itself (past its padding token): its own forward is the reference
    if "position_ids" in inspect.signature(model.forward).parameters and family != "roberta":
        kw["position_ids"] = position_ids_for(batch["attention_mask"])
    with torch.no_grad():
        hs = model(**kw, output_hidden_states=True).hidden_states
    n = len(find_blocks(model))
    for layer in range(n):
        assert torch.equal(acts[f"blocks.{layer}.hook_resid_pre"][mask], hs[layer][mask]), (family, layer)
        if layer < n - 1:
            assert torch.equal(acts[f"blocks.{layer}.hook_resid_post"][mask], hs[layer + 1][mask]), (family, layer)
        checked = assert_algebra(model, family, acts, layer, mask)
        assert checked == (0 if FAMILIES[family][1] is None else 1 if FAMILIES[family][1] == "par" else 2)
        assert acts[f"blocks.{layer}.hook_resid_post"].shape == (3, 12, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_accepted_site_is_written_as_steered(family):
    model = tiny(family)
    x = torch.randint(3, 250, (2, 6), generator=torch.Generator().manual_seed(2))
    block1 = [n for n in site_names(model) if n.startswith("blocks.1.")]
    watch = [*block1, "blocks.2.hook_resid_pre"]
    clean = capture(model, x, watch)
    with torch.no_grad():
        logits = model(input_ids=x).last_hidden_state if family in ("bert", "roberta") else model(input_ids=x).logits
    for site in block1:
        kind = site.split(".", 2)[2]
        v = torch.randn(clean[site].shape[-1], generator=torch.Generator().manual_seed(3)) * clean[site].std()
        with intervene(model, {site: Steer(v)}):
            steered = capture(model, x, watch)
        assert rel(steered[site], clean[site] + v, clean[site], v.expand_as(clean[site])) <= TOL, site
        assert_algebra(model, family, steered, 1, after=kind)
        if kind == "hook_resid_post":
            assert torch.equal(steered["blocks.2.hook_resid_pre"], steered[site])
        if kind == "mlp.hook_post":
            assert not torch.allclose(steered["blocks.1.hook_resid_post"], clean["blocks.1.hook_resid_post"])
        with intervene(model, {site: Steer(v, alpha=0.0)}), torch.no_grad():
            out = model(input_ids=x)
        assert torch.equal(out.last_hidden_state if family in ("bert", "roberta") else out.logits, logits), site


@pytest.mark.parametrize("family", FAMILIES)
def test_refused_sites_name_their_reason_and_site_names_lists_the_rest(family):
    model = tiny(family)
    x = torch.randint(3, 250, (1, 5))
    every = [f"blocks.{i}.{k}" for i in range(3) for k in KINDS]
    refused = expected_refused(family)
    assert site_names(model) == [n for n in every if n not in refused]
    for name, words in refused.items():
        with pytest.raises(SiteError, match=words):
            resolve(model, name)
        with pytest.raises(SiteError, match="refused"):
            capture(model, x, name)
        with pytest.raises(SiteError, match="refused"):
            intervene(model, {name: Steer(torch.zeros(32))})


@pytest.mark.parametrize("family", FAMILIES)
def test_the_layout_check_verifies_every_listed_layout_and_nothing_changes_attention(family):
    model = tiny(family)
    impl = model.config._attn_implementation
    check = check_layout(model)
    assert check.accepted == tuple(site_names(model))
    assert max(check.errors.values()) <= TOL
    assert set(check.refused) == set(expected_refused(family))
    x = torch.randint(3, 250, (1, 5))
    with intervene(model, {"blocks.0.hook_resid_post": Steer(torch.ones(32))}):
        capture(model, x, site_names(model))
    assert model.config._attn_implementation == impl
    assert not model.training


@pytest.mark.parametrize(("family", "model_type"), [("olmo2", "olmo2"), ("granite", "granite"), ("bloom", "bloom"),
                                                    ("gemma2", "gemma2")])
def test_a_discovered_layout_gives_only_the_sites_it_verifies(monkeypatch, family, model_type):
    """Unlisted, these families' child names suggest the Llama layout, which is wrong for them: output
    norms (OLMo 2, Gemma 2), a residual multiplier (Granite), a residual added inside the modules (BLOOM)."""
    monkeypatch.delitem(LAYOUTS, model_type)
    model = build(family)
    names = site_names(model)
    assert {n.split(".", 2)[2] for n in names} == {"hook_resid_pre", "mlp.hook_post", "hook_resid_post"}
    x = torch.randint(3, 250, (2, 5))
    for kind in ("hook_attn_out", "hook_resid_mid", "hook_mlp_out"):
        with pytest.raises(SiteError, match="does not match what this block computes"):
            capture(model, x, f"blocks.1.{kind}")
    capture(model, x, names)


def test_a_discovered_layout_that_verifies_is_accepted_whole(monkeypatch):
    monkeypatch.delitem(LAYOUTS, "llama")
    model = build("llama")
    assert site_names(model) == [f"blocks.{i}.{k}" for i in range(3) for k in KINDS]
    acts = capture(model, torch.randint(3, 250, (2, 5)), site_names(model))
    for layer in range(3):
        assert assert_algebra(model, "llama", acts, layer) == 2


class _AddsInPlace(nn.Module):
    """A block that adds its input into its MLP's output in place, after the MLP's hooks have run."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(4, 4)

    def forward(self, h):
        out = self.mlp(h)
        out += h
        return out


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([_AddsInPlace(), _AddsInPlace()])

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h)
        return h


def test_captured_tensors_are_not_changed_by_in_place_adds_later_in_the_forward():
    torch.manual_seed(0)
    model, ids = _Toy().eval(), torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = model.layers[0].mlp(model.embed(ids))
    assert torch.equal(capture(model, ids, "layers.0.mlp")["layers.0.mlp"], expected)
    falcon = tiny("falcon")  # adds attention into the MLP output in place: mlp_output += attention_output
    x = torch.randint(3, 250, (2, 6))
    alone = capture(falcon, x, "blocks.1.hook_mlp_out")["blocks.1.hook_mlp_out"]
    deeper = capture(falcon, x, ["blocks.1.hook_mlp_out", "transformer.h.1.mlp", "blocks.2.hook_resid_post"])
    assert torch.equal(deeper["blocks.1.hook_mlp_out"], alone)
    assert torch.equal(deeper["transformer.h.1.mlp"], alone)


@pytest.mark.parametrize("family", ["falcon", "falcon_new"])
def test_patching_records_the_site_before_in_place_adds(family):
    """The patching sweep recorded the clean MLP output without a copy, so Falcon's in-place add of attention made
    it MLP + attention: patching a prompt into itself moved the metric by up to 0.03."""
    from interp.patching import activation_patching, attribution_patching, logit_diff

    model = tiny(family)
    clean = torch.randint(3, 250, (9,), generator=torch.Generator().manual_seed(3))
    same = activation_patching(model, clean, clean, logit_diff(17, 42), sites=["mlp_out"], progress=False)
    assert same.effect.abs().max() < 1e-6
    corrupted = clean.clone()
    corrupted[2] = 77
    exact = activation_patching(model, clean, corrupted, logit_diff(17, 42), sites=["mlp_out"], progress=False)
    assert exact.effect[:, :2].abs().max() < 1e-6  # before the first differing token nothing moves
    # the recorded clean value is the MLP output capture returns, patched by hand with a plain hook
    site = "blocks.1.hook_mlp_out"
    src = capture(model, clean[None], site)[site]
    mlp = model.transformer.h[1].mlp
    with torch.no_grad():
        base = model(input_ids=corrupted[None]).logits[0, -1]
        handle = mlp.register_forward_hook(lambda m, a, o: torch.cat([o[:, :4], src[:, 4:5], o[:, 5:]], 1))
        try:
            patched = model(input_ids=corrupted[None]).logits[0, -1]
        finally:
            handle.remove()
    hand = float((patched[17] - patched[42]) - (base[17] - base[42]))
    assert exact.effect[1, 4].item() == pytest.approx(hand, abs=1e-5)
    # prompts of different lengths take the no-grad recording path: a clean prompt patched into itself plus a tail
    longer = torch.cat([clean, clean[:3]])
    attr = attribution_patching(model, clean, longer, logit_diff(17, 42), sites=["mlp_out"], positions=list(range(9)),
                                source_positions=list(range(9)))
    assert attr.effect.abs().max() < 1e-6


class _NeedsMore(_Toy):
    def forward(self, input_ids, attention_mask=None, *, scale):
        return super().forward(input_ids) * scale


def test_an_unlisted_model_keeps_its_block_boundaries_and_refuses_what_cannot_be_checked():
    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 3]])
    toy = _Toy().eval()  # no attention module: its MLP output cannot be checked against the block algebra
    assert site_names(toy) == [f"blocks.{i}.hook_resid_{w}" for i in range(2) for w in ("pre", "post")]
    with pytest.raises(SiteError, match="blocks.0.hook_mlp_out' is refused on _AddsInPlace.*'layers.0.mlp'"):
        capture(toy, ids, "blocks.0.hook_mlp_out")
    odd = _NeedsMore().eval()  # no forward pass the check can run without the extra argument
    assert site_names(odd) == site_names(toy)
    with pytest.raises(SiteError, match="could not run a forward pass of _NeedsMore: TypeError"):
        resolve(odd, "blocks.1.hook_mlp_out")


def _bridge_warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen if "TransformerBridge" in str(w.message)]


def test_a_transformer_bridge_is_named_in_a_warning_and_attention_is_left_alone(tmp_path):
    from conftest import byte_tokenizer, tiny_model
    from transformer_lens.model_bridge import TransformerBridge

    tiny_model("llama").save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    model = tr.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    impl = model.config._attn_implementation
    x = torch.randint(3, 250, (1, 5))
    site = "blocks.1.hook_resid_mid"
    assert _bridge_warnings(lambda: capture(model, x, site)) == []
    bridge = TransformerBridge.boot_transformers(str(tmp_path), hf_model=model,
                                                 tokenizer=tr.AutoTokenizer.from_pretrained(tmp_path))
    said = _bridge_warnings(lambda: capture(bridge, x, site))
    assert len(said) == 1 and "eager" in said[0] and repr(impl) in said[0]
    assert _bridge_warnings(lambda: intervene(model, {site: Steer(torch.zeros(32))})) == []  # once per model
    assert model.config._attn_implementation == impl
