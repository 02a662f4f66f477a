"""The trainer: it learns, keeps its invariants, folds the input scale, resumes exactly."""

from __future__ import annotations

import pytest
import torch
from sae_testdata import SyntheticSource

import saes
from saes.losses import fold_input_scale, geometric_median, input_scale, typical_mean
from saes.trainer import TrainConfig, Trainer

D, M, ROWS = 16, 64, 128


def cfg(**kw) -> TrainConfig:
    base = dict(total_tokens=ROWS * 40, batch_tokens=ROWS, lr=3e-3, progress=False, log_every=10)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_training_reduces_fvu_and_keeps_invariants(arch):
    torch.manual_seed(0)
    kw = {"k": 6} if "topk" in arch else {}
    sae = saes.build(arch, d_model=D, d_sae=M, **kw)
    tr = Trainer(sae, cfg()).fit(SyntheticSource(D, rows=ROWS))
    first, last = tr.history_[0][""], tr.history_[-1][""]
    assert last["fvu"] < 0.5 * first["fvu"] or last["fvu"] < 0.15, (first, last)
    assert len(tr.history_) == 4 and tr.steps_ == 40
    if sae.normalize_decoder:  # unit rows in training units; folded: 1 / scale
        norms = sae.W_dec.norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, 1 / tr.scales_[""]))
    assert all(not st.workspace for st in tr.sites.values())  # scratch buffers are gone with the run


def test_fold_input_scale_reads_raw_activations():
    torch.manual_seed(0)
    sae = saes.build("topk", d_model=D, d_sae=M, k=5)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(10, D) * 7
    s = 0.3
    ref = sae(x * s)
    fold_input_scale(sae, s)
    out = sae(x)
    torch.testing.assert_close(out.codes, ref.codes)
    torch.testing.assert_close(out.x_hat, ref.x_hat / s)


def test_default_learning_rate_is_the_rule_times_the_architecture_factor():
    from saes.train_config import default_lr

    assert default_lr(16384) == pytest.approx(2e-4) and default_lr(4 * 16384) == pytest.approx(1e-4)
    topk = saes.build("topk", d_model=D, d_sae=M, k=4)
    for arch, kw, factor in (("topk", {"k": 4}, 4.0), ("batchtopk", {"k": 4}, 4.0), ("relu", {}, 4.0),
                             ("jumprelu", {}, 4.0), ("mpsae", {"n_steps": 4}, 4.0)):
        sae = saes.build(arch, d_model=D, d_sae=M, **kw)
        tr = Trainer(sae, cfg(lr=None, total_tokens=ROWS * 2)).fit(SyntheticSource(D, rows=ROWS))
        assert tr.sites[""].opt.param_groups[0]["initial_lr"] == pytest.approx(factor * default_lr(M)), arch
    assert cfg(lr=1e-3).lr_for(topk) == 1e-3  # a rate given wins


def test_input_scale_leaves_massive_activations_out():
    torch.manual_seed(0)
    x = torch.randn(1024, D) * 3
    plain = (D / x.pow(2).sum(-1).mean()).sqrt().item()
    assert input_scale(x) == pytest.approx(plain, rel=0.05)  # no outlier: about the plain estimate
    spiked = x.clone()
    spiked[7] *= 300  # one massive activation, as residual streams have: the plain mean moves ~9x
    assert (D / spiked.pow(2).sum(-1).mean()).sqrt().item() < plain / 5
    assert input_scale(spiked) == pytest.approx(input_scale(x), rel=0.01)
    mostly_zero = torch.zeros(10, D)
    mostly_zero[0] = 2.0
    assert input_scale(mostly_zero) == pytest.approx((D / (4 * D / 10)) ** 0.5)  # a zero median: every row counts


def test_trainer_scale_ignores_a_massive_row_in_the_first_batch():
    def source(spike: bool):
        g = torch.Generator().manual_seed(1)
        for i in range(4):
            x = torch.randn(ROWS, D, generator=g)
            if spike and i == 0:
                x[3] *= 500
            yield x

    scales = []
    for spike in (False, True):
        torch.manual_seed(0)
        sae = saes.build("topk", d_model=D, d_sae=M, k=4)
        scales.append(Trainer(sae, cfg(total_tokens=ROWS * 4)).fit(source(spike)).scales_[""])
    assert scales[1] == pytest.approx(scales[0], rel=0.01)  # a plain mean over the spiked batch: ~40x smaller


