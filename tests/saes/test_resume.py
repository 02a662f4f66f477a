"""Resume checkpoints: ordered by step, never mixed with another run's, compared with the new run's
settings, and carrying the whole history."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from sae_testdata import SyntheticSource

import saes
from saes import resume
from saes.trainer import TrainConfig, Trainer

D, M, ROWS = 16, 64, 64


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(total_tokens=ROWS * 12, batch_tokens=ROWS, lr=3e-3, progress=False, log_every=2,
                                 checkpoint_every=3), **kw})


def sae(**kw) -> saes.SAE:
    torch.manual_seed(0)
    return saes.build("topk", d_model=D, d_sae=M, k=4, **kw)


class Crash(RuntimeError):
    pass


class Dies(SyntheticSource):
    """Raises when asked for batch `at` (0-based), as a killed run would stop there."""

    def __init__(self, *a, at: int, **kw):
        super().__init__(*a, **kw)
        self.at = at

    def __iter__(self):
        for b in super().__iter__():
            if self.position - 1 == self.at:
                raise Crash
            yield b


def test_pruning_goes_by_step_and_never_removes_the_checkpoint_just_written(tmp_path):
    t = {"w": torch.zeros(2)}
    for step in (100, 110, 5):
        resume.write(tmp_path, step, t, {"step": step}, keep=2)
    assert resume.found(tmp_path) == [5]  # the later steps were another attempt's: they go, 5 stays
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 5
    for step in (6, 7, 8):
        resume.write(tmp_path, step, t, {"step": step}, keep=2)
    assert resume.found(tmp_path) == [7, 8] and resume.read_latest(tmp_path)[1]["step"] == 8
    for step in (9, 10):
        resume.write(tmp_path, step, t, {"step": step}, keep=0)  # 0 keeps every one
    assert resume.found(tmp_path) == [7, 8, 9, 10]


def test_a_missing_latest_json_falls_back_to_the_newest_step_that_loads(tmp_path):
    t = {"w": torch.zeros(2)}
    for step in (3, 6):
        resume.write(tmp_path, step, t, {"step": step}, keep=3)
    (tmp_path / "latest.json").unlink()
    with pytest.warns(UserWarning, match=r"latest.json is missing; resuming from the newest step folder that loads, "
                                         r".*step_000000006"):
        assert resume.read_latest(tmp_path)[1]["step"] == 6
    (tmp_path / "step_000000006" / "state.json").write_text("{broken")
    (tmp_path / "latest.json").write_text(json.dumps({"step": 6, "dir": "step_000000006"}))
    with pytest.warns(UserWarning, match=r"names a checkpoint that does not load .*step_000000003"):
        assert resume.read_latest(tmp_path)[1]["step"] == 3
    (tmp_path / "latest.json").write_text(json.dumps({"step": 6, "dir": "../../etc"}))
    with pytest.warns(UserWarning, match=r"'dir' is '../../etc', not a step folder name"):
        assert resume.read_latest(tmp_path)[1]["step"] == 3
    (tmp_path / "step_000000003" / "state.safetensors").write_bytes(b"junk")
    with pytest.raises(saes.SAEError, match=r"no resume checkpoint under .* loads"):
        resume.read_latest(tmp_path)


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints_unless_overwritten(tmp_path):
    Trainer(sae(), cfg(), out_dir=tmp_path).fit(SyntheticSource(D, rows=ROWS))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(saes.SAEError, match=r"holds resume checkpoints of an earlier run \(steps \[9, 12\]\)"):
        Trainer(sae(), cfg(total_tokens=ROWS * 4), out_dir=tmp_path).fit(SyntheticSource(D, rows=ROWS))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    Trainer(sae(), cfg(total_tokens=ROWS * 4), out_dir=tmp_path).fit(SyntheticSource(D, rows=ROWS), overwrite=True)
    assert resume.found(tmp_path / "checkpoints") == [3, 4]


def test_resume_without_checkpoints_says_so(tmp_path):
    with pytest.warns(UserWarning, match="no resume checkpoint under .*: starting from step 0"):
        tr = Trainer(sae(), cfg(), out_dir=tmp_path).fit(SyntheticSource(D, rows=ROWS), resume=True)
    assert tr.steps_ == 12


def test_resume_keeps_the_whole_history_and_refuses_changed_settings(tmp_path):
    ref = Trainer(sae(), cfg(), out_dir=tmp_path / "ref").fit(SyntheticSource(D, rows=ROWS))
    with pytest.raises(Crash):
        Trainer(sae(), cfg(), out_dir=tmp_path / "run").fit(Dies(D, rows=ROWS, at=7))
    for changed, diff in ((dict(lr=1e-3), "config.lr 0.003 -> 0.001"),
                          (dict(batch_tokens=32, total_tokens=ROWS * 12), "config.batch_tokens 64 -> 32"),
                          (dict(seed=1), "config.seed 0 -> 1"),
                          (dict(total_tokens=ROWS * 20), "config.total_tokens 768 -> 1280")):
        with pytest.raises(saes.SAEError, match=rf"the resume checkpoint \(step 6\) was made with other settings: "
                                                rf"{diff}; resume with the same settings"):
            Trainer(sae(), cfg(**changed), out_dir=tmp_path / "run").fit(SyntheticSource(D, rows=ROWS), resume=True)
    other = saes.build("topk", d_model=D, d_sae=M * 2, k=4)
    with pytest.raises(saes.SAEError, match=r"sites..d_sae 64 -> 128.*cannot be accepted: the weights differ in shape"):
        Trainer(other, cfg(), out_dir=tmp_path / "run").fit(SyntheticSource(D, rows=ROWS), resume=True,
                                                            accept_changes=True)
    # what does not change the result may change freely (the initial weights are replaced by the checkpoint's)
    tr = Trainer(sae(enc_init_scale=0.123),
                 cfg(log_every=2, checkpoint_every=5, keep_checkpoints=4, nonfinite_guard="grads", b_dec_init="zeros"),
                 out_dir=tmp_path / "run").fit(SyntheticSource(D, rows=ROWS), resume=True)
    assert tr.history_ == ref.history_  # whole: the entries before the resume point are kept
    assert json.loads((tmp_path / "run" / "train_history.json").read_text()) == ref.history_
    for p, q in zip(ref.saes_[""].state_dict().values(), tr.saes_[""].state_dict().values()):
        assert torch.equal(p, q)


def test_a_checkpoint_from_before_the_encoder_init_scale_compares_equal():
    config = {"lr": 1e-3, "seed": 0}
    now = {"": {"architecture": "topk", **sae().cfg.to_dict()}}
    before = {"": {k: v for k, v in now[""].items() if k != "enc_init_scale"}}
    assert "enc_init_scale" in now[""]
    assert resume.settings(config, before, {}) == resume.settings(config, now, {})
    meta = {"step": 3, "sites": {"": {"architecture": "topk", "sae_cfg": before[""]}}, "config": config}
    assert resume.check_settings(meta, resume.settings(config, now, {}), accept_changes=False) == {}


def test_accepted_changes_are_recorded_and_tokens_stay_counted(tmp_path):
    with pytest.raises(Crash):
        Trainer(sae(), cfg(), out_dir=tmp_path).fit(Dies(D, rows=ROWS, at=7))  # checkpoint at step 6
    # another batch size is never accepted: steps (and the schedule) count batches of the first run's size, and
    # a resume at half the batch trained 25 % past total_tokens
    with pytest.raises(saes.SAEError, match="batch_tokens"):
        Trainer(sae(), cfg(batch_tokens=ROWS // 2), out_dir=tmp_path).fit(SyntheticSource(D, rows=ROWS // 2),
                                                                          resume=True, accept_changes=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr = Trainer(sae(), cfg(lr=1e-3), out_dir=tmp_path).fit(SyntheticSource(D, rows=ROWS), resume=True,
                                                                accept_changes=True)
    event = next(h for h in tr.history_ if h.get("event") == "resume")
    assert event == {"step": 6, "tokens": 6 * ROWS, "event": "resume", "changes": {"config.lr": [3e-3, 1e-3]}}
    assert tr.tokens_ == tr.cfg.total_tokens == tr.steps_ * ROWS  # every row consumed is counted, none past
    assert tr.history_[-1]["tokens"] == tr.tokens_ and tr.history_[0]["step"] == 2
    saved = json.loads((tmp_path / "sae" / "cfg.json").read_text())["interp"]["training"]
    assert saved["n_tokens"] == tr.tokens_ and saved["final_metrics"]["fvu"] > 0


def jumprelu(threshold_lr_factor: float) -> saes.SAE:
    torch.manual_seed(0)
    return saes.build("jumprelu", d_model=D, d_sae=M, threshold_lr_factor=threshold_lr_factor)


def test_an_accepted_learning_rate_change_is_the_rate_the_run_steps_at(tmp_path):
    """A resume that accepts a new ``lr`` and a new learning-rate factor steps at the new rates, not the
    checkpoint's (which it recorded as changed)."""
    flat = dict(warmup_frac=0.0, decay_frac=0.0)
    with pytest.raises(Crash):
        Trainer(jumprelu(10.0), cfg(**flat), out_dir=tmp_path).fit(Dies(D, rows=ROWS, at=7))  # checkpoint at step 6
    tr = Trainer(jumprelu(20.0), cfg(lr=1e-3, **flat), out_dir=tmp_path).fit(SyntheticSource(D, rows=ROWS),
                                                                              resume=True, accept_changes=True)
    st = tr.sites[""]
    assert [g["lr"] for g in st.opt.param_groups] == pytest.approx([1e-3, 2e-2], rel=1e-12)
    assert st.sched.base_lrs == pytest.approx([1e-3, 2e-2], rel=1e-12)
    assert next(h for h in tr.history_ if h.get("event") == "resume")["changes"] == {
        "config.lr": [3e-3, 1e-3], "sites..threshold_lr_factor": [10.0, 20.0]}


