"""intervene(): exactness, positions under generate, hook hygiene and gradients on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from interp import capture
from interp.edits import Patch, ProjectOut, Replace, Rotate, Steer
from interp.errors import InputError, SiteError
from interp.intervene import intervene
from interp.subspace import Subspace

V, D = 61, 32


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=D, n_layer=3, n_head=4, n_positions=64))


def _neox():
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, max_position_embeddings=64))


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _gemma():
    return GemmaForCausalLM(GemmaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64))


def _gemma2():
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          query_pre_attn_scalar=8, sliding_window=16, max_position_embeddings=64))


def _phi3():
    return Phi3ForCausalLM(Phi3Config(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0))


BUILDERS = {"llama": _llama, "gpt2": _gpt2, "neox": _neox, "qwen2": _qwen2, "gemma": _gemma, "gemma2": _gemma2,
            "phi3": _phi3}
SITES = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"]


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request):
    torch.manual_seed(0)
    m = BUILDERS[request.param]().eval()
    m.generation_config.eos_token_id = None  # random weights: never stop early, so lengths are known
    return m


@pytest.fixture
def ids():
    return torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(1))


def _gen(model, ids, mask=None, n=4):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)


def _hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _rand_sub(rank=2, seed=0):
    return Subspace(torch.randn(rank, D, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("site", SITES + ["blocks.1.hook_resid_mid"])
def test_noop_edit_is_bitwise_identical(model, ids, site):
    if site.endswith("resid_mid") and "neox" in type(model).__name__.lower():
        with pytest.raises(SiteError, match="parallel"):  # no residual stream between attn and MLP
            intervene(model, {site: Steer(torch.randn(D), alpha=0.0)}).attach()
        return
    base = model(ids).logits
    with intervene(model, {site: Steer(torch.randn(D), alpha=0.0)}):
        same = model(ids).logits
    with intervene(model, {site: Steer(torch.randn(D), alpha=3.0)}):
        changed = model(ids).logits
    assert torch.equal(base, same)
    assert not torch.allclose(base, changed)


def test_patch_with_source_equal_base_is_identity(model, ids):
    site = "blocks.1.hook_resid_post"
    src = capture(model, ids, site)[site]
    base = model(ids).logits
    with intervene(model, {site: Patch(src, _rand_sub(3))}):
        assert torch.equal(model(ids).logits, base)
    with intervene(model, {site: Patch(src)}, positions=[2, 5]):
        assert torch.equal(model(ids).logits, base)


def test_patch_moves_the_source_component(model, ids):
    site, sub = "blocks.1.hook_resid_post", _rand_sub(2)
    src_ids = torch.randint(0, V, ids.shape, generator=torch.Generator().manual_seed(5))
    src = capture(model, src_ids, site)[site]
    with intervene(model, {site: Patch(src, sub)}, positions="last"):
        got = capture(model, ids, site)[site]
    torch.testing.assert_close(sub.project(got[:, -1]), sub.project(src[:, -1]), atol=1e-5, rtol=1e-5)
    base = capture(model, ids, site)[site]
    torch.testing.assert_close(got[:, :-1], base[:, :-1])


def test_patch_aligns_different_lengths_by_explicit_positions(model):
    site = "blocks.1.hook_resid_post"
    base_ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(2))
    src_ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    src = capture(model, src_ids, site)[site]
    with intervene(model, {site: Patch(src, source_positions=[[8, 4], [1, 2]])}, positions=[[5, 3], [0, 1]]):
        got = capture(model, base_ids, site)[site]
    torch.testing.assert_close(got[0, 5], src[0, 8])
    torch.testing.assert_close(got[0, 3], src[0, 4])
    torch.testing.assert_close(got[1, 0], src[1, 1])
    torch.testing.assert_close(got[1, 1], src[1, 2])


def test_generate_edits_exactly_the_requested_absolute_positions(model, ids):
    site = "blocks.1.hook_resid_post"
    seen: list[tuple[int, int]] = []

    def record(x, ctx):
        seen.extend(zip(ctx.batch_idx.tolist(), ctx.pos.tolist()))
        return x + 1.0

    with intervene(model, {site: record}, positions=[2, 8, 9]):
        edited = _gen(model, ids, n=4)
    assert sorted(seen) == sorted((b, p) for b in range(3) for p in (2, 8, 9))
    # equals a plain forward over the full generated text edited at the same columns
    with intervene(model, {site: Steer(torch.ones(D), 1.0)}, positions=[2, 8, 9]):
        full = model(edited[:, :-1]).logits
    assert torch.equal(full[:, 6:].argmax(-1), edited[:, 7:])


def test_generate_last_and_slice_positions(model, ids):
    site = "blocks.0.hook_resid_post"
    seen: list[list[int]] = []

    def record(x, ctx):
        seen.append(sorted(set(ctx.pos.reshape(-1).tolist())))
        return x

    with intervene(model, {site: record}, positions="last"):
        _gen(model, ids, n=3)
    assert seen == [[6], [7], [8]]
    seen.clear()
    with intervene(model, {site: record}, positions=slice(5, None)):
        _gen(model, ids, n=3)
    assert seen == [[5, 6], [7], [8]]


def test_padding_is_left_untouched(model):
    site = "blocks.1.hook_resid_post"
    ids = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask}
    base = capture(model, batch, site)[site]
    with intervene(model, {site: Steer(torch.ones(D), 2.0)}):
        got = capture(model, batch, site)[site]
    assert torch.equal(got[0, :2], base[0, :2])
    torch.testing.assert_close(got[1], base[1] + 2.0)
    with intervene(model, {site: Steer(torch.ones(D), 2.0)}, positions=[0, 3]):
        got = capture(model, batch, site)[site]
    assert torch.equal(got[0, 0], base[0, 0])
    torch.testing.assert_close(got[0, 3], base[0, 3] + 2.0)
    torch.testing.assert_close(got[1, 0], base[1, 0] + 2.0)


def test_hooks_are_removed_after_an_exception(model, ids):
    before = _hook_counts(model)

    def boom(x, ctx):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with intervene(model, {"blocks.1.hook_resid_post": boom}):
            model(ids)
    assert _hook_counts(model) == before
    with pytest.raises(ValueError, match="outside"):
        with intervene(model, {"blocks.1.hook_resid_post": Steer(torch.ones(D), 1.0)}):
            raise ValueError("outside")
    assert _hook_counts(model) == before


def test_nested_contexts_compose_and_unwind(model, ids):
    site = "blocks.1.hook_resid_post"
    base = capture(model, ids, site)[site]
    before = _hook_counts(model)
    with intervene(model, {site: Steer(torch.ones(D), 1.0)}):
        with intervene(model, {site: lambda x, ctx: x * 2.0}):
            inner = capture(model, ids, site)[site]
        outer = capture(model, ids, site)[site]
    torch.testing.assert_close(inner, (base + 1.0) * 2.0)  # outer edit first, then inner
    torch.testing.assert_close(outer, base + 1.0)
    assert _hook_counts(model) == before
    assert torch.equal(capture(model, ids, site)[site], base)


def test_only_our_hooks_are_touched(model, ids):
    site = "blocks.1.hook_resid_post"
    calls = []
    block = dict(model.named_modules())
    target = next(m for n, m in block.items() if n.endswith(".1") and "layers" in n or n.endswith("h.1"))
    foreign = target.register_forward_hook(lambda *a: calls.append(1))
    try:
        with intervene(model, {site: Steer(torch.ones(D), 1.0)}):
            model(ids)
        model(ids)
        assert len(calls) == 2
        hs = model(ids, output_hidden_states=True).hidden_states
        assert hs is not None and len(hs) == model.config.num_hidden_layers + 1
    finally:
        foreign.remove()


def test_handle_for_long_lived_use(model, ids):
    site = "blocks.1.hook_resid_post"
    base = model(ids).logits
    h = intervene(model, {site: ProjectOut(_rand_sub(2))}).attach()
    assert h.attached and h.attach() is h  # idempotent
    edited = model(ids).logits
    assert not torch.allclose(edited, base)
    assert h.stats[site] == ids.numel()
    h.remove()
    h.remove()
    assert torch.equal(model(ids).logits, base)


def test_handle_reattaches_after_another_library_clears_hooks(model, ids):
    site = "blocks.1.hook_resid_post"
    base = model(ids).logits
    h = intervene(model, {site: ProjectOut(_rand_sub(2))}).attach()
    edited = model(ids).logits
    for m in model.modules():  # what a careless library does on cleanup
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    assert not h.attached
    assert torch.equal(model(ids).logits, base)
    with pytest.warns(RuntimeWarning, match="removed by something else"):
        h.attach()
    assert h.attached and torch.equal(model(ids).logits, edited)
    h.remove()
    assert _hook_counts(model) == 0 and torch.equal(model(ids).logits, base)


def test_blocks_lookup_is_remembered_and_follows_a_replaced_list(model):
    from interp.sites import find_blocks

    blocks = find_blocks(model)
    assert find_blocks(model) is blocks
    parent_path, _, attr = next(n for n, m in model.named_modules() if m is blocks).rpartition(".")
    parent = model.get_submodule(parent_path)
    fresh = torch.nn.ModuleList(list(blocks))
    setattr(parent, attr, fresh)
    try:
        assert find_blocks(model) is fresh
    finally:
        setattr(parent, attr, blocks)
    assert find_blocks(model) is blocks


def test_gradients_flow_through_an_edited_forward(model, ids):
    site = "blocks.1.hook_resid_post"
    alpha = torch.zeros(ids.shape[0], requires_grad=True)
    model.zero_grad()
    with intervene(model, {site: [Steer(torch.randn(D), alpha), Rotate(_rand_sub(2), angle=0.3)]}, positions="last"):
        loss = model(ids).logits[:, -1].logsumexp(-1).sum()
    loss.backward()
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0
    emb = model.get_input_embeddings().weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    model.zero_grad()


def test_replace_under_generate_changes_output(model, ids):
    site = "blocks.2.hook_resid_post"
    base = _gen(model, ids)
    with intervene(model, {site: Replace(torch.randn(D) * 50)}, positions=slice(0, None)):
        edited = _gen(model, ids)
    assert torch.equal(base[:, :7], edited[:, :7]) and not torch.equal(base, edited)
    assert torch.equal(_gen(model, ids), base)


def test_positions_per_site_and_errors(model, ids):
    seen = {}

    def rec(name):
        def f(x, ctx):
            seen[name] = sorted(set(ctx.pos.reshape(-1).tolist()))
            return x
        return f

    sites = {"blocks.0.hook_resid_post": rec("a"), "blocks.2.hook_resid_post": rec("b")}
    with intervene(model, sites, positions={"blocks.0.hook_resid_post": [1], "blocks.2.hook_resid_post": -1}):
        model(ids)
    assert seen == {"a": [1], "b": [6]}
    with pytest.raises(SiteError, match="blocks.1.hook_resid_post"):
        intervene(model, {"blocks.1.hook_resid_posst": rec("x")})
    with pytest.raises(InputError, match="non-empty dict"):
        intervene(model, {})
    with pytest.raises(InputError, match="positions"):
        intervene(model, {"blocks.0.hook_resid_post": rec("x")}, positions="first")
    with pytest.raises(InputError, match="no edit"):
        intervene(model, {"blocks.0.hook_resid_post": rec("x")}, positions={"blocks.1.hook_resid_post": 1})


def test_dict_forms_are_positions_and_per_site_dicts_hold_them(model, ids):
    seen = {}

    def rec(name):
        def f(x, ctx):
            seen[name] = sorted(set(ctx.pos.reshape(-1).tolist()))
            return x
        return f

    a, b = "blocks.0.hook_resid_post", "blocks.2.hook_resid_post"
    with intervene(model, {a: rec("a"), b: rec("b")}, positions={"slice": [2, 5]}):
        model(ids)
    assert seen == {"a": [2, 3, 4], "b": [2, 3, 4]}
    with intervene(model, {a: rec("a"), b: rec("b")}, positions={a: {"slice": [1, None, 2]}, b: "last"}):
        model(ids)
    assert seen == {"a": [1, 3, 5], "b": [6]}
    with pytest.raises(InputError, match="tokenizer"):
        intervene(model, {a: rec("a")}, positions={a: {"token": " Monday"}})


def _gen_logits(model, ids, use_cache, n=4):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         use_cache=use_cache, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("positions", ["last", [-1], {"slice": [-2, None]}, [2, 8]])
def test_generate_without_a_cache_edits_the_columns_it_edits_with_one(model, ids, positions):
    """Without a KV cache every step runs over all columns again (offset 0): "last" and negative columns must still
    count from the prompt's end, and earlier columns stay edited, or the text generated differs from the cached
    run's (it did: logits up to 10 apart for [-1])."""
    site = "blocks.1.hook_resid_post"
    v = torch.randn(D, generator=torch.Generator().manual_seed(3)) * 5
    with intervene(model, {site: Steer(v)}, positions=positions):
        seq_c, log_c = _gen_logits(model, ids, True)
        seq_n, log_n = _gen_logits(model, ids, False)
    assert torch.equal(seq_c, seq_n)
    torch.testing.assert_close(log_n, log_c, atol=1e-4, rtol=1e-4)
    plain = _gen_logits(model, ids, True)[1]
    assert not torch.allclose(plain, log_c, atol=1e-3)  # the edit does change the generation