def test_geometric_median_hand_cases():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    # the median of these four points is the origin-corner side: far less pulled than the mean
    gm = geometric_median(x)
    assert gm.norm() < 1.0 < x.mean(0).norm()
    pts = torch.tensor([[0.0], [1.0], [2.0], [3.0], [1000.0]])
    torch.testing.assert_close(geometric_median(pts), torch.tensor([2.0]), atol=1e-3, rtol=0)


def test_typical_mean_leaves_massive_activations_out():
    torch.manual_seed(0)
    x = torch.randn(1024, D) + 2.0
    torch.testing.assert_close(typical_mean(x), x.mean(0))  # no massive row: the plain mean
    spiked = x.clone()
    spiked[7] *= 300
    torch.testing.assert_close(typical_mean(spiked), torch.cat([x[:7], x[8:]]).mean(0))
    assert (spiked.mean(0) - x.mean(0)).norm() > 50 * (typical_mean(spiked) - x.mean(0)).norm()
    mostly_zero = torch.zeros(10, D)
    mostly_zero[0] = 2.0
    torch.testing.assert_close(typical_mean(mostly_zero), mostly_zero.mean(0))  # a zero median: every row counts


@pytest.mark.parametrize("how", ["typical_mean", "geometric_median", "mean", "zeros"])
def test_b_dec_starts_from_the_first_batch_as_asked(how):
    g = torch.Generator().manual_seed(3)
    first = torch.randn(ROWS, D, generator=g) + 1.5
    first[5] *= 400  # a massive activation
    torch.manual_seed(0)
    sae = saes.build("topk", d_model=D, d_sae=M, k=4)
    tr = Trainer(sae, cfg(total_tokens=ROWS, lr=1e-9, b_dec_init=how)).fit([first])
    x = first * tr.scales_[""]  # the trainer's scale, folded back into b_dec at the end
    want = {"typical_mean": typical_mean(x), "geometric_median": geometric_median(x), "mean": x.mean(0),
            "zeros": torch.zeros(D)}[how] / tr.scales_[""]
    torch.testing.assert_close(sae.b_dec.detach(), want, atol=1e-5, rtol=1e-5)


def test_b_dec_init_default_and_refusal():
    assert TrainConfig(total_tokens=8, batch_tokens=8).b_dec_init == "typical_mean"
    with pytest.raises(saes.SAEError, match=r"TrainConfig.b_dec_init must be one of 'typical_mean', "
                                            r"'geometric_median', 'mean', 'zeros', got 'median'"):
        cfg(b_dec_init="median")


def test_dead_latents_are_tracked():
    torch.manual_seed(0)
    sae = saes.build("topk", d_model=D, d_sae=M, k=4)
    with torch.no_grad():
        sae.b_enc[:8] = -1e4  # these can never be active
    tr = Trainer(sae, cfg(total_tokens=ROWS * 20, dead_tokens=ROWS * 5, lr=1e-4)).fit(SyntheticSource(D, rows=ROWS))
    assert tr.history_[-1][""]["dead"] >= 8 / M
    assert tr.history_[-1][""]["auxk"] > 0


def test_several_sites_from_one_stream():
    torch.manual_seed(0)
    sites = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
    models = {s: saes.build("topk", d_model=D, d_sae=M, k=4) for s in sites}
    tr = Trainer(models, cfg(total_tokens=ROWS * 10)).fit(SyntheticSource(D, rows=ROWS, sites=sites))
    assert set(tr.saes_) == set(sites)
    assert tr.scales_[sites[0]] == pytest.approx(2 * tr.scales_[sites[1]], rel=1e-5)


