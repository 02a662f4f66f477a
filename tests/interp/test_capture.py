"""Differential tests of capture against transformers' own outputs, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, DECODERS, VOCAB, tiny_model

from interp import InputError, SiteError, capture, site_names
from interp.sites import find_blocks, resolve

FINAL_NORM = {"llama": "model.norm", "mistral": "model.norm", "qwen2": "model.norm", "gemma2": "model.norm",
              "phi3": "model.norm", "gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm",
              "gpt_neox_seq": "gpt_neox.final_layer_norm", "bert": None}


def ids(batch=2, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq), generator=g)


def our_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_equals_hidden_states(arch):
    model = tiny_model(arch)
    x = ids()
    n = len(find_blocks(model))
    names = [f"blocks.{i}.hook_resid_{w}" for i in range(n) for w in ("pre", "post")]
    acts = capture(model, x, names)
    with torch.no_grad():
        hs = model(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True).hidden_states
    assert len(hs) == n + 1
    for i in range(n):
        assert torch.equal(acts[f"blocks.{i}.hook_resid_pre"], hs[i]), i
        if i < n - 1:
            assert torch.equal(acts[f"blocks.{i}.hook_resid_post"], hs[i + 1]), i
    last = acts[f"blocks.{n - 1}.hook_resid_post"]
    norm = FINAL_NORM[arch]
    with torch.no_grad():
        expected_last = model.get_submodule(norm)(last) if norm else last
    assert torch.equal(expected_last, hs[n])


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("gpt_neox", "bert")])
def test_resid_mid_independent(arch):
    model = tiny_model(arch)
    x = ids()
    sites = [f"blocks.1.{k}" for k in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
                                       "hook_resid_post")]
    a = capture(model, x, sites)
    mid = a["blocks.1.hook_resid_mid"]
    torch.testing.assert_close(mid, a["blocks.1.hook_resid_pre"] + a["blocks.1.hook_attn_out"], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["blocks.1.hook_resid_post"], mid + a["blocks.1.hook_mlp_out"], rtol=0, atol=1e-6)


def test_resid_mid_bert_post_ln():
    model = tiny_model("bert")
    x = ids()
    a = capture(model, x, ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_resid_mid"])
    ln = model.encoder.layer[1].attention.output.LayerNorm
    with torch.no_grad():
        expected = ln(a["blocks.1.hook_resid_pre"] + a["blocks.1.hook_attn_out"])
    torch.testing.assert_close(a["blocks.1.hook_resid_mid"], expected, rtol=0, atol=1e-6)


def test_parallel_block_refuses_resid_mid():
    model = tiny_model("gpt_neox")
    with pytest.raises(SiteError, match="parallel"):
        capture(model, ids(), ["blocks.0.hook_resid_mid"])
    assert "blocks.0.hook_resid_mid" not in site_names(model)
    a = capture(model, ids(), ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out",
                               "blocks.0.hook_resid_post"])
    torch.testing.assert_close(a["blocks.0.hook_resid_post"], a["blocks.0.hook_resid_pre"]
                               + a["blocks.0.hook_attn_out"] + a["blocks.0.hook_mlp_out"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_neurons_are_input_of_output_projection(arch):
    model = tiny_model(arch)
    a = capture(model, ids(), ["blocks.2.mlp.hook_post", "blocks.2.hook_mlp_out"])
    assert a["blocks.2.mlp.hook_post"].shape[-1] == 64  # intermediate_size, not d_model
    site = resolve(model, "blocks.2.mlp.hook_post")
    with torch.no_grad():
        out = site.module(a["blocks.2.mlp.hook_post"])
    if arch not in ("gemma2", "bert"):  # gemma2 norms the MLP output; bert adds dropout+LN after
        torch.testing.assert_close(out, a["blocks.2.hook_mlp_out"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_early_stop_equals_full_run_and_skips_later_blocks(arch):
    model = tiny_model(arch)
    x = ids()
    calls = []
    h = find_blocks(model)[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        early = capture(model, x, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
        assert calls == []
        full = capture(model, x, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"], stop_early=False)
        assert calls == [1]
    finally:
        h.remove()
    for k in early:
        assert torch.equal(early[k], full[k])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_unpadded(arch, side):
    model = tiny_model(arch)
    lengths = [7, 12, 4]
    seqs = [ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    seq = max(lengths)
    batch = torch.full((3, seq), 258)
    mask = torch.zeros(3, seq, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(seq - len(s), seq) if side == "left" else slice(0, len(s))
        batch[i, sl], mask[i, sl] = s, 1
    site = "blocks.2.hook_resid_post"
    padded = capture(model, {"input_ids": batch, "attention_mask": mask}, site)[site]
    for i, s in enumerate(seqs):
        single = capture(model, s[None], site)[site][0]
        torch.testing.assert_close(padded[i][mask[i].bool()], single, rtol=1e-4, atol=1e-4)
    last = capture(model, {"input_ids": batch, "attention_mask": mask}, site, positions="last")[site]
    for i, s in enumerate(seqs):
        torch.testing.assert_close(last[i], capture(model, s[None], site)[site][0, -1], rtol=1e-4, atol=1e-4)


def test_positions_forms():
    model = tiny_model("llama")
    x = ids(2, 9)
    full = capture(model, x, "blocks.1.hook_resid_post")["blocks.1.hook_resid_post"]
    pos = capture(model, x, "blocks.1.hook_resid_post", positions=[0, -1])["blocks.1.hook_resid_post"]
    assert torch.equal(pos, full[:, [0, 8]])
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 3] = mask[1, 5] = True
    sel = capture(model, x, "blocks.1.hook_resid_post", positions=mask)["blocks.1.hook_resid_post"]
    assert torch.equal(sel, torch.stack([full[0, 3], full[1, 5]]))
    with pytest.raises(InputError, match="out of range"):
        capture(model, x, "blocks.1.hook_resid_post", positions=[9])


def test_positions_slices_ragged_lists_and_per_row_forms_in_chunks():
    model, site = tiny_model("llama"), "blocks.1.hook_resid_post"
    x = ids(5, 9)
    full = capture(model, x, site)[site]
    assert torch.equal(capture(model, x, site, positions=slice(2, 6))[site], full[:, 2:6])
    assert torch.equal(capture(model, x, site, positions={"slice": [-3, None]})[site], full[:, 6:])
    full = capture(model, x, site, batch_size=2)[site]  # chunks round differently from one pass
    ragged = [[0, 4], [8], [1, 2, 3], [5], [-1]]
    got = capture(model, x, site, positions=ragged, batch_size=2)[site]
    assert torch.equal(got, torch.cat([full[i, [c % 9 for c in r]] for i, r in enumerate(ragged)]))
    per_row = torch.arange(5)[:, None] + torch.tensor([0, 2])
    got = capture(model, x, site, positions=per_row, batch_size=2)[site]
    assert torch.equal(got, torch.stack([full[i, r] for i, r in enumerate(per_row)]))
    mask = torch.rand(5, 9, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(capture(model, x, site, positions=mask, batch_size=2)[site], full[mask])
    with pytest.raises(InputError, match="3 rows for 5 inputs"):
        capture(model, x, site, positions=[[1], [2], [3]])
    with pytest.raises(InputError, match=r"must have shape \[batch, seq\] = \(5, 9\)"):
        capture(model, x, site, positions=mask[:, :8])


def test_batch_size_chunks_equal_one_pass():
    model = tiny_model("gpt2")
    x = ids(5, 8)
    one = capture(model, x, "blocks.1.hook_resid_post")["blocks.1.hook_resid_post"]
    chunked = capture(model, x, "blocks.1.hook_resid_post", batch_size=2)["blocks.1.hook_resid_post"]
    torch.testing.assert_close(one, chunked, rtol=1e-5, atol=1e-6)


def test_dtype_and_device_of_outputs():
    model = tiny_model("llama")
    a = capture(model, ids(), "blocks.0.hook_resid_post", dtype=torch.bfloat16)
    assert a["blocks.0.hook_resid_post"].dtype == torch.bfloat16
    assert a["blocks.0.hook_resid_post"].device.type == "cpu"


def test_raw_module_paths():
    model = tiny_model("llama")
    x = ids()
    a = capture(model, x, ["model.layers.1", "model.layers.1.mlp.down_proj:input", "blocks.1.hook_resid_post",
                           "blocks.1.mlp.hook_post", "model.embed_tokens"])
    assert torch.equal(a["model.layers.1"], a["blocks.1.hook_resid_post"])
    assert torch.equal(a["model.layers.1.mlp.down_proj:input"], a["blocks.1.mlp.hook_post"])
    assert a["model.embed_tokens"].shape == (2, 10, 32)


def test_bad_site_names_fail_at_registration_with_suggestions():
    model = tiny_model("llama")
    hooks = our_hooks(model)
    with pytest.raises(SiteError, match=r"blocks\.1\.hook_resid_post"):
        capture(model, ids(), ["blocks.1.hook_resid_pst"])
    with pytest.raises(SiteError, match="3 blocks"):
        capture(model, ids(), ["blocks.7.hook_resid_post"])
    with pytest.raises(SiteError, match="'input' or 'output'"):
        capture(model, ids(), ["model.layers.0:inside"])
    with pytest.raises(SiteError, match="model.layers"):
        capture(model, ids(), ["model.layer.0"])
    assert our_hooks(model) == hooks


def test_wrong_inputs_fail_clearly():
    model = tiny_model("llama")
    with pytest.raises(InputError, match="tokenizer"):
        capture(model, "some text", "blocks.0.hook_resid_post")
    with pytest.raises(InputError, match="integer tensor"):
        capture(model, torch.randn(2, 3), "blocks.0.hook_resid_post")
    with pytest.raises(InputError, match="must be a string"):
        capture(model, 42, "blocks.0.hook_resid_post")
    with pytest.raises(InputError, match="no tokens"):
        capture(model, torch.zeros(0, 5, dtype=torch.long), "blocks.0.hook_resid_post")
    with pytest.raises(InputError, match="sites is empty"):
        capture(model, ids(), [])


def test_hooks_removed_after_exception_in_forward():
    model = tiny_model("llama")
    before = our_hooks(model)

    def boom(*_):
        raise RuntimeError("boom inside the forward")

    h = model.model.layers[1].mlp.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture(model, ids(), ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"])
        assert our_hooks(model) == before + 1  # only the test's own hook is left
    finally:
        h.remove()
    assert our_hooks(model) == before


def test_capture_keeps_transformers_hidden_state_hooks_and_training_flag():
    model = tiny_model("llama")
    model.train()
    try:
        capture(model, ids(), "blocks.0.hook_resid_post")
        assert model.training
    finally:
        model.eval()
    x = ids()
    with torch.no_grad():
        hs = model(input_ids=x, output_hidden_states=True).hidden_states
    assert hs is not None and len(hs) == 4


def test_vocab_is_tiny():  # guards the fixtures: a real vocabulary would make these tests slow
    assert tiny_model("llama").config.vocab_size == VOCAB
    assert len(DECODERS) == len(ARCHS) - 1


def test_copies_from_a_gpu_land_in_page_locked_memory_and_are_waited_for_once_a_chunk(monkeypatch):
    import importlib

    cap = importlib.import_module("interp.capture")  # the module (the package's attribute is the function)
    waits = []
    real_to = cap._to

    def gpu_like(t, device, dtype, pending):  # as a CUDA tensor's copy to CPU memory would register itself
        pending.add("cuda:0")
        return real_to(t, device, dtype, pending)

    monkeypatch.setattr(cap, "_to", gpu_like)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: waits.append(dev))
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (4, 6))
    acts = capture(model, ids, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], batch_size=2)
    assert waits == ["cuda:0", "cuda:0"]  # one wait per chunk, after the pass, for both sites
    assert acts["blocks.1.hook_resid_post"].shape[:2] == (4, 6)

    class FakeCuda(torch.Tensor):  # a CPU tensor that says it is on a GPU: the branch a CUDA tensor takes
        @property
        def device(self):
            return torch.device("cuda", 0)

    pinned = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: pinned.append(kw.get("pin_memory")) or real_empty(*a))
    pending: set = set()
    out = real_to(torch.ones(2, 3).as_subclass(FakeCuda), "cpu", torch.float16, pending)
    assert pinned == [True] and pending == {torch.device("cuda", 0)}  # page-locked, and waited for by the caller
    assert type(out) is torch.Tensor and torch.equal(out, torch.ones(2, 3, dtype=torch.float16))


def test_a_boolean_positions_mask_is_resolved_once_a_batch_for_every_site(monkeypatch):
    from interp.positions import Positions

    model = tiny_model("llama")
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.hook_resid_mid"]
    ids = torch.randint(0, VOCAB, (4, 6))
    keep = torch.rand(4, 6) > 0.4
    full = capture(model, ids, sites)
    calls = []
    real = Positions.flat_index
    monkeypatch.setattr(Positions, "flat_index", lambda self, b, s: calls.append((b, s)) or real(self, b, s))
    got = capture(model, ids, sites, positions=keep, batch_size=2)
    assert calls == [(2, 6), (2, 6)]  # once per batch of 2 rows, not once per site
    for site in sites:
        assert torch.equal(got[site], full[site][keep])  # the rows a boolean index picks, in its order


def test_token_ids_outside_the_vocabulary_are_one_line():
    model = tiny_model("llama")
    with pytest.raises(InputError, match=r"token ids 5\.\.400, but the model's embedding has 300 rows"):
        capture(model, torch.tensor([[5, 400]]), "blocks.0.hook_resid_post")