def test_a_pass_that_does_not_extend_the_prompt_is_a_new_prompt(model, ids):
    site, seen = "blocks.0.hook_resid_post", []

    def record(x, ctx):
        seen.append(sorted(set(ctx.pos.reshape(-1).tolist())))
        return x

    other = (ids + 1) % V
    with intervene(model, {site: record}, positions="last"):
        model(ids, use_cache=False)
        model(torch.cat([other, other[:, :2]], 1), use_cache=False)  # longer, but not ids' continuation
    assert seen == [[6], [8]]


def test_capture_in_chunks_pairs_per_row_values_with_their_prompts(model, ids):
    """capture(batch_size=) runs an edit's per-row values chunk by chunk; each chunk's rows count from 0, so row 2
    took row 0's value before the rows were numbered over the whole batch."""
    site = "blocks.1.hook_resid_post"
    v = torch.randn(D, generator=torch.Generator().manual_seed(4))
    ids4 = torch.cat([ids, ids[:1]])
    src = capture(model, torch.randint(0, V, ids4.shape, generator=torch.Generator().manual_seed(6)), site)[site]
    for edit, positions in ((Steer(v, alpha=torch.tensor([0.0, 1.0, 5.0, 9.0])), None),
                            (Patch(src, _rand_sub(2)), [[1], [2], [3], [4]])):
        with intervene(model, {site: edit}, positions=positions):
            whole = capture(model, ids4, site)[site]
            chunked = capture(model, ids4, site, batch_size=2)[site]
            odd = capture(model, ids4, site, batch_size=3)[site]
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(odd, whole, atol=1e-5, rtol=1e-5)