def test_wrong_sites_and_bad_config_fail_clearly():
    sae = saes.build("topk", d_model=D, d_sae=M, k=4)
    with pytest.raises(saes.SAEError, match="blocks.9"):
        Trainer({"blocks.9.hook_resid_post": sae, "x": saes.build("topk", d_model=D, d_sae=M, k=4)},
                cfg()).fit(SyntheticSource(D, sites=("a", "b")))
    with pytest.raises(saes.SAEError, match="warmup_frac"):
        TrainConfig(total_tokens=10, warmup_frac=1.5)
    with pytest.raises(saes.SAEError, match="dead_tokens must be a positive integer, got 0; to never count"):
        TrainConfig(total_tokens=10, dead_tokens=0)  # would count every latent dead at every step


def test_bf16_autocast_trains_like_fp32():
    fvu = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        sae = saes.build("topk", d_model=D, d_sae=M, k=6)
        tr = Trainer(sae, cfg(bf16=bf16, total_tokens=ROWS * 20)).fit(SyntheticSource(D, rows=ROWS))
        assert sae.W_dec.dtype == torch.float32
        fvu[bf16] = tr.history_[-1][""]["fvu"]
    assert abs(fvu[True] - fvu[False]) < 0.05, fvu


class Crash(RuntimeError):
    pass


class CrashingSource(SyntheticSource):
    """Dies (like a killed process) when asked for batch ``crash_at``."""

    def __init__(self, *a, crash_at: int, **kw):
        super().__init__(*a, **kw)
        self.crash_at = crash_at

    def __iter__(self):
        for b in super().__iter__():
            if self.position - 1 == self.crash_at:
                raise Crash
            yield b


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_resume_reaches_the_uninterrupted_weights(arch, tmp_path):
    kw = {"k": 6} if "topk" in arch else {}
    c = cfg(total_tokens=ROWS * 24, checkpoint_every=5, dead_tokens=ROWS * 3)

    torch.manual_seed(0)
    ref = saes.build(arch, d_model=D, d_sae=M, **kw)
    Trainer(ref, c, out_dir=tmp_path / "ref").fit(SyntheticSource(D, rows=ROWS))

    torch.manual_seed(0)
    a = saes.build(arch, d_model=D, d_sae=M, **kw)
    with pytest.raises(Crash):  # dies at step 17: the last checkpoint is step 15
        Trainer(a, c, out_dir=tmp_path / "run").fit(CrashingSource(D, rows=ROWS, crash_at=17))
    torch.manual_seed(123)  # a fresh process: different init, different RNG
    b = saes.build(arch, d_model=D, d_sae=M, **kw)
    tr = Trainer(b, c, out_dir=tmp_path / "run").fit(SyntheticSource(D, rows=ROWS), resume=True)
    assert tr.steps_ == 24
    for (name, p), q in zip(ref.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_with_a_plain_iterable_replays_to_the_position(tmp_path):
    c = cfg(total_tokens=ROWS * 12, checkpoint_every=4)

    def stream(stop=None):
        src = SyntheticSource(D, rows=ROWS)
        for i in range(10_000):
            if i == stop:
                raise Crash
            yield src.batch(i)

    torch.manual_seed(0)
    ref = saes.build("topk", d_model=D, d_sae=M, k=6)
    Trainer(ref, c).fit(stream())
    torch.manual_seed(0)
    a = saes.build("topk", d_model=D, d_sae=M, k=6)
    with pytest.raises(Crash):
        Trainer(a, c, out_dir=tmp_path).fit(stream(stop=10))
    b = saes.build("topk", d_model=D, d_sae=M, k=6)
    Trainer(b, c, out_dir=tmp_path).fit(stream(), resume=True)
    for p, q in zip(ref.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_checkpoint_folder_is_complete_and_bounded(tmp_path):
    sae = saes.build("topk", d_model=D, d_sae=M, k=6)
    Trainer(sae, cfg(total_tokens=ROWS * 12, checkpoint_every=3, keep_checkpoints=2),
            out_dir=tmp_path).fit(SyntheticSource(D, rows=ROWS))
    steps = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert steps == ["step_000000009", "step_000000012"]
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))
    from saes.checkpoint import load

    back = load(tmp_path / "sae")
    torch.testing.assert_close(back.W_dec, sae.W_dec)


