"""Properties of the matching-pursuit SAE (saes/mp.py, saes/mp_pursuit.py)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saes import mp_pursuit
from saes.base import SAEError, build
from saes.losses import TrainState
from saes.mp import MPSAE, MPSAEConfig, mp_metrics

MODES = list(itertools.product(["nonneg", "signed", "signed_max"], [True, False]))


def make(d_model=12, d_sae=40, n_steps=6, seed=0, bias=True, **kw) -> MPSAE:
    torch.manual_seed(seed)
    sae = build("mpsae", d_model=d_model, d_sae=d_sae, n_steps=n_steps, **kw).double()
    if bias:
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.3)
    return sae.eval()


def true_residuals(x: torch.Tensor, sae: MPSAE, sel: mp_pursuit.Selection) -> torch.Tensor:
    """Residual norms step by step, recomputed from the choices (not from the pursuit's bookkeeping)."""
    r = x - sae.b_dec
    atoms = sae.atoms()
    out = [r.norm(dim=1)]
    for t in range(sel.indices.shape[1]):
        r = r - sel.coefs[:, t, None] * atoms[sel.indices[:, t]]
        out.append(r.norm(dim=1))
    return torch.stack(out, 1)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(MODES), n_steps=st.integers(1, 15),
       update=st.sampled_from(["gram", "direct"]))
