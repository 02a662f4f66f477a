"""The dashboard data pass against brute-force computations on a tiny random model and a small corpus."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

SITE = "blocks.1.hook_resid_post"
CTX = 32


def _cfg(text_file, **kw):
    from interp.dashboard import DashboardConfig

    base = dict(tokens=1500, dataset=str(text_file), context_size=CTX, batch_windows=4, top_k=5, left=4, right=2,
                n_bins=12, bin_lo=1e-2, bin_hi=10.0, samples_per_bin=2, save_seconds=0)
    return DashboardConfig(**{**base, **kw})


def _units(signed: bool, n: int = 6):
    from interp.dashboard import Units

    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, n, generator=g) * 20
    dirs = torch.randn(n, 32, generator=g)
    if signed:
        return Units(encode=lambda x: x @ w, names=tuple(f"u{i}" for i in range(n)), directions=dirs, signed=True)
    return Units(encode=lambda x: torch.relu(x @ w - 0.3), names=tuple(f"u{i}" for i in range(n)), directions=dirs)


def _brute(text_file, cfg, units, n_windows):
    """Unit activations [W, T, U] and the kept positions [W, T] of the first `n_windows` windows."""
    from interp import capture
    from interp.data import load_texts, pack, token_mask

    tok = byte_tokenizer()
    wins = list(itertools.islice(pack(load_texts(str(text_file), shuffle_seed=cfg.seed), tok, CTX), n_windows))
    ids = torch.stack(wins)
    keep = token_mask(ids, tok)
    zs = []
    for lo in range(0, n_windows, cfg.batch_windows):  # the same forward batches as the pass
        acts = capture(tiny_model("llama"), ids[lo:lo + cfg.batch_windows], [SITE], dtype=torch.float32)[SITE]
        k = keep[lo:lo + cfg.batch_windows]
        z = torch.zeros(*acts.shape[:2], units.n_units)
        z[k] = units.encode(acts[k])  # the kept rows, encoded together as the pass does (same float sums)
        zs.append(z)
    z = torch.cat(zs)
    return ids, keep, z


@pytest.fixture(scope="module")
def signed_run(text_file, tmp_path_factory):
    from interp.dashboard import collect, load

    cfg, units = _cfg(text_file), _units(True)
    out = collect(tiny_model("llama"), byte_tokenizer(), SITE, units, tmp_path_factory.mktemp("d") / "dash", cfg,
                  progress=False)
    return cfg, units, load(out)


def test_top_contexts_equal_a_brute_force_computation(text_file, signed_run):
    cfg, units, data = signed_run
    ids, keep, z = _brute(text_file, cfg, units, data.info["n_windows"])
    assert data.info["n_tokens"] == int(keep.sum()) >= cfg.tokens
    t = data.tensors
    masked = z.masked_fill(~keep[..., None], -math.inf)
    win_max, win_arg = masked.max(dim=1)  # [W, U]
    for u in range(units.n_units):
        order = win_max[:, u].argsort(descending=True, stable=True)[:cfg.top_k]  # ties: earlier window first
        assert t["top_win"][u].tolist() == order.tolist()
        assert t["top_pos"][u].tolist() == win_arg[order, u].tolist()
        torch.testing.assert_close(t["top_val"][u], win_max[order, u])
        for j, w in enumerate(order.tolist()):
            p = int(win_arg[w, u])
            lo, hi = max(0, p - cfg.left), min(CTX, p + cfg.right + 1)
            toks = [x for x in t["top_tok"][u, j].tolist() if x >= 0]
            assert toks == ids[w, lo:hi].tolist()
            rec = data.unit(u)["contexts"][j]
            assert rec["tokens"][rec["center"]][1] == pytest.approx(float(win_max[w, u]), rel=1e-5)


def test_histogram_frequency_and_quantile_samples(text_file, signed_run):
    cfg, units, data = signed_run
    ids, keep, z = _brute(text_file, cfg, units, data.info["n_windows"])
    edges = torch.tensor([(-math.inf if i == 0 else math.inf) if e is None else e
                          for i, e in enumerate(data.info["bin_edges"])], dtype=torch.float64)
    for u in range(units.n_units):
        v = z[..., u][keep & (z[..., u] != 0)].double()
        expected = [int(((v >= edges[j]) & (v < edges[j + 1])).sum()) for j in range(len(edges) - 1)]
        assert data.tensors["hist"][u].tolist() == expected
        rec = data.unit(u)
        assert rec["frequency"] == pytest.approx(v.numel() / int(keep.sum()))
        assert sum(q["count"] for q in rec["quantiles"]) == v.numel()
        n_samples = 0
        for q in rec["quantiles"]:
            for s in q["samples"]:
                n_samples += 1
                assert (q["lo"] is None or s["value"] >= q["lo"]) and (q["hi"] is None or s["value"] < q["hi"])
                assert s["tokens"][s["center"]][1] == pytest.approx(s["value"])
                assert float(z[s["window"], s["position"], u]) == pytest.approx(s["value"], rel=1e-5)
        filled = sum(min(c, cfg.samples_per_bin) for c in expected)
        assert n_samples == filled  # every bin keeps min(its count, samples_per_bin) samples
        lows = [q["lo"] for q in rec["quantiles"] if q["lo"] is not None]
        assert lows == sorted(lows, reverse=True)


def test_unsigned_units_keep_only_firing_windows(text_file, tmp_path):
    from interp.dashboard import collect, load

    cfg, units = _cfg(text_file, tokens=600), _units(False)
    data = load(collect(tiny_model("llama"), byte_tokenizer(), SITE, units, tmp_path / "d", cfg, progress=False))
    _, keep, z = _brute(text_file, cfg, units, data.info["n_windows"])
    for u in range(units.n_units):
        n_firing = int((z[..., u].amax(dim=1) > 0).sum())
        top = data.tensors["top_val"][u]
        assert int(torch.isfinite(top).sum()) == min(cfg.top_k, n_firing)
        assert bool((top[torch.isfinite(top)] > 0).all())
        assert data.unit(u)["frequency"] == pytest.approx(int((z[..., u] > 0).sum()) / int(keep.sum()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logit_effect_equals_the_explicit_matrix_product(arch):
    from interp.dashboard import logit_effect

    model = tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(7, 32, generator=g)
    if arch == "llama":  # RMSNorm: the weight, elementwise
        normed = dirs * model.model.norm.weight.detach()
    else:  # LayerNorm: centred, then the weight
        normed = (dirs - dirs.mean(1, keepdim=True)) * model.transformer.ln_f.weight.detach()
    expected = normed @ model.get_output_embeddings().weight.detach().T
    up_i, up_v, dn_i, dn_v = logit_effect(model, dirs, n_tokens=5)
    top, bottom = expected.topk(5, dim=1), expected.topk(5, dim=1, largest=False)
    assert torch.equal(up_i, top.indices) and torch.equal(dn_i, bottom.indices)
    torch.testing.assert_close(up_v, top.values)
    torch.testing.assert_close(dn_v, bottom.values)


def test_nearest_units_by_cosine():
    from interp.dashboard import nearest_units

    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(20, 8, generator=g)
    idx, cos = nearest_units(dirs, 3, chunk=7)
    unit = dirs / dirs.norm(dim=1, keepdim=True)
    sim = unit @ unit.T
    sim.fill_diagonal_(-2)
    assert torch.equal(idx, sim.topk(3, dim=1).indices)
    torch.testing.assert_close(cos, sim.topk(3, dim=1).values)


def test_resume_after_an_interruption_gives_the_same_data(text_file, tmp_path):
    from safetensors.torch import load_file

    from interp.dashboard import Units, collect

    cfg, units = _cfg(text_file, tokens=1200), _units(True)
    calls = {"n": 0}

    def failing(x):
        calls["n"] += 1
        if calls["n"] == 6:  # in batch 6: with save_seconds=0 a state was saved after every batch
            raise RuntimeError("killed")
        return units.encode(x)

    model, tok = tiny_model("llama"), byte_tokenizer()
    broken = Units(encode=failing, names=units.names, directions=units.directions, signed=True)
    with pytest.raises(RuntimeError, match="killed"):
        collect(model, tok, SITE, broken, tmp_path / "a", cfg, progress=False)
    state = json.loads((tmp_path / "a" / "state.json").read_text())
    assert state["batches"] == 5 and not (tmp_path / "a" / "data.json").exists()
    collect(model, tok, SITE, units, tmp_path / "a", cfg, progress=False)
    collect(model, tok, SITE, units, tmp_path / "b", cfg, progress=False)
    a, b = load_file(str(tmp_path / "a" / "data.safetensors")), load_file(str(tmp_path / "b" / "data.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    info = [json.loads((tmp_path / x / "data.json").read_text()) for x in "ab"]
    assert info[0] == info[1]
    assert not (tmp_path / "a" / "state.json").exists()


def test_state_is_saved_by_time_and_its_cadence_need_not_match(text_file, tmp_path):
    from safetensors.torch import load_file

    from interp.dashboard import Units, collect

    units = _units(False)
    model, tok = tiny_model("llama"), byte_tokenizer()
    calls = {"n": 0}

    def failing(x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return units.encode(x)

    broken = Units(encode=failing, names=units.names, directions=units.directions)
    with pytest.raises(RuntimeError, match="killed"):  # an hour between saves: none before the kill
        collect(model, tok, SITE, broken, tmp_path / "a", _cfg(text_file, tokens=600, save_seconds=3600),
                progress=False)
    assert not (tmp_path / "a" / "state.json").exists()
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="killed"):  # every batch saved; resumed with another cadence
        collect(model, tok, SITE, broken, tmp_path / "a", _cfg(text_file, tokens=600), progress=False)
    assert json.loads((tmp_path / "a" / "state.json").read_text())["batches"] == 3
    collect(model, tok, SITE, units, tmp_path / "a", _cfg(text_file, tokens=600, save_seconds=3600), progress=False)
    collect(model, tok, SITE, units, tmp_path / "b", _cfg(text_file, tokens=600), progress=False)
    a, b = load_file(str(tmp_path / "a" / "data.safetensors")), load_file(str(tmp_path / "b" / "data.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "a" / "data.json").read_text())  # a folder written when the cadence was batches
    del info["settings"]["save_seconds"]
    info["settings"]["save_every"] = 20
    (tmp_path / "a" / "data.json").write_text(json.dumps(info))
    again = collect(model, tok, SITE, units, tmp_path / "a", _cfg(text_file, tokens=600), progress=False)
    assert again == tmp_path / "a"  # finished: nothing refused, nothing rerun


@pytest.mark.parametrize("signed", [False, True])
def test_sparse_codes_give_the_same_data_as_dense_ones(text_file, tmp_path, signed):
    from safetensors.torch import load_file

    from interp.dashboard import Units, collect, sae_units

    units = _units(signed)
    cfg = _cfg(text_file, tokens=600)
    sparse = Units(encode=lambda x: units.encode(x).to_sparse(), names=units.names, directions=units.directions,
                   signed=signed)
    model, tok = tiny_model("llama"), byte_tokenizer()
    runs = {"dense": units, "sparse": sparse}
    if not signed:  # a chosen subset of latents, picked from dense and from sparse codes
        runs["some dense"] = sae_units(units.encode, units.directions, latents=[4, 1, 2])
        runs["some sparse"] = sae_units(sparse.encode, units.directions, latents=[4, 1, 2])
    data = {name: load_file(str(collect(model, tok, SITE, u, tmp_path / name.replace(" ", "-"), cfg, progress=False)
                                / "data.safetensors")) for name, u in runs.items()}
    for a, b in [("dense", "sparse"), ("some dense", "some sparse")][:1 if signed else 2]:
        assert sorted(data[a]) == sorted(data[b])
        for k in data[a]:
            assert torch.equal(data[a][k], data[b][k]), (a, b, k)
    if not signed:
        assert torch.equal(data["some dense"]["top_val"], data["dense"]["top_val"][[4, 1, 2]])
        assert bool(torch.isfinite(data["dense"]["top_val"]).any())


def test_bad_inputs_are_one_line_errors(text_file, tmp_path):
    from interp.dashboard import DashboardConfig, Tracker, Units, collect, load, render, sae_units
    from interp.errors import InputError

    for bad in (dict(tokens=0), dict(n_bins=1), dict(bin_lo=5.0, bin_hi=1.0), dict(left=-1), dict(save_seconds=-1),
                dict(save_seconds=math.inf)):
        with pytest.raises(InputError):
            DashboardConfig(**bad)
    with pytest.raises(InputError, match="not in 0..3"):
        sae_units(lambda x: x, torch.randn(4, 32), latents=[2, 9])
    with pytest.raises(InputError, match="signed=True"):
        Tracker(2).update(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool),
                          -torch.ones(1, 3, 2), 0)
    with pytest.raises(InputError, match=r"rows \(1, 2\) do not match"):
        Tracker(3).update_rows(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool),
                               torch.ones(1, 2), 0)
    with pytest.raises(InputError, match=r"encoder returned shape \(\d+, 5\)"):
        wrong = Units(encode=lambda x: torch.ones(x.shape[0], 5), names=("a", "b"))
        collect(tiny_model("llama"), byte_tokenizer(), SITE, wrong, tmp_path / "w", _cfg(text_file, tokens=300),
                progress=False)
    with pytest.raises(InputError, match="no finished dashboard"):
        render(tmp_path)
    with pytest.raises(InputError, match="no finished dashboard"):
        load(tmp_path)
    units = _units(True)
    out = collect(tiny_model("llama"), byte_tokenizer(), SITE, units, tmp_path / "d", _cfg(text_file, tokens=300),
                  progress=False)
    with pytest.raises(InputError, match="other settings") as e:
        collect(tiny_model("llama"), byte_tokenizer(), SITE, units, out, _cfg(text_file, tokens=400), progress=False)
    assert "\n" not in str(e.value)



def test_neuronpedia_batch_holds_the_pages_data(signed_run):
    from interp.dashboard import neuronpedia_batch
    from interp.dashboard.neuronpedia import FEATURE_KEYS

    cfg, units, data = signed_run
    batch = json.loads(neuronpedia_batch(data.path, sae_set="res-test", model_id="tiny").read_text())
    assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("tiny", 1, "res-test")
    # SAE-Dashboard's NeuronpediaDashboardBatch(**batch) takes exactly these keys and refuses any other
    assert set(batch) == {"model_id", "layer", "sae_set", "features"}
    assert all(set(f) == FEATURE_KEYS for f in batch["features"])
    assert {(f["n_prompts_total"], f["n_tokens_in_prompt"]) for f in batch["features"]} == {
        (data.info["n_windows"], cfg.context_size)}
    assert [f["feature_index"] for f in batch["features"]] == list(range(units.n_units))
    for f, u in zip(batch["features"], range(units.n_units)):
        rec = data.unit(u)
        assert f["frac_nonzero"] == rec["frequency"] and f["pos_str"] == [t for t, _ in rec["logits_up"]]
        assert sum(f["freq_hist_data_bar_heights"]) == sum(h["count"] for h in rec["histogram"])
        top = [a for a in f["activations"] if a["bin_min"] == -1]
        assert len(top) == len(rec["contexts"]) and all(len(a["tokens"]) == len(a["values"]) for a in top)
        assert max(top[0]["values"]) == pytest.approx(rec["max"], abs=1e-3)
        for a in top:  # the token each context was chosen for is the one Neuronpedia highlights
            assert a["values"][a["qualifying_token_index"]] == pytest.approx(max(a["values"]), abs=1e-3)
        for a in f["activations"][len(top):]:
            assert 0 < a["bin_contains"] <= 1


def test_logit_effect_uses_the_models_own_final_norm_whatever_its_class_is_called():
    """VaultGemma's final RMSNorm scales by (1 + weight) but its class name does not start with "gemma": the
    effect was computed with the weight alone, and its top tokens were other tokens than the model's norm gives."""
    import transformers as tr

    from interp.dashboard import final_norm, logit_effect

    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(tr.VaultGemmaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=128)).eval()
    with torch.no_grad():
        final_norm(model).weight.copy_(torch.randn(32) * 0.5)  # trained norms are not all ones
    dirs = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = final_norm(model)(dirs[:, None]).squeeze(1) @ model.get_output_embeddings().weight.T
    up_i, _, dn_i, _ = logit_effect(model, dirs, n_tokens=10)
    assert torch.equal(up_i, ref.topk(10, dim=1).indices) and torch.equal(dn_i, ref.topk(10, dim=1,
                                                                                         largest=False).indices)