SITE = "blocks.3.hook_resid_post"
# several SAEs of one site: two TopK sizes and two MP-SAEs that draw random numbers while they train
# (atom dropout every step, data rows picked at random for their first atoms): each must draw what it
# would draw alone, whatever the others draw before it
VARIANTS = {"k4": ("topk", dict(d_sae=M, k=4)), "k8_wide": ("topk", dict(d_sae=2 * M, k=8)),
            "mp/drop": ("mpsae", dict(d_sae=M, n_steps=3, atom_dropout=0.3, atom_dropout_steps=30,
                                      atom_init="data", resample_every=4)),
            "mp_wide": ("mpsae", dict(d_sae=2 * M, n_steps=2, atom_dropout=0.5, atom_dropout_steps=30,
                                      atom_init="data"))}


def _variant(name: str) -> saes.SAE:
    torch.manual_seed(len(name))  # each its own initialisation, the same whenever it is built
    arch, kw = VARIANTS[name]
    return saes.build(arch, d_model=D, **kw)


def test_several_saes_from_one_stream_equal_each_trained_alone(tmp_path):
    c = cfg(total_tokens=ROWS * 24, dead_tokens=ROWS * 3, log_every=6)
    together = {name: _variant(name) for name in VARIANTS}
    tr = Trainer(together, c, sites=SITE, out_dir=tmp_path / "together").fit(
        SyntheticSource(D, rows=ROWS, sites=(SITE,)))
    assert tr.steps_ == 24 and set(tr.saes_) == set(VARIANTS)
    for name in VARIANTS:
        alone = _variant(name)
        ta = Trainer(alone, c).fit(SyntheticSource(D, rows=ROWS))
        for (key, p), q in zip(alone.state_dict().items(), together[name].state_dict().values()):
            assert torch.equal(p, q), (name, key)
        assert ta.scales_[""] == tr.scales_[name]
        assert [e[""] for e in ta.history_] == [e[name] for e in tr.history_]
    from saes.checkpoint import read

    for name, folder in (("k4", "k4"), ("k8_wide", "k8_wide"), ("mp/drop", "mp_drop")):
        ck = read(tmp_path / "together" / folder)
        assert ck.metadata["hook_name"] == SITE and ck.sae.cfg.d_sae == VARIANTS[name][1]["d_sae"]


def test_several_saes_of_one_site_resume_exactly(tmp_path):
    c = cfg(total_tokens=ROWS * 24, checkpoint_every=5, dead_tokens=ROWS * 3)
    ref = {name: _variant(name) for name in VARIANTS}
    Trainer(ref, c, sites=SITE, out_dir=tmp_path / "ref").fit(SyntheticSource(D, rows=ROWS, sites=(SITE,)))
    with pytest.raises(Crash):  # dies at step 17: the last checkpoint is step 15
        Trainer({name: _variant(name) for name in VARIANTS}, c, sites=SITE, out_dir=tmp_path / "run").fit(
            CrashingSource(D, rows=ROWS, sites=(SITE,), crash_at=17))
    torch.manual_seed(123)  # a fresh process: other weights, another global RNG state
    back = {name: saes.build(arch, d_model=D, **kw) for name, (arch, kw) in VARIANTS.items()}
    Trainer(back, c, sites=SITE, out_dir=tmp_path / "run").fit(SyntheticSource(D, rows=ROWS, sites=(SITE,)),
                                                               resume=True)
    for name in VARIANTS:
        for (key, p), q in zip(ref[name].state_dict().items(), back[name].state_dict().values()):
            assert torch.equal(p, q), (name, key)
    with pytest.raises(saes.SAEError, match=r"sites\.k4\.site"):  # another site for the same names: refused
        Trainer({name: _variant(name) for name in VARIANTS}, c, sites="blocks.4.hook_resid_post",
                out_dir=tmp_path / "run").fit(SyntheticSource(D, rows=ROWS), resume=True)


def test_names_and_sites_of_several_saes_are_checked():
    a, b = (saes.build("topk", d_model=D, d_sae=M, k=4) for _ in range(2))
    with pytest.raises(saes.SAEError, match=r"same folder 'x_y'"):
        Trainer({"x/y": a, "x_y": b}, cfg())
    with pytest.raises(saes.SAEError, match=r"no site for \['b'\].*no SAE \['c'\]"):
        Trainer({"a": a, "b": b}, cfg(), sites={"a": SITE, "c": SITE})
    with pytest.raises(saes.SAEError, match="yields one tensor per batch, but the SAEs read 2 sites"):
        Trainer({"a": a, "b": b}, cfg(), sites={"a": SITE, "b": "blocks.4.hook_resid_post"}).fit(
            SyntheticSource(D, rows=ROWS))


