"""MP-SAE training: threshold-stopped pursuit, dead-atom resampling and data initialisation."""

from __future__ import annotations

import json

import pytest
import torch

from saes import mp_pursuit
from saes.base import SAEError, build
from saes.mp import resample_dead
from saes.mp_atoms import init_from_rows
from saes.trainer import TrainConfig, Trainer


def planted(n_atoms=12, d=16, per_row=3, seed=0):
    """``sample(n) -> rows``: sums of ``per_row`` distinct unit atoms with coefficients U(1, 2), no noise."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g), dim=1)

    def sample(n: int) -> torch.Tensor:
        pick = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :per_row]
        coef = torch.zeros(n, n_atoms).scatter_(1, pick, 1 + torch.rand(n, per_row, generator=g))
        return coef @ atoms

    return atoms, sample


@pytest.mark.parametrize("update", ["gram", "direct"])
def test_residual_fraction_stops_each_row_at_its_own_share_of_its_norm(update, monkeypatch):
    monkeypatch.setattr(mp_pursuit, "CHUNK_ELEMS", 9 * 40)  # several row blocks of 9 rows
    torch.manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(40, 12, dtype=torch.float64), dim=1)
    x = torch.randn(100, 12, dtype=torch.float64) * torch.linspace(0.1, 10, 100)[:, None]  # norms 100x apart
    gram = atoms @ atoms.T if update == "gram" else None
    kw = dict(steps=30, coefficients="signed", gram=gram)  # signed: never runs out of atoms
    sel = mp_pursuit.select(x, atoms, residual_fraction=0.4, **kw)
    start, last = sel.residual_norms[:, 0], sel.residual_norms[:, -1]
    hit = sel.stop_reason == 1
    assert hit.all()  # 30 steps are plenty to reach 40% of the norm
    assert (last <= 0.4 * start + 1e-12).all()
    before_last = sel.residual_norms[torch.arange(100), sel.n_steps - 1]
    assert (before_last > 0.4 * start).all()  # and it stops at the first step that gets there
    assert sel.n_steps.unique().numel() > 1  # rows stop after different numbers of steps
    # scale-free: the same rows 1000x larger stop after the same steps
    big = mp_pursuit.select(x * 1000, atoms, residual_fraction=0.4, **kw)
    assert torch.equal(big.n_steps, sel.n_steps) and torch.equal(big.indices, sel.indices)
    # with an absolute threshold too, the larger of the two applies per row
    both = mp_pursuit.select(x, atoms, residual_fraction=0.4, residual_threshold=2.0, **kw)
    assert (both.residual_norms[:, -1] <= torch.clamp(0.4 * start, min=2.0) + 1e-12).all()
    assert (both.n_steps <= sel.n_steps).all() and (both.n_steps < sel.n_steps).any()


def test_threshold_training_respects_the_cap_and_reaches_the_threshold():
    atoms, sample = planted(d=32)
    torch.manual_seed(0)
    sae = build("mpsae", d_model=32, d_sae=24, n_steps=6, residual_fraction=0.1)
    batches = [sample(256) for _ in range(200)]
    tr = Trainer(sae, TrainConfig(total_tokens=256 * 200, batch_tokens=256, lr=1e-2, progress=False, log_every=20,
                                  b_dec_init="zeros", dead_tokens=256 * 20)).fit(batches)
    assert all(h[""]["l0"] <= 6 for h in tr.history_)  # the cap holds in training
    x = sample(2000)
    sae.eval()
    res = sae.pursue(x)
    sel = res.selection
    assert int(sel.n_steps.max()) <= 6 and sel.indices.shape[1] == 6
    reached = sel.stop_reason == 1
    start = (x - sae.b_dec).norm(dim=1)
    assert reached.float().mean() > 0.95  # the learned dictionary gets nearly every row under 10% of its norm
    assert (sel.residual_norms[reached, -1] <= 0.1 * start[reached] * (1 + 1e-5)).all()
    # the planted dictionary itself, with the same rule and cap, gets fewer rows there: MP is greedy
    oracle = mp_pursuit.select(x, atoms, steps=6, residual_fraction=0.1)
    assert (oracle.stop_reason == 1).float().mean() < reached.float().mean()
    l0 = (res.codes != 0).sum(1).float()
    assert 3 <= l0.mean() <= 3.6  # three planted atoms a row, and few extra steps
    cos = torch.nn.functional.normalize(sae.W_dec, dim=1) @ atoms.T
    assert (cos.max(0).values > 0.98).all()  # every planted atom learned
    # in training mode the same rule runs (the cap is n_steps); switching it off runs every step
    sae.train()
    assert torch.equal(sae.pursue(x).selection.n_steps, sel.n_steps)
    assert (sae.pursue(x, residual_fraction=0.0).selection.stop_reason != 1).all()


def test_resample_dead_moves_only_dead_atoms_to_the_drawn_rows():
    W = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    before = W.clone()
    dead = torch.tensor([False, True, False, False, True, False])
    rows = torch.tensor([[3.0, 0, 0, 0], [0, 0, 5.0, 0], [0, 1.0, 0, 0]])
    assert resample_dead(W, dead, rows, torch.tensor([0.0, 1.0, 0.0]), seed=3) == 2
    assert torch.equal(W[~dead], before[~dead])
    assert torch.equal(W[dead], torch.tensor([[0, 0, 1.0, 0], [0, 0, 1.0, 0]]))  # the only row with weight
    assert resample_dead(W, torch.zeros(6, dtype=torch.bool), rows, torch.ones(3), seed=3) == 0


def test_resampling_revives_atoms_that_never_win_a_selection():
    """Atoms pointing away from the data are never picked by non-negative pursuit: without
    resampling they never move; with it they are moved into the data and win selections."""
    atoms, sample = planted(n_atoms=8, d=12, per_row=2)
    batches = [sample(256).abs() + 0.5 for _ in range(120)]  # rows in the positive orthant
    picked = {}
    for every in (0, 10):
        torch.manual_seed(0)
        sae = build("mpsae", d_model=12, d_sae=16, n_steps=1, decoder_bias=False, resample_every=every,
                    resample_until=0.8)
        with torch.no_grad():
            sae.W_dec[8:] = -sae.W_dec[8:].abs()  # half the atoms point away from every row
        away = sae.W_dec[8:].detach().clone()
        Trainer(sae, TrainConfig(total_tokens=256 * 120, batch_tokens=256, lr=3e-3, progress=False,
                                 dead_tokens=256 * 5)).fit(batches)
        with torch.no_grad():
            codes = sae.eval().encode(torch.cat(batches[-10:]))
        picked[every] = int(((codes[:, 8:] != 0).sum(0) > 0).sum())
        assert (sae.n_resampled_ > 0) == bool(every)  # the count of moved atoms the studies report
        if every == 0:
            torch.testing.assert_close(sae.W_dec[8:].detach(), away, atol=1e-6, rtol=0)  # never picked, never moved
    assert picked[0] == 0 and picked[10] >= 4


def test_data_init_starts_atoms_at_centred_rows():
    rows = torch.randn(50, 8)
    W = torch.zeros(20, 8)
    torch.manual_seed(0)
    assert init_from_rows(W, rows) == 20
    unit = torch.nn.functional.normalize(rows, dim=1)
    assert torch.allclose((W @ unit.T).max(1).values, torch.ones(20))  # each atom is one of the rows
    assert len({tuple(r) for r in W.tolist()}) == 20  # distinct rows
    W2 = torch.full((80, 8), 7.0)
    assert init_from_rows(W2, rows) == 50 and (W2[50:] == 7.0).all()  # fewer rows: the rest untouched
    torch.manual_seed(0)
    sae = build("mpsae", d_model=8, d_sae=20, atom_init="data")
    tr = Trainer(sae, TrainConfig(total_tokens=64, batch_tokens=64, lr=1e-9, progress=False, b_dec_init="mean"))
    tr.fit([rows[:32].repeat(2, 1) + 3])  # each row twice: the batch mean is that of the 32 rows
    x = rows[:32] + 3
    centred = torch.nn.functional.normalize(x - x.mean(0), dim=1)
    assert ((sae.atoms() @ centred.T).max(1).values > 0.999).all()


def test_resume_with_resampling_reaches_the_uninterrupted_weights(tmp_path):
    from sae_testdata import SyntheticSource
    from test_trainer import Crash, CrashingSource

    c = TrainConfig(total_tokens=64 * 24, batch_tokens=64, lr=3e-3, progress=False, checkpoint_every=5,
                    dead_tokens=64 * 3, log_every=4)
    kw = dict(d_model=16, d_sae=48, n_steps=3, resample_every=4, resample_until=1.0)
    torch.manual_seed(0)
    ref = build("mpsae", **kw)
    Trainer(ref, c, out_dir=tmp_path / "ref").fit(SyntheticSource(16, rows=64))
    torch.manual_seed(0)
    a = build("mpsae", **kw)
    with pytest.raises(Crash):
        Trainer(a, c, out_dir=tmp_path / "run").fit(CrashingSource(16, rows=64, crash_at=17))
    torch.manual_seed(123)
    b = build("mpsae", **kw)
    Trainer(b, c, out_dir=tmp_path / "run").fit(SyntheticSource(16, rows=64), resume=True)
    torch.testing.assert_close(ref.W_dec, b.W_dec, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ref.b_dec, b.b_dec, atol=1e-6, rtol=1e-5)


def test_threshold_stopped_sae_is_saved_under_this_projects_name(tmp_path):
    from saes.checkpoint import load, save

    sae = build("mpsae", d_model=8, d_sae=16, n_steps=4, residual_fraction=0.2)
    save(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "interp.mpsae"  # SAELens has no relative stopping rule: it must refuse the file
    back = load(tmp_path / "sae")
    assert back.cfg.residual_fraction == 0.2
    x = torch.randn(30, 8)
    torch.testing.assert_close(back.encode(x), sae.eval().encode(x))
    save(build("mpsae", d_model=8, d_sae=16, n_steps=4), tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "cfg.json").read_text())["architecture"] == "matching_pursuit"


@pytest.mark.parametrize("field,value", [("residual_fraction", 1.0), ("residual_fraction", -0.1),
                                         ("atom_init", "zeros"), ("resample_every", -1), ("resample_until", 2.0)])
def test_new_fields_are_validated_with_their_name(field, value):
    with pytest.raises(SAEError, match=f"MPSAEConfig.{field} must be"):
        build("mpsae", d_model=8, d_sae=16, **{field: value})
    with pytest.raises(SAEError, match="residual_fraction must be in"):
        build("mpsae", d_model=8, d_sae=16).pursue(torch.randn(2, 8), residual_fraction=1.5)


def test_training_with_the_gram_update_follows_the_dictionary_as_it_moves(monkeypatch):
    """The trainer's one-pass Adam writes W_dec through a raw pointer; that left W_dec's version unchanged, so the
    pursuit kept the initial dictionary's Gram matrix for the whole run (0.30 off after 60 steps, FVU 0.224 against
    0.167 with the direct update)."""
    torch.manual_seed(0)
    true = torch.nn.functional.normalize(torch.randn(32, 16), dim=1)
    batches = [(torch.rand(256, 32) * (torch.rand(256, 32) < 0.1)) @ true * 5 + 2 for _ in range(20)]
    stale: list[float] = []
    real = mp_pursuit.select

    def spy(x, atoms, *, gram=None, **kw):
        if gram is not None:
            stale.append(float((gram.float() - atoms.float() @ atoms.float().T).abs().max()))
        return real(x, atoms, gram=gram, **kw)

    monkeypatch.setattr(mp_pursuit, "select", spy)
    saes_ = {}
    for update in ("gram", "direct"):
        torch.manual_seed(1)
        sae = build("mpsae", d_model=16, d_sae=64, n_steps=4, correlation_update=update, resample_every=0)
        Trainer(sae, TrainConfig(total_tokens=256 * 20, batch_tokens=256, lr=3e-3, progress=False,
                                 log_every=10)).fit(batches)
        saes_[update] = sae
    assert len(stale) >= 19 and max(stale) < 1e-5
    torch.testing.assert_close(saes_["gram"].W_dec, saes_["direct"].W_dec, atol=1e-4, rtol=1e-4)


def test_an_atom_edited_through_data_is_seen_by_the_next_encode():
    torch.manual_seed(0)
    sae = build("mpsae", d_model=16, d_sae=64, n_steps=6, correlation_update="gram").eval()
    x = torch.randn(50, 16)
    sae.encode(x)  # builds and caches the Gram matrix
    new = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)
    sae.W_dec.data.copy_(new)  # no version bump: the values must be checked
    fresh = build("mpsae", d_model=16, d_sae=64, n_steps=6, correlation_update="gram").eval()
    fresh.load_state_dict(sae.state_dict())
    torch.testing.assert_close(sae.encode(x), fresh.encode(x))
