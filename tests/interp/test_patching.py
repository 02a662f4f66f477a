"""Patching sweeps against hand-written loops of intervene calls, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from interp import capture, intervene
from interp.edits import Lambda, Patch
from interp.errors import InputError, SiteError
from interp.patching import activation_patching, agreement, attribution_patching, expand_sites, kl, logit_diff, prob
from interp.patching.result import PatchingResult, effect_cells, effect_spearman
from interp.subspace import Subspace

CLEAN, CORRUPT = "on Mon, again on", "on Fri, again on"  # byte tokens: same length, differ at columns 3-5
T, B = 77, 70  # token ids compared by the logit difference


def _ids(text):
    return torch.tensor([byte_tokenizer()(text)["input_ids"]])


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _metric(logits):
    return float((logits[0, -1, T] - logits[0, -1, B]).detach())


def _hand_loop(model, site, cols, edit_of, base=CORRUPT):
    """Metric of the base prompt with ``edit_of(column)`` patched at ``site`` for each column, one intervene each."""
    out = []
    with torch.no_grad():
        for p in cols:
            with intervene(model, {site: edit_of(p)}, positions=[p]):
                out.append(_metric(model(_ids(base)).logits))
    return torch.tensor(out)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2", "gemma2"])
def test_every_cell_equals_a_hand_written_loop_of_intervene_calls(arch):
    model = tiny_model(arch)
    tok = byte_tokenizer()
    seq = _ids(CLEAN).shape[1]
    positions = None if arch == "llama" else [0, 3, 4, 5, 6, -1]  # every column on one model, fewer elsewhere
    res = activation_patching(model, CLEAN, CORRUPT, logit_diff(T, B), sites=["resid_pre", "attn_out", "mlp_out"],
                              positions=positions, tokenizer=tok, batch_size=7)
    cols = list(range(seq)) if positions is None else [0, 3, 4, 5, 6, seq - 1]
    assert res.positions == cols and len(res.rows) == 9 and res.effects.shape == (1, 9, len(cols))
    base = _metric(model(_ids(CORRUPT)).logits)
    for i, site in enumerate(res.sites):
        src = capture(model, _ids(CLEAN), site)[site]
        want = _hand_loop(model, site, cols, lambda p, src=src: Patch(src)) - base
        torch.testing.assert_close(res.effect[i], want, atol=2e-5, rtol=1e-4)
    assert float(res.effect.abs().max()) > 1e-3
    assert res.corrupted_metric == pytest.approx(base, abs=1e-5)
    assert res.clean_metric == pytest.approx(_metric(model(_ids(CLEAN)).logits), abs=1e-5)


def test_cells_continue_the_base_runs_cached_prefix():
    """Patched runs start at their first patched column on the base run's KV cache (a causal model leaves the
    columns before a patch alone), except on models whose cache cannot be cut back (sliding windows)."""
    tok = byte_tokenizer()
    for arch, want in (("llama", [16, 16, 6]), ("gemma2", [16, 16, 16])):
        model = tiny_model(arch)
        seen = []
        h = model.get_decoder().register_forward_pre_hook(
            lambda _m, args, kwargs, seen=seen: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
        try:
            res = activation_patching(model, CLEAN, CORRUPT, logit_diff(T, B), positions=[10, -1], tokenizer=tok)
        finally:
            h.remove()
        # the reference pass (clean and corrupted together), the base run's cache, then one pass of 6 cells
        assert seen == want and res.effects.shape == (1, 3, 2)


def test_subspace_and_neuron_cells_equal_hand_written_loops():
    model, tok = tiny_model("llama"), byte_tokenizer()
    sub = Subspace(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)))
    res = activation_patching(model, CLEAN, CORRUPT, logit_diff(T, B), sites=["blocks.1.hook_resid_post"],
                              subspace=sub, positions=[3, 4, 5, -1], tokenizer=tok)
    site = "blocks.1.hook_resid_post"
    src = capture(model, _ids(CLEAN), site)[site]
    base = _metric(model(_ids(CORRUPT)).logits)
    assert res.rows == [f"{site}[subspace]"] and res.positions == [3, 4, 5, _ids(CLEAN).shape[1] - 1]
    torch.testing.assert_close(res.effect[0], _hand_loop(model, site, res.positions, lambda p: Patch(src, sub)) - base,
                               atol=2e-5, rtol=1e-4)
    neurons = [1, 17, 40]
    res = activation_patching(model, CLEAN, CORRUPT, logit_diff(T, B), sites=["mlp_post"], layers=[0, 2],
                              neurons=neurons, per_neuron=True, positions=[3, 4], tokenizer=tok)
    assert res.rows == [f"blocks.{L}.mlp.hook_post[n{n}]" for L in (0, 2) for n in neurons]
    for i, (site, unit) in enumerate(zip(res.sites, res.units)):
        n = int(unit[1:])
        src = capture(model, _ids(CLEAN), site)[site]

        def copy_neuron(p, n=n, src=src):  # written without Patch: set one coordinate by hand
            def fn(x, ctx):
                y = x.clone()
                y[..., n] = src[ctx.batch_idx, ctx.pos, n]
                return y
            return Lambda(fn)

        torch.testing.assert_close(res.effect[i], _hand_loop(model, site, [3, 4], copy_neuron) - base, atol=2e-5,
                                   rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patching_the_full_residual_at_the_last_layer_restores_the_clean_metric(arch):
    model, tok = tiny_model(arch), byte_tokenizer()
    for metric in (logit_diff(T, B), prob(T), kl()):
        res = activation_patching(model, CLEAN, CORRUPT, metric, sites=["blocks.2.hook_resid_post"],
                                  positions="last", tokenizer=tok)
        assert res.corrupted_metric != pytest.approx(res.clean_metric, abs=1e-6)
        patched = res.corrupted_metric + float(res.effect[0, 0])
        assert patched == pytest.approx(res.clean_metric, abs=1e-6)
        assert float(res.normalized[0, 0]) == pytest.approx(1.0, abs=1e-4)
    assert res.clean_metric == pytest.approx(0.0, abs=1e-6)  # kl: the clean run is its own reference
    noised = activation_patching(model, CLEAN, CORRUPT, logit_diff(T, B), sites=["blocks.2.hook_resid_post"],
                                 positions="last", tokenizer=tok, direction="noise")
    assert noised.clean_metric + float(noised.effect[0, 0]) == pytest.approx(noised.corrupted_metric, abs=1e-6)


def _linear_head_llama():
    """A tiny Llama without the final norm: the logits are linear in the last block's output."""
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.model.norm = nn.Identity()
    with torch.no_grad():
        model.lm_head.weight *= 100.0  # larger logits, so single neurons move the metric well above rounding
    return model.eval()