def test_threshold_lr_factor_moves_jumprelu_thresholds_faster():
    """Adam's first step moves each parameter by about its learning rate: the thresholds by the factor times the
    SAE's, every other parameter by the SAE's (the same step with factor 1 moves the rest identically)."""
    moved = {}
    for factor in (1.0, 20.0):
        torch.manual_seed(0)
        sae = saes.build("jumprelu", d_model=D, d_sae=M, threshold_lr_factor=factor, init_threshold=0.5,
                         bandwidth=1.0)
        before = {n: p.detach().clone() for n, p in sae.named_parameters()}
        tr = Trainer(sae, cfg(total_tokens=ROWS, warmup_frac=0.0, decay_frac=0.0))
        tr.fit(SyntheticSource(D, rows=ROWS))
        groups = tr.sites[""].opt.param_groups
        assert [g["lr"] for g in groups] == ([3e-3] if factor == 1 else [3e-3, 3e-3 * factor])
        moved[factor] = {n: (p.detach() - before[n]).abs() for n, p in sae.named_parameters()}
    step = moved[20.0]["threshold"][moved[1.0]["threshold"] > 0]
    assert step.numel() > M // 2
    torch.testing.assert_close(step, torch.full_like(step, 20 * 3e-3), rtol=1e-3, atol=0)
    for name in ("W_enc", "b_enc", "b_dec"):
        torch.testing.assert_close(moved[20.0][name], moved[1.0][name], msg=name)


def test_jumprelu_default_rates():
    """JumpReLU trains at 4 times the base rule and its thresholds at 30 times it (7.5 x the SAE's rate), the
    absolute threshold rate chosen before the SAE's own rate rose from 1 to 4 times the rule."""
    from saes.train_config import default_lr

    sae = saes.build("jumprelu", d_model=D, d_sae=M)
    c = cfg(lr=None, total_tokens=ROWS)
    assert c.lr_for(sae) == pytest.approx(4 * default_lr(M))
    groups = Trainer(sae, c).fit(SyntheticSource(D, rows=ROWS)).sites[""].opt.param_groups
    assert sorted(g["lr"] for g in groups) == pytest.approx([4 * default_lr(M), 30 * default_lr(M)])


def test_lr_factors_must_name_parameters():
    sae = saes.build("jumprelu", d_model=D, d_sae=M)
    with pytest.raises(ValueError, match="'thresholds'.*does not have"):
        saes.optim.param_groups(sae, 1e-3, {"thresholds": 2.0})


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_dense_codes_are_warned_about_at_the_end_of_training(arch, recwarn):
    """No penalty: a ReLU SAE ends with about half its latents active, above d_model / 2, and is warned about with
    what to change; a TopK SAE with k below d_model / 2 is not."""
    torch.manual_seed(0)
    sae = saes.build(arch, d_model=D, d_sae=M, **({"k": 4} if arch == "topk" else {"l1_coeff": 0.0}))
    tr = Trainer(sae, cfg(total_tokens=ROWS * 10)).fit(SyntheticSource(D, rows=ROWS))
    dense = [w for w in recwarn if issubclass(w.category, saes.DenseCodesWarning)]
    l0 = tr.history_[-1][""]["l0"]
    if arch == "relu":
        assert l0 > D / 2
        assert len(dense) == 1 and "raise l1_coeff" in str(dense[0].message) and f"L0 {l0:.0f}" in str(dense[0].message)
        assert dense[0].filename == __file__  # the caller's line, not the library's
    else:
        assert l0 == 4 and not dense