def test_per_row_values_with_another_row_count_are_refused(model, ids):
    site, sub = "blocks.1.hook_resid_post", _rand_sub(2)
    for edit, what in ((Steer(torch.ones(D), alpha=torch.tensor([1.0, 2.0])), "Steer: alpha has 2 rows"),
                       (Rotate(sub, angle=torch.tensor([0.1, 0.2, 0.3, 0.4])), "Rotate: angle has 4 rows"),
                       (Patch(torch.randn(2, D)), "Patch: the source has 2 rows, but the batch has 3 prompts")):
        with intervene(model, {site: edit}, positions="last"), pytest.raises(InputError, match=what):
            model(ids)
    # one value for every row is still one value
    with intervene(model, {site: Steer(torch.ones(D), alpha=torch.tensor([2.0]))}, positions="last"):
        one = model(ids).logits
    with intervene(model, {site: Steer(torch.ones(D), alpha=2.0)}, positions="last"):
        torch.testing.assert_close(one, model(ids).logits)


def test_an_edit_of_the_wrong_shape_is_refused_on_every_path(model, ids):
    site = "blocks.1.hook_resid_post"
    for positions in (None, "last"):
        with intervene(model, {site: lambda x, ctx: x[:1]}, positions=positions), \
                pytest.raises(InputError, match="must return a tensor of the shape"):
            model(ids)


def test_columns_on_padding_warn_once_per_site(model):
    from interp import PaddingWarning

    site = "blocks.1.hook_resid_post"
    ids = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, 2:] = 0  # right padding: column -1 is padding in row 1
    with intervene(model, {site: Steer(torch.ones(D), 3.0)}, positions=[-1]) as iv:
        with pytest.warns(PaddingWarning, match=r"rows \[1\]"):
            model(ids, attention_mask=mask)
        import warnings as _w
        with _w.catch_warnings():
            _w.simplefilter("error")
            model(ids, attention_mask=mask)  # once per site
    assert iv.stats[site] == 2


def test_entering_the_same_intervention_twice_keeps_it_until_the_outer_block_ends(model, ids):
    site = "blocks.1.hook_resid_post"
    base = model(ids).logits
    iv = intervene(model, {site: Steer(torch.ones(D), 3.0)})
    with iv:
        edited = model(ids).logits
        with iv:
            pass
        torch.testing.assert_close(model(ids).logits, edited)  # the inner exit did not remove the hooks
    assert torch.equal(model(ids).logits, base)