def test_attribution_equals_exact_patching_where_the_metric_is_linear_in_the_activation():
    model, tok = _linear_head_llama(), byte_tokenizer()
    readout = (model.lm_head.weight[T] - model.lm_head.weight[B]).detach()  # a plane the logit difference reads
    sub = Subspace(torch.stack([readout, torch.randn(32, generator=torch.Generator().manual_seed(1))]))
    cases = [dict(sites=["blocks.2.hook_resid_post", "blocks.2.hook_mlp_out"]),
             dict(sites=["blocks.2.hook_resid_post"], subspace=sub),
             dict(sites=["blocks.2.mlp.hook_post"], neurons="all", per_neuron=True, positions="last"),
             dict(sites=["blocks.2.mlp.hook_post"], neurons=[3, 9, 11])]
    for kw in cases:
        exact = activation_patching(model, CLEAN, CORRUPT, logit_diff(T, B), tokenizer=tok, **kw)
        est = attribution_patching(model, CLEAN, CORRUPT, logit_diff(T, B), tokenizer=tok, **kw)
        assert est.method == "attribution" and est.rows == exact.rows and est.positions == exact.positions
        scale = float(exact.effect.abs().max())
        assert scale > 1e-3, kw  # the cells move the metric well above float rounding
        torch.testing.assert_close(est.effect, exact.effect, atol=1e-5, rtol=1e-4)  # float rounding of the logits
    # earlier layers are not linear in the patched activation: the estimate is only an estimate there
    exact = activation_patching(model, CLEAN, CORRUPT, logit_diff(T, B), sites=["blocks.0.hook_resid_post"],
                                tokenizer=tok)
    est = attribution_patching(model, CLEAN, CORRUPT, logit_diff(T, B), sites=["blocks.0.hook_resid_post"],
                               tokenizer=tok)
    assert float((est.effect - exact.effect).abs().max()) > 1e-4