def test_residual_never_increases_and_reconstruction_is_exact(seed, mode, n_steps, update):
    coef, repeat = mode
    sae = make(seed=seed, n_steps=n_steps, coefficients=coef, allow_repeat=repeat, correlation_update=update)
    x = torch.randn(64, 12, dtype=torch.float64) * 3
    res = sae.pursue(x)
    norms = true_residuals(x, sae, res.selection)
    assert (norms[:, 1:] <= norms[:, :-1] + 1e-10).all()
    torch.testing.assert_close(res.selection.residual_norms, norms, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(sae.decode(sae.encode(x)) + res.residual, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(res.x_hat + res.residual, x, atol=1e-12, rtol=0)
    if coef == "nonneg":
        assert (res.codes >= 0).all()
    if not repeat:  # every taken step adds a new atom
        assert (mp_metrics(res)["l0_mean"] == res.selection.n_steps.double().mean().item())


def test_k1_signed_is_best_atom_projection():
    sae = make(n_steps=1, coefficients="signed")
    x = torch.randn(50, 12, dtype=torch.float64)
    codes = sae.encode(x)
    corr = (x - sae.b_dec) @ sae.atoms().T
    best = corr.abs().argmax(1)
    expected = torch.zeros_like(codes)
    expected[torch.arange(50), best] = corr[torch.arange(50), best]
    torch.testing.assert_close(codes, expected)
    assert ((codes != 0).sum(1) == 1).all()
    assert (codes < 0).any() and (codes > 0).any()  # signed: both signs occur


def test_k1_nonneg_is_relu_of_best_positive_correlation():
    sae = make(n_steps=1, coefficients="nonneg")
    x = torch.randn(50, 12, dtype=torch.float64)
    corr = (x - sae.b_dec) @ sae.atoms().T
    vals, best = corr.max(1)
    codes = sae.encode(x)
    torch.testing.assert_close(codes[torch.arange(50), best], vals.clamp_min(0))


@pytest.mark.parametrize("coef,repeat", MODES)
@pytest.mark.parametrize("stop", [False, True])
def test_gram_and_direct_paths_agree(coef, repeat, stop):
    x = torch.randn(200, 12, dtype=torch.float64)
    kw = dict(n_steps=10, coefficients=coef, allow_repeat=repeat, stop_on_repeated_support=stop, residual_threshold=0.3)
    a = make(correlation_update="direct", **kw).pursue(x)
    b = make(correlation_update="gram", **kw).pursue(x)
    assert torch.equal(a.selection.indices, b.selection.indices)
    assert torch.equal(a.selection.stop_reason, b.selection.stop_reason)
    torch.testing.assert_close(a.codes, b.codes, atol=1e-12, rtol=0)


def test_gram_and_direct_agree_with_excluded_atoms_and_row_blocks(monkeypatch):
    monkeypatch.setattr(mp_pursuit, "CHUNK_ELEMS", 7 * 40)  # several row blocks of 7 rows
    sae = make()
    atoms = sae.atoms().detach()
    x = torch.randn(60, 12, dtype=torch.float64)
    excluded = torch.rand(40) < 0.4
    for coef, repeat in MODES:
        kw = dict(steps=8, coefficients=coef, allow_repeat=repeat, excluded=excluded)
        a = mp_pursuit.select(x, atoms, **kw)
        b = mp_pursuit.select(x, atoms, gram=atoms @ atoms.T, **kw)
        assert torch.equal(a.indices, b.indices) and torch.allclose(a.coefs, b.coefs)
        assert not excluded[a.indices[a.taken]].any()


def test_row_max_matches_torch_max():
    for m in [100, 2048, 5000]:
        s = torch.randn(30, m)
        best, j = mp_pursuit.row_max(s)
        b2, j2 = s.max(1)
        assert torch.equal(best, b2) and torch.equal(j, j2)


def test_auto_path_choice():
    assert not mp_pursuit.use_gram(8, 576, 9216, 32, gram_cached=False, elem_bytes=4)
    assert mp_pursuit.use_gram(4096, 576, 9216, 32, gram_cached=False, elem_bytes=4)
    assert not mp_pursuit.use_gram(4096, 576, 9216, 1, gram_cached=True, elem_bytes=4)
    assert not mp_pursuit.use_gram(4096, 576, 100_000, 32, gram_cached=False, elem_bytes=4)  # too big


def test_no_repeat_picks_distinct_atoms():
    sae = make(n_steps=12, allow_repeat=False, coefficients="signed")
    res = sae.pursue(torch.randn(40, 12, dtype=torch.float64))
    assert ((res.codes != 0).sum(1) == 12).all()


def test_stopping_rules():
    x = torch.randn(300, 12, dtype=torch.float64) * 2
    sae = make(n_steps=30)
    full = sae.pursue(x)
    # residual threshold: every row either ends at or below it, or ran out of steps / atoms
    res = sae.pursue(x, residual_threshold=1.0)
    sel = res.selection
    last = sel.residual_norms[:, -1]
    thr = sel.stop_reason == 1
    assert thr.any() and (last[thr] <= 1.0).all()
    ran_out = sel.stop_reason == 0  # took every step: above the threshold before each of them
    assert ran_out.any() and (sel.residual_norms[ran_out, :-1] > 1.0).all()
    # it stops at the first step that reaches the threshold: the norm before the last taken step is above it
    steps = sel.n_steps[thr]
    assert (sel.residual_norms[thr][torch.arange(int(thr.sum())), steps - 1] > 1.0).all()
    # max_iterations: fewer steps, a prefix of the full pursuit
    short = sae.pursue(x, max_iterations=5)
    assert short.selection.indices.shape[1] == 5
    assert torch.equal(short.selection.indices, full.selection.indices[:, :5])
    assert (short.selection.stop_reason[short.selection.n_steps == 5] == 0).all()
    # repeated support: a row stops right after its first step that re-picks an atom
    rep = sae.pursue(x, stop_on_repeated_support=True).selection
    stopped = rep.stop_reason == 2
    assert stopped.any()
    for i in torch.nonzero(stopped)[:20, 0].tolist():
        n = int(rep.n_steps[i])
        idx = rep.indices[i, :n].tolist()
        assert idx[-1] in idx[:-1] and len(set(idx[:-1])) == n - 1
        assert idx == full.selection.indices[i, :n].tolist()
    # config defaults apply in eval mode only; training always runs n_steps steps
    cfg_sae = make(n_steps=30, residual_threshold=1.0)
    assert torch.equal(cfg_sae.pursue(x).selection.stop_reason, sel.stop_reason)
    cfg_sae.train()
    assert (cfg_sae.pursue(x).selection.stop_reason != 1).all()
    m = mp_metrics(res)
    assert abs(sum(m["stopped_by"].values()) - 1) < 1e-6 and m["l0_min"] <= m["l0_mean"] <= m["l0_max"]
    assert len(m["residual_norm_per_step"]) == 31


def test_nonneg_exhausts_when_no_atom_correlates_positively():
    sae = make(d_model=4, d_sae=2, n_steps=5, bias=False, coefficients="nonneg")
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(4, dtype=torch.float64)[:2])
    x = torch.tensor([[-1.0, -2.0, 3.0, 0.0], [2.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    res = sae.pursue(x)
    assert res.selection.stop_reason.tolist() == [3, 3]
    assert res.codes.tolist() == [[0.0, 0.0], [2.0, 0.0]]


def test_grad_path_matches_pursuit_and_trains():
    sae = make(n_steps=8, d_sae=64).train()
    x = torch.randn(128, 12, dtype=torch.float64)
    with torch.no_grad():
        ref = sae.pursue(x)
    out = sae(x)
    torch.testing.assert_close(out.codes, ref.codes)
    torch.testing.assert_close(out.x_hat, ref.x_hat)
    out.x_hat.pow(2).sum().backward()
    assert sae.W_dec.grad is not None and sae.b_dec.grad is not None
    # the gradient equals plain autograd through a naive unrolled pursuit with the same choices
    W = sae.W_dec.detach().clone().requires_grad_(True)
    b = sae.b_dec.detach().clone().requires_grad_(True)
    a = W / W.norm(dim=1, keepdim=True)
    r = x - b
    for t in range(8):
        j = ref.selection.indices[:, t]
        z = ((r * a[j]).sum(1) * ref.selection.taken[:, t]).clamp_min(0)
        r = r - z[:, None] * a[j]
    (x - r).pow(2).sum().backward()
    torch.testing.assert_close(sae.W_dec.grad, W.grad)
    torch.testing.assert_close(sae.b_dec.grad, b.grad)


def test_training_reduces_loss_with_dropout_and_revive():
    torch.manual_seed(1)
    true = torch.nn.functional.normalize(torch.randn(24, 16), dim=1)
    codes = torch.rand(256, 24) * (torch.rand(256, 24) < 0.15)
    data = codes @ true
    sae = build("mpsae", d_model=16, d_sae=48, n_steps=4, atom_dropout=0.2, atom_dropout_steps=20, revive_coeff=0.1)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[:10] = True
    first = None
    for step in range(40):
        st_ = TrainState(step=step, global_rows=256, dead_mask=dead)
        out = sae.training_loss(data, st_)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        first = first if first is not None else out.terms["fvu"].item()
    assert "revive" in out.terms and out.terms["revive"] > 0
    assert out.terms["fvu"].item() < 0.7 * first
    assert out.l0 <= 4 and out.fired.any()


def test_contract_shapes_and_config_roundtrip():
    sae = make()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    out = sae(x)
    assert out.x_hat.shape == x.shape and out.codes.shape == (3, 5, 40) and out.pre_acts is None
    assert sae.encode(x[0, 0]).shape == (40,)
    assert sae.W_enc.shape == (12, 40)
    cfg = MPSAEConfig.from_dict(sae.cfg.to_dict())
    assert cfg == sae.cfg and sae.cfg.to_dict()["architecture"] == "mpsae"
    assert set(sae.state_dict()) == {"W_dec", "b_dec"}
    assert not make(decoder_bias=False, bias=False).b_dec.requires_grad


def test_bf16_runs():
    sae = build("mpsae", d_model=12, d_sae=40, n_steps=4).to(torch.bfloat16)
    out = sae(torch.randn(8, 12, dtype=torch.bfloat16))
    assert out.x_hat.dtype == torch.bfloat16 and out.codes.dtype == torch.bfloat16


@pytest.mark.parametrize("field,value", [("n_steps", 0), ("coefficients", "abs"), ("max_iterations", 0),
                                         ("residual_threshold", -1.0), ("atom_dropout", 1.0),
                                         ("correlation_update", "fast"), ("revive_k", 0),
                                         ("apply_b_dec_to_input", False)])
def test_config_validation_names_field(field, value, unchecked):
    with unchecked(), pytest.raises(SAEError, match=field):
        MPSAEConfig(d_model=4, d_sae=8, **{field: value})


def test_bad_input_and_options():
    sae = make()
    with pytest.raises(SAEError, match="d_model=12"):
        sae.encode(torch.randn(3, 5))
    with pytest.raises(SAEError, match="max_iterations"):
        sae.pursue(torch.randn(3, 12, dtype=torch.float64), max_iterations=0)
    with pytest.raises(SAEError, match="encode"):
        sae.activation(torch.randn(3, 40))
    with pytest.raises(SAEError, match="n_steps"):
        MPSAEConfig(d_model=4, d_sae=8, n_steps=9, allow_repeat=False)
    assert dataclasses.replace(sae.cfg, n_steps=3).n_steps == 3


def test_k_is_a_deprecated_alias_of_n_steps():
    x = torch.randn(6, 12, dtype=torch.float64)
    new = make(n_steps=5)
    with pytest.warns(DeprecationWarning, match="'k' is deprecated, use 'n_steps'") as caught:
        old = build("mpsae", d_model=12, d_sae=40, k=5).double()
    assert caught[0].filename == __file__  # the warning points at the caller's line
    old.load_state_dict(new.state_dict())
    assert old.cfg == new.cfg and old.cfg.n_steps == 5
    torch.testing.assert_close(old.encode(x), new.encode(x))
    with pytest.warns(DeprecationWarning, match="use 'n_steps'"):
        assert MPSAEConfig(d_model=12, d_sae=40, k=5) == new.cfg
    with pytest.warns(DeprecationWarning, match="use 'n_steps'"):
        assert MPSAEConfig.from_dict({"d_model": 12, "d_sae": 40, "k": 5}) == new.cfg
    with pytest.warns(DeprecationWarning, match="use 'n_steps'"):
        assert new.cfg.k == 5  # reading the old attribute
    for both in (lambda: build("mpsae", d_model=12, d_sae=40, k=5, n_steps=5),
                 lambda: MPSAEConfig(d_model=12, d_sae=40, k=5, n_steps=6),
                 lambda: MPSAEConfig.from_dict({"d_model": 12, "d_sae": 40, "k": 5, "n_steps": 5})):
        with pytest.raises(SAEError, match="both k= and n_steps="):
            both()


def test_checkpoint_saved_with_k_still_loads(tmp_path):
    """A checkpoint written before the rename holds ``k`` in its config block; SAELens' part is unchanged."""
    from saes.checkpoint import load, save

    sae = build("mpsae", d_model=12, d_sae=40, n_steps=5, max_iterations=7)
    save(sae, tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["architecture"] == "matching_pursuit" and cfg["max_iterations"] == 7  # what SAELens reads
    assert "k" not in cfg and "n_steps" not in cfg  # only SAELens' keys at the top level
    ours = cfg["interp"]["config"]
    ours["k"] = ours.pop("n_steps")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.warns(DeprecationWarning, match="use 'n_steps'"):
        back = load(tmp_path / "sae")
    assert back.cfg == sae.cfg and back.cfg.n_steps == 5
    x = torch.randn(6, 12)
    torch.testing.assert_close(back.encode(x), sae.eval().encode(x))
    ours["n_steps"] = 5  # both names: refused, naming the key
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match="both k= and n_steps="):
        load(tmp_path / "sae")


def test_trains_with_project_trainer_and_checkpoint_roundtrip(tmp_path):
    from saes.checkpoint import load
    from saes.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    true = torch.nn.functional.normalize(torch.randn(32, 16), dim=1)
    batches = [(torch.rand(256, 32) * (torch.rand(256, 32) < 0.1)) @ true * 5 + 2 for _ in range(40)]
    sae = build("mpsae", d_model=16, d_sae=64, n_steps=4, revive_coeff=0.05)
    untrained = copy.deepcopy(sae)
    tr = Trainer(sae, TrainConfig(total_tokens=256 * 40, batch_tokens=256, lr=3e-3, progress=False, log_every=10),
                 out_dir=tmp_path).fit(batches)
    x = torch.cat(batches[:4])
    with torch.no_grad():
        untrained.b_dec.copy_(x.mean(0))
    assert _fvu(sae, x) < 0.8 * _fvu(untrained, x)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    back = load(tmp_path / "sae")
    assert isinstance(back, MPSAE) and back.cfg == sae.cfg
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    assert tr.scales_[""] != 1.0  # trained on scaled inputs: the folded SAE reads raw activations


def _fvu(sae, x):
    return ((sae(x).x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def test_bf16_training_gram_matches_fp32_closely():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    a = build("mpsae", d_model=16, d_sae=64, n_steps=6, correlation_update="gram")
    b = build("mpsae", d_model=16, d_sae=64, n_steps=6, correlation_update="gram", train_gram_dtype="bfloat16")
    b.load_state_dict(a.state_dict())
    st_ = TrainState(step=0, global_rows=256)
    la, lb = a.training_loss(x, st_), b.training_loss(x, st_)
    assert abs(la.terms["fvu"].item() - lb.terms["fvu"].item()) < 0.02
    lb.loss.backward()
    assert torch.isfinite(b.W_dec.grad).all()