def test_a_default_learning_rate_changed_since_the_checkpoint_is_a_difference(tmp_path, monkeypatch):
    """Same settings (``lr=None``) but the architecture's default rate changed between the runs: refused as a
    change with both rates named, and with ``accept_changes`` the run steps at the new rate and records it."""
    from saes.batchtopk import BatchTopKSAE
    from saes.train_config import default_lr

    def batchtopk():
        torch.manual_seed(0)
        return saes.build("batchtopk", d_model=D, d_sae=M, k=4)

    flat = dict(lr=None, warmup_frac=0.0, decay_frac=0.0)
    monkeypatch.setattr(BatchTopKSAE, "default_lr_factor", 1.0)
    with pytest.raises(Crash):
        Trainer(batchtopk(), cfg(**flat), out_dir=tmp_path).fit(Dies(D, rows=ROWS, at=7))
    monkeypatch.setattr(BatchTopKSAE, "default_lr_factor", 4.0)
    b = batchtopk()
    with pytest.raises(saes.SAEError, match=r"sites\.\.default_lr [\d.e-]+ -> [\d.e-]+; resume with the same"):
        Trainer(b, cfg(**flat), out_dir=tmp_path).fit(SyntheticSource(D, rows=ROWS), resume=True)
    tr = Trainer(batchtopk(), cfg(**flat), out_dir=tmp_path).fit(SyntheticSource(D, rows=ROWS), resume=True,
                                                                 accept_changes=True)
    assert [g["lr"] for g in tr.sites[""].opt.param_groups] == pytest.approx([4 * default_lr(M)], rel=1e-12)
    changes = next(h for h in tr.history_ if h.get("event") == "resume")["changes"]
    assert changes == {"sites..default_lr": [pytest.approx(default_lr(M)), pytest.approx(4 * default_lr(M))]}