def test_attribution_is_one_forward_and_one_backward_and_leaves_the_model_alone():
    model, tok = tiny_model("llama"), byte_tokenizer()
    calls = []
    h = model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        res = attribution_patching(model, CLEAN, CORRUPT, logit_diff(T, B), sites=["resid_post", "mlp_out"],
                                   tokenizer=tok)
    finally:
        h.remove()
    assert len(calls) == 1  # clean and corrupted batched in one forward pass
    assert all(p.grad is None for p in model.parameters())
    assert res.effects.shape == (1, 6, _ids(CLEAN).shape[1])


def test_hooks_are_gone_after_an_exception_mid_sweep():
    model, tok = tiny_model("llama"), byte_tokenizer()
    before = _hooks(model)

    def failing_at(n):
        calls = []

        def metric(logits):
            calls.append(1)
            if len(calls) == n:
                raise RuntimeError("metric failed")
            return logits[:, T] - logits[:, B]
        return metric, calls

    # calls 1-2: the reference runs' metrics; 3: the first batch of cells; 4: the second batch fails
    metric, calls = failing_at(4)
    with pytest.raises(RuntimeError, match="metric failed"):
        activation_patching(model, CLEAN, CORRUPT, metric, sites=["resid_post", "attn_out"], batch_size=4,
                            tokenizer=tok, progress=False)
    assert len(calls) == 4 and _hooks(model) == before
    metric, calls = failing_at(1)  # the base metric of the gradient pass, inside the recording hooks' pass
    with pytest.raises(RuntimeError, match="metric failed"):
        attribution_patching(model, CLEAN, CORRUPT, metric, tokenizer=tok)
    assert _hooks(model) == before
    res = activation_patching(model, CLEAN, CORRUPT, logit_diff(T, B), positions="last", tokenizer=tok)
    assert res.effects.shape == (1, 3, 1) and _hooks(model) == before


def test_prompts_of_different_lengths_are_refused_unless_aligned():
    model, tok = tiny_model("llama"), byte_tokenizer()
    clean, corrupt = "on Monday, again on", "on Fri, again on"
    with pytest.raises(InputError, match=r"19 tokens and the corrupted one 16.*source_positions") as e:
        activation_patching(model, clean, corrupt, logit_diff(T, B), tokenizer=tok)
    assert "\n" not in str(e.value)
    # align the day's last letter and the last token: base (corrupted) columns 5 and -1, source columns 8 and -1
    res = activation_patching(model, clean, corrupt, logit_diff(T, B), sites=["blocks.1.hook_resid_post"],
                              positions=[5, -1], source_positions=[8, -1], tokenizer=tok)
    assert res.positions == [5, 15] and res.source_positions == [8, 18]
    assert res.tokens == ["i", "n"] and res.source_tokens == ["y", "n"]
    site = "blocks.1.hook_resid_post"
    src = capture(model, _ids(clean), site)[site]
    base = _metric(model(_ids(corrupt)).logits)
    want = _hand_loop(model, site, [5, 15], lambda p: Patch(src[:, {5: 8, 15: 18}[p]]), base=corrupt) - base
    torch.testing.assert_close(res.effect[0], want, atol=2e-5, rtol=1e-4)
    with pytest.raises(InputError, match="picks 2 columns .* but source_positions picks 1"):
        activation_patching(model, clean, corrupt, logit_diff(T, B), positions=[5, -1], source_positions=[8],
                            tokenizer=tok)