def test_a_diverging_run_stops_with_one_line_and_writes_no_checkpoint(tmp_path):
    """Every loss and gradient stays finite while FVU climbs from 0.47 to 2e9 at lr 100: the run used to finish
    and export that SAE as trained."""
    from saes.trainer import TrainingDiverged

    torch.manual_seed(0)
    sae = saes.build("topk", d_model=D, d_sae=M, k=4)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+ of 12: .*FVU .* over 10 x") as e:
        Trainer(sae, cfg(lr=100.0, total_tokens=ROWS * 12, log_every=1, checkpoint_every=4),
                out_dir=tmp_path / "run").fit(SyntheticSource(D, rows=ROWS))
    assert "\n" not in str(e.value) and "lower lr (now 100.0)" in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_checkpoint_with_overflowed_adam_moments_is_refused(tmp_path):
    from saes.trainer import TrainingDiverged

    torch.manual_seed(0)
    tr = Trainer(saes.build("topk", d_model=D, d_sae=M, k=4), cfg(total_tokens=ROWS * 8, log_every=100,
                                                                   checkpoint_every=4), out_dir=tmp_path / "run")
    real = tr._check_state_finite

    def poisoned(step):  # squared gradients that overflowed, as at lr 1e6 with finite losses
        for st in tr.sites.values():
            next(iter(st.opt.state.values()))["exp_avg_sq"][(0,) * 2] = float("inf")
        real(step)

    tr._check_state_finite = poisoned
    with pytest.raises(TrainingDiverged, match="holds NaN or inf in its Adam moments, so no checkpoint was written"):
        tr.fit(SyntheticSource(D, rows=ROWS))


def test_relu_and_jumprelu_starting_far_above_zero_fvu_are_not_called_diverged():
    """A ReLU SAE's first FVU can be several times that of outputting zeros (15.7 against 2.05 at 9,216 latents on
    the embedded model): the check compares with the run's own first FVU too."""
    torch.manual_seed(0)
    for arch in ("relu", "jumprelu"):
        sae = saes.build(arch, d_model=D, d_sae=16 * M)
        tr = Trainer(sae, cfg(total_tokens=ROWS * 6, log_every=1)).fit(SyntheticSource(D, rows=ROWS))
        assert tr.steps_ == 6


def test_huge_finite_inputs_are_named_not_blamed_on_the_learning_rate():
    from saes.guard import NonFiniteError

    class Big(SyntheticSource):
        def batch(self, i):
            b = super().batch(i)
            if i == 2:
                b[7, 0] = 1e20  # finite, but its square overflows float32
            return b

    torch.manual_seed(0)
    with pytest.raises(NonFiniteError, match=r"rows \[7\] of this batch .* values so large that their squares "
                                             r"overflow") as e:
        Trainer(saes.build("topk", d_model=D, d_sae=M, k=4), cfg()).fit(Big(D, rows=ROWS))
    assert "bf16" not in str(e.value)


@pytest.mark.parametrize("offset", [0.0, 30.0, 100.0])
def test_total_variance_is_exact_when_rows_share_a_large_offset(offset):
    """The one-pass sum x^2 - |sum x|^2 / n cancelled in float32: 2 % off at an offset 100 x the spread, and a
    near-constant batch gave 1e-12 for 0.016 (an FVU 1e10 too large, finite, so no guard saw it)."""
    from saes.losses import TrainState, total_variance

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4096, 64, generator=g)
    x = noise + offset * noise.norm(dim=1).mean() * torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    ref = float(((x.double() - x.double().mean(0)) ** 2).sum())
    assert float(total_variance(x, TrainState(global_rows=4096))) == pytest.approx(ref, rel=1e-5)
    flat = 3.0 + 1e-3 * torch.randn(256, 64, generator=g)
    ref = float(((flat.double() - flat.double().mean(0)) ** 2).sum())
    assert float(total_variance(flat, TrainState(global_rows=256))) == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_a_bare_train_state_counts_the_batchs_rows(arch):
    """TrainState() counted one row: an FVU of 5e15, and L1 / L0 terms summed over the batch, not averaged."""
    from saes.losses import TrainState

    torch.manual_seed(0)
    sae = saes.build(arch, d_model=32, d_sae=64, **({"k": 4} if arch == "topk" else {}))
    x = torch.randn(256, 32)
    bare = sae.training_loss(x, TrainState()).terms
    given = sae.training_loss(x, TrainState(global_rows=256)).terms
    assert {k: float(v) for k, v in bare.items()} == pytest.approx({k: float(v) for k, v in given.items()})
    assert float(given["fvu"]) < 100