def test_a_default_rate_change_is_recorded_beside_an_accepted_factor_change(tmp_path, monkeypatch):
    """A factor change accepted on resume does not hide that the SAE's default rate changed as well."""
    from saes.jumprelu import JumpReluSAE
    from saes.train_config import default_lr

    flat = dict(lr=None, warmup_frac=0.0, decay_frac=0.0)
    monkeypatch.setattr(JumpReluSAE, "default_lr_factor", 1.0)
    with pytest.raises(Crash):
        Trainer(jumprelu(10.0), cfg(**flat), out_dir=tmp_path).fit(Dies(D, rows=ROWS, at=7))
    monkeypatch.setattr(JumpReluSAE, "default_lr_factor", 4.0)
    tr = Trainer(jumprelu(20.0), cfg(**flat), out_dir=tmp_path).fit(SyntheticSource(D, rows=ROWS), resume=True,
                                                                    accept_changes=True)
    assert [g["lr"] for g in tr.sites[""].opt.param_groups] == pytest.approx([4 * default_lr(M), 80 * default_lr(M)])
    changes = next(h for h in tr.history_ if h.get("event") == "resume")["changes"]
    assert changes == {"sites..threshold_lr_factor": [10.0, 20.0],
                       "sites..default_lr": [pytest.approx(default_lr(M)), pytest.approx(4 * default_lr(M))]}