def test_positions_grammar_and_several_pairs():
    model, tok = tiny_model("llama"), byte_tokenizer()
    res = activation_patching(model, CLEAN, CORRUPT, logit_diff(T, B), sites=["blocks.0.hook_resid_post"],
                              positions={"token": ","}, tokenizer=tok)
    assert res.positions == [6] and res.tokens == [","]
    res = activation_patching(model, CLEAN, CORRUPT, logit_diff(T, B), sites=["blocks.0.hook_resid_post"],
                              positions={"slice": [3, 6]}, tokenizer=tok)
    assert res.positions == [3, 4, 5] and res.labels()[0] == "3:'M'/'F'"
    pairs = (["on Mon, again on", "on Tue, again on"], ["on Fri, again on", "on Sat, again on"])
    both = activation_patching(model, *pairs, logit_diff(T, B), sites=["resid_post"], positions=[3, 4, 5, -1],
                               tokenizer=tok)
    one = [activation_patching(model, c, b, logit_diff(T, B), sites=["resid_post"], positions=[3, 4, 5, -1],
                               tokenizer=tok) for c, b in zip(*pairs)]
    assert both.effects.shape == (2, 3, 4)
    torch.testing.assert_close(both.effect, (one[0].effect + one[1].effect) / 2)
    # per-pair metric targets and per-pair positions: pair 1 reads B - T at column 4
    per = activation_patching(model, *pairs, logit_diff([T, B], [B, T]), sites=["resid_post"],
                              positions=[[3], [4]], tokenizer=tok)
    torch.testing.assert_close(per.effects[0, :, 0], one[0].effects[0, :, 0])
    torch.testing.assert_close(per.effects[1, :, 0], -one[1].effects[0, :, 1])
    with pytest.raises(InputError, match="2 values given for 3 prompt pairs"):
        activation_patching(model, [CLEAN] * 3, [CORRUPT] * 3, logit_diff([T, B], B), tokenizer=tok)