def test_angle_units_of_an_ellipse_peak_at_their_own_point():
    """A circle probe's circle is an ellipse in its plane (CircleMap.axes): the "angle X" units read (cos, sin) of
    the plane instead of the ellipse's axes, and several peaked at the neighbouring day."""
    from interp.dashboard import subspace_units
    from interp.subspace import CircleMap, Subspace

    days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    angles = {d: 2 * math.pi * i / 7 for i, d in enumerate(days)}
    basis = torch.linalg.qr(torch.randn(32, 2, generator=torch.Generator().manual_seed(0)))[0].T
    for axes in (None, torch.tensor([[1.0, 0.0], [1.5, 0.5]])):
        sub = Subspace(basis, torch.randn(32, generator=torch.Generator().manual_seed(1)),
                       CircleMap(torch.tensor([0.3, -0.2]), 2.0, angles, axes=axes), orthonormalize=False)
        points = torch.stack([sub.reconstruct(sub.to_coords(d)) for d in days])
        z = subspace_units(sub).encode(points)[:, 2:]
        assert [days[int(i)] for i in z.argmax(0)] == days


def test_a_state_pair_split_by_a_crash_resumes_from_the_tensors_own_position(text_file, tmp_path):
    """A crash between writing state.safetensors and state.json paired new tensors with the old position: the
    resume read some windows twice and others never."""
    import importlib

    from safetensors.torch import load_file

    from interp.dashboard import collect

    collect_mod = importlib.import_module("interp.dashboard.collect")  # the package's `collect` is the function

    cfg, units = _cfg(text_file, tokens=1200), _units(True)
    model, tok = tiny_model("llama"), byte_tokenizer()
    real, calls = collect_mod.write_json, {"n": 0}

    def crash_on_fourth(path, *a, **kw):
        if path.name == "state.json":
            calls["n"] += 1
            if calls["n"] == 4:
                raise OSError("killed between the two state files")
        return real(path, *a, **kw)

    collect_mod.write_json = crash_on_fourth
    try:
        with pytest.raises(OSError, match="killed"):
            collect(model, tok, SITE, units, tmp_path / "a", cfg, progress=False)
    finally:
        collect_mod.write_json = real
    collect(model, tok, SITE, units, tmp_path / "a", cfg, progress=False)
    collect(model, tok, SITE, units, tmp_path / "b", cfg, progress=False)
    a, b = load_file(str(tmp_path / "a" / "data.safetensors")), load_file(str(tmp_path / "b" / "data.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads((tmp_path / x / "data.json").read_text())["n_windows"] for x in "ab"] == [
        json.loads((tmp_path / "b" / "data.json").read_text())["n_windows"]] * 2


def test_a_folder_made_from_other_directions_is_not_reused(text_file, tmp_path):
    from interp.dashboard import Units, collect
    from interp.errors import InputError

    cfg, units = _cfg(text_file, tokens=300), _units(True)
    model, tok = tiny_model("llama"), byte_tokenizer()
    collect(model, tok, SITE, units, tmp_path / "d", cfg, progress=False)
    other = Units(encode=units.encode, names=units.names, directions=units.directions * 2, signed=True)
    with pytest.raises(InputError, match="directions_sha256"):
        collect(model, tok, SITE, other, tmp_path / "d", cfg, progress=False)
    collect(model, tok, SITE, units, tmp_path / "d", cfg, progress=False)  # the same units: reused as it is


def test_a_token_text_utf8_cannot_hold_is_rendered_not_raised(signed_run, tmp_path):
    import shutil

    from interp.dashboard import render

    cfg, units, data = signed_run
    folder = tmp_path / "copy"
    shutil.copytree(data.path, folder)
    info = json.loads((folder / "data.json").read_text())
    for key in list(info["vocab"])[:3]:
        info["vocab"][key] = "a\ud800b"  # a lone surrogate: json can hold it, UTF-8 cannot
    (folder / "data.json").write_text(json.dumps(info))
    page = render(folder)
    assert "a?b" in page.read_text(encoding="utf-8") or any(
        "a?b" in p.read_text(encoding="utf-8") for p in (folder / "units").glob("*.html"))


def test_logit_effect_with_a_final_norm_that_has_no_weight():
    """OLMo's final LayerNorm has no parameters: it was not found as the final norm, and the logit effect refused."""
    import transformers as tr

    from interp.dashboard import final_norm, logit_effect

    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(tr.OlmoConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2)).eval()
    norm = final_norm(model)
    assert not list(norm.parameters())
    dirs = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = norm(dirs[:, None]).squeeze(1) @ model.get_output_embeddings().weight.T
    up_i, _, dn_i, _ = logit_effect(model, dirs, n_tokens=10)
    assert torch.equal(up_i, ref.topk(10, dim=1).indices) and torch.equal(dn_i, ref.topk(10, dim=1,
                                                                                         largest=False).indices)