def test_an_unchanged_rate_is_no_difference(tmp_path):
    with pytest.raises(Crash):
        Trainer(sae(), cfg(lr=None), out_dir=tmp_path).fit(Dies(D, rows=ROWS, at=7))
    tr = Trainer(sae(), cfg(lr=None), out_dir=tmp_path).fit(SyntheticSource(D, rows=ROWS), resume=True)
    assert not [h for h in tr.history_ if h.get("event") == "resume"]


def test_keep_learning_rates_puts_the_base_rates_at_the_schedules_position():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([{"params": [p]}, {"params": [q], "lr": 9.0}], lr=7.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
    for _ in range(3):
        opt.step()
        sched.step()
    resume.keep_learning_rates(opt, sched, [1.0, 2.0])
    assert [g["lr"] for g in opt.param_groups] == [0.125, 0.25] == sched.get_last_lr()
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0625, 0.125]


def test_a_learning_rate_factor_changed_to_or_from_1_is_refused_before_anything_loads(tmp_path):
    """Factor 1 keeps the thresholds in the SAE's parameter group: the optimizers' groups differ, which no
    accepted change can bridge; the SAE is left as it was."""
    with pytest.raises(Crash):
        Trainer(jumprelu(1.0), cfg(), out_dir=tmp_path).fit(Dies(D, rows=ROWS, at=7))
    b = jumprelu(30.0)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(saes.SAEError, match=r"groups of \[5\], this run's in \[4, 1\].*threshold_lr_factor"):
        Trainer(b, cfg(), out_dir=tmp_path).fit(SyntheticSource(D, rows=ROWS), resume=True, accept_changes=True)
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_full_disk_while_writing_a_checkpoint_names_it_and_keeps_the_last_one(tmp_path, monkeypatch):
    import errno

    resume.write(tmp_path, 4, {"w": torch.zeros(3)}, {"step": 4})

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resume, "save_file", full)
    with pytest.raises(OSError, match=r"writing the resume checkpoint .*step_0+8 failed: No space left on device"):
        resume.write(tmp_path, 8, {"w": torch.ones(3)}, {"step": 8})
    assert resume.found(tmp_path) == [4] and json.loads((tmp_path / resume.LATEST).read_text())["step"] == 4