def test_result_table_files_and_plot(tmp_path):
    model, tok = tiny_model("gpt2"), byte_tokenizer()
    res = activation_patching(model, CLEAN, CORRUPT, logit_diff(T, B), sites=["resid_post", "mlp_out"],
                              positions=[3, 4, -1], tokenizer=tok)
    rows = res.table()
    assert len(rows) == 6 * 3 and set(rows[0]) == {"row", "site", "unit", "position", "source_position", "token",
                                                   "source_token", "effect", "normalized"}
    assert rows[0]["token"] == "F" and rows[0]["source_token"] == "M"
    res.save(tmp_path)
    lines = (tmp_path / "patching.csv").read_text().splitlines()
    assert len(lines) == 19 and lines[0].startswith("row,site,unit,position")
    d = json.loads((tmp_path / "patching.json").read_text())
    assert d["method"] == "exact" and d["direction"] == "denoise" and d["n_pairs"] == 1
    assert d["prompts"] == {"clean": [CLEAN], "corrupted": [CORRUPT]} and len(d["effects"][0]) == 6
    back = PatchingResult.from_dict(d)
    torch.testing.assert_close(back.effect, res.effect)
    assert (tmp_path / "patching.png").read_bytes()[:4] == b"\x89PNG"
    fig = res.plot()
    assert [ax.get_title() for ax in fig.axes[:2]] == ["resid_post", "mlp_out"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == res.labels()
    assert agreement(res, back)["spearman"] == pytest.approx(1.0)
    worse = PatchingResult.from_dict({**d, "effects": (-torch.tensor(d["effects"])).tolist()})
    agree = agreement(res, worse)
    assert agree["spearman"] == pytest.approx(-1.0) and agree["sign_agreement"] == 0.0


def test_user_errors_are_one_line():
    model, tok = tiny_model("llama"), byte_tokenizer()
    cases = [
        (dict(sites="resid_postt"), SiteError, "kind expanded over layers"),
        (dict(layers=[5]), InputError, r"layers \[5\] do not exist; this model has 3 blocks"),
        (dict(direction="sideways"), InputError, "direction must be"),
        (dict(positions=[40]), InputError, "out of range"),
        (dict(subspace=torch.randn(2, 32), neurons=[1]), InputError, "not both"),
        (dict(metric=logit_diff(" Mon", B)), InputError, "is 4 tokens"),
        (dict(metric=lambda logits: logits.sum()), InputError, "one value per run"),
        (dict(corrupted=[CORRUPT, CORRUPT]), InputError, "1 clean prompts but 2 corrupted"),
        (dict(metric=logit_diff(-1, B)), InputError, r"token id -1 is outside the vocabulary \(0\.\.299\)"),
        (dict(metric=prob(5000)), InputError, "token id 5000 is outside the vocabulary"),
    ]
    for kw, err, msg in cases:
        args = dict(clean=CLEAN, corrupted=CORRUPT, metric=logit_diff(T, B), tokenizer=tok) | kw
        with pytest.raises(err, match=msg) as e:
            activation_patching(model, **args)
        assert "\n" not in str(e.value)
    model.train()
    try:
        with pytest.raises(InputError, match="training mode"):
            attribution_patching(model, CLEAN, CORRUPT, logit_diff(T, B), tokenizer=tok)
    finally:
        model.eval()
    assert expand_sites(model, ["resid_pre", "blocks.1.hook_mlp_out"], layers=[0, 2]) == [
        "blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre", "blocks.1.hook_mlp_out"]


def test_agreement_reads_the_cells_with_an_effect_apart_from_float_noise():
    # 30 rows x 64 positions: 300 cells carry effects that attribution ranks nearly right; the rest are exact 0
    # for attribution and float noise (1e-6) for exact patching, as where the two prompts still agree
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(30, 64, generator=g) * 1e-6
    mask = torch.zeros(30, 64, dtype=torch.bool)
    mask.view(-1)[torch.randperm(30 * 64, generator=g)[:300]] = True
    true = torch.randn(300, generator=g)
    exact[mask] = true
    est = torch.zeros(30, 64)
    est[mask] = true + 0.01 * torch.randn(300, generator=g)
    assert torch.equal(effect_cells(exact), mask)
    rho, n = effect_spearman(exact, est)
    assert n == 300 and rho > 0.99
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(InputError, match="floor must be a fraction"):
            effect_cells(exact, bad)
    rows, positions = [f"blocks.{i}.hook_resid_post" for i in range(30)], list(range(64))

    def result(effect):
        return PatchingResult(method="exact", direction="denoise", metric={}, rows=rows, sites=rows, units=[""] * 30,
                              positions=positions, source_positions=positions, tokens=["t"] * 64,
                              source_tokens=["t"] * 64, effects=effect[None], base_metric=torch.zeros(1),
                              source_metric=torch.full((1,), 3.0))

    a = agreement(result(exact), result(est))
    assert a["n_effect_cells"] == 300 and a["effect_floor"] == 1e-4 and a["n_cells"] == 30 * 64
    assert a["spearman_effect_cells"] > 0.99 and a["pearson_effect_cells"] > 0.99
    assert a["spearman"] < 0.8  # every cell: the 1,620 noise cells' ranks against attribution's ties at 0
    none = agreement(result(torch.zeros(30, 64)), result(est))
    assert none["n_effect_cells"] == 0 and none["spearman_effect_cells"] != none["spearman_effect_cells"]  # nan
