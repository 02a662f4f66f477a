"""The TopK step off the CPU reads nothing back to the host: counted with :class:`saes.hostsync.SyncOps` on the
GPU's paths (taken on the CPU here), checked against the CPU's paths, and the deferred non-finite guard stops
where a check every step stops, with the same weights."""

from __future__ import annotations

import contextlib
import json
import math
from unittest import mock

import pytest
import torch
from sae_testdata import SyntheticSource

import saes
from saes import guard, hostsync, kernels, native
from saes.guard import NonFiniteError
from saes.kernels import gather_pre
from saes.losses import TrainState, auxk_loss, normalize_rows
from saes.trainer import TrainConfig, Trainer

D, M, ROWS = 16, 128, 64


class Poisoned(SyntheticSource):
    """SyntheticSource whose batch ``at`` holds NaN in the given rows; ``seen`` keeps the SAE's weights and its
    optimizer's step count as they were when batch ``at`` was asked for (after every earlier step)."""

    def __init__(self, *a, at: int, bad: tuple[int, ...], sae=None, trainer=None, **kw):
        super().__init__(*a, **kw)
        self.at, self.bad, self.sae, self.trainer, self.seen = at, bad, sae, trainer, None

    def batch(self, i: int):
        x = super().batch(i)
        if i == self.at:
            self.seen = {k: v.clone() for k, v in self.sae.state_dict().items()}
            x = x.clone()
            x[list(self.bad), 2] = float("nan")
        return x


@contextlib.contextmanager
def gpu_paths():
    """The GPU's choices on the CPU: the sync-free paths, ``embedding_bag`` for decoding, torch's top-k and the
    CSR products for the sparse backward (as where the compiled kernels do not apply)."""
    with hostsync.force_sync_free(), mock.patch.object(kernels, "bag_sum_applies", lambda *a: False), \
            mock.patch.object(kernels, "two_level_applies", lambda *a: False), \
            mock.patch.object(native, "topk_applies", lambda *a: False), \
            mock.patch.object(native, "sparse_applies", lambda *a: False):
        yield


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(total_tokens=ROWS * 12, batch_tokens=ROWS, lr=3e-3, progress=False, log_every=100,
                                 dead_tokens=ROWS * 3), **kw})


def counted_steps(sae, c, data):
    counts = []
    step = Trainer._step

    def counting(self, *a, **kw):
        with hostsync.SyncOps() as ops:
            out = step(self, *a, **kw)
        counts.append(ops.total)
        return out

    with mock.patch.object(Trainer, "_step", counting):
        Trainer(sae, c).fit(data)
    return counts


def test_sync_ops_are_counted():
    x = torch.arange(6.0)
    with hostsync.SyncOps() as ops:
        x.sum().item()
        bool(x.any())
        x.nonzero()
        x[x > 2]
        y = x.clone()
        y[x > 2] = 0
        torch.bincount(x.long())
        x[torch.tensor([1, 2])]  # integer indices: nothing read back
        x.masked_fill(x > 2, 0)
        x.topk(2)
    assert ops.counts == {"_local_scalar_dense": 2, "nonzero": 1, "index": 1, "index_put_": 1, "bincount": 1}


def test_the_topk_step_reads_nothing_back_on_the_gpu_paths():
    torch.manual_seed(0)
    sae = saes.build("topk", d_model=D, d_sae=M, k=4)
    with gpu_paths():
        counts = counted_steps(sae, cfg(), SyntheticSource(D, rows=ROWS))
    assert counts == [0] * 12  # dead latents from step 4 on: AuxK ran too
    torch.manual_seed(0)
    sae = saes.build("topk", d_model=D, d_sae=M, k=4)
    cpu = counted_steps(sae, cfg(), SyntheticSource(D, rows=ROWS))
    assert min(cpu) >= 1 and max(cpu) > min(cpu)  # the guard's read each step, the dead latents' once some may be


def test_gpu_paths_train_the_same_sae_as_the_cpu_paths():
    torch.manual_seed(0)
    a = saes.build("topk", d_model=D, d_sae=M, k=4)
    b = saes.build("topk", d_model=D, d_sae=M, k=4)
    b.load_state_dict(a.state_dict())
    ta = Trainer(a, cfg(log_every=4)).fit(SyntheticSource(D, rows=ROWS))
    with gpu_paths():
        tb = Trainer(b, cfg(log_every=4)).fit(SyntheticSource(D, rows=ROWS))
    assert [h[""]["auxk"] > 0 for h in ta.history_] == [True] * 3  # dead latents from step 4 on: AuxK compared too
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    for ha, hb in zip(ta.history_, tb.history_):
        for key in ("loss", "fvu", "auxk", "l0", "dead"):
            assert hb[""][key] == pytest.approx(ha[""][key], rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize("n_dead", [0, 3, 40, M])
def test_masked_auxk_equals_the_exact_one(n_dead):
    torch.manual_seed(1)
    sae = saes.build("topk", d_model=D, d_sae=M, k=4)
    x = torch.randn(32, D)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[torch.randperm(M)[:n_dead]] = True
    state = TrainState(dead_mask=dead, global_rows=32)
    results = []
    for force in (False, True):
        sae.zero_grad()
        with hostsync.force_sync_free() if force else contextlib.nullcontext():
            pre = sae.encode_pre(x).detach()
            x_hat = x * 0.5

            def gather(i, pre=pre):
                return gather_pre(pre, i, x - sae.b_dec.detach(), sae.W_enc, sae.b_enc, sae.b_dec)

            loss = auxk_loss(x, x_hat, pre, gather, sae.W_dec, state, k_aux=8)
            if loss.requires_grad:
                loss.backward()
        results.append((loss.detach(), [None if p.grad is None else p.grad.clone() for p in sae.parameters()]))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-7)
    assert (float(la) > 0) == (n_dead > 0)
    for p, q in zip(ga, gb):
        if p is None:  # no dead latent: the exact loss is a constant
            assert q is None or not q.any()
        else:
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_sparse_counts_without_bincount_are_the_same():
    idx = torch.randint(0, 50, (20, 4))
    g = torch.randn(20, 4)
    a = kernels._sparse_t(idx, g, 50)
    with hostsync.force_sync_free():
        b = kernels._sparse_t(idx, g, 50)
    assert torch.equal(a.crow_indices(), b.crow_indices()) and torch.equal(a.col_indices(), b.col_indices())
    assert torch.equal(a.values(), b.values())


def test_normalize_rows_keeps_rows_where_flagged():
    w = torch.randn(8, 5)
    ref = w.clone()
    normalize_rows(ref)
    kept, done = w.clone(), w.clone()
    normalize_rows(kept, keep=torch.tensor(1.0))
    normalize_rows(done, keep=torch.tensor(0.0))
    assert torch.equal(kept, w) and torch.equal(done, ref)


@pytest.mark.parametrize("at", [5, 11])
def test_the_deferred_guard_stops_with_the_last_good_weights(at, tmp_path):
    torch.manual_seed(0)
    sae = saes.build("topk", d_model=D, d_sae=M, k=4)
    data = Poisoned(D, rows=ROWS, at=at, bad=(3, 9), sae=sae)
    with gpu_paths():
        trainer = Trainer(sae, cfg(checkpoint_every=4, keep_checkpoints=5), out_dir=tmp_path)
        with pytest.raises(NonFiniteError) as err:
            trainer.fit(data)
    st = trainer.sites[""]
    assert st.deferred is not None and st.opt.found_inf is st.deferred.flag
    checked = (at // guard.DEFERRED_STEPS + 1) * guard.DEFERRED_STEPS if at < 8 else 12  # where the flag was read
    after = checked - 1 - at
    msg = str(err.value)
    assert f"training stopped at step {at + 1} of 12: the loss is nan; rows [3, 9] of this batch of {ROWS}" in msg
    assert ("The step was not applied (nor the 2 steps after it, run before the check)" in msg if after
            else "The step was not applied; " in msg)
    last_good = at // 4 * 4
    assert f"the last good resume checkpoint, step {last_good} under" in msg
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == last_good
    for name, p in sae.state_dict().items():  # bit for bit the weights before the bad step
        assert torch.equal(p, data.seen[name]), name
    assert all(float(s["step"]) == at for s in st.opt.state.values())  # no skipped step counted by Adam
    assert all(p.grad is None for p in sae.parameters())


def test_the_guard_reads_every_step_on_the_cpu():
    torch.manual_seed(0)
    sae = saes.build("topk", d_model=D, d_sae=M, k=4)
    trainer = Trainer(sae, cfg())
    with pytest.raises(NonFiniteError, match="step 3 of 12.*The step was not applied; nothing was saved"):
        trainer.fit(Poisoned(D, rows=ROWS, at=2, bad=(1,), sae=sae))
    assert trainer.sites[""].deferred is None and not hasattr(trainer.sites[""].opt, "found_inf")


def test_no_deferral_where_a_step_hook_would_change_the_weights():
    torch.manual_seed(0)
    sae = saes.build("jumprelu", d_model=D, d_sae=M)
    with hostsync.force_sync_free():
        trainer = Trainer(sae, cfg(total_tokens=ROWS * 2))
        trainer.fit(SyntheticSource(D, rows=ROWS))
    assert trainer.sites[""].deferred is None
    assert all(math.isfinite(float(p.detach().abs().sum())) for p in sae.parameters())


def test_batchtopk_reads_nothing_back_and_tracks_the_same_threshold():
    torch.manual_seed(0)
    sae = saes.build("batchtopk", d_model=D, d_sae=M, k=4)
    with gpu_paths():
        assert counted_steps(sae, cfg(), SyntheticSource(D, rows=ROWS)) == [0] * 12
    state = TrainState(global_rows=8)
    sae.threshold.fill_(-1.0)
    codes = [torch.randn(8, M).relu(), torch.zeros(8, M), torch.randn(8, M).relu()]
    want = -1.0
    for c in codes:  # the smallest positive code (0 where none is); the first batch sets it, then a running mean
        pos = c[c > 0]
        low = float(pos.min()) if pos.numel() else 0.0
        want = low if want < 0 else want * (1 - 0.01) + 0.01 * low
        sae._update_threshold(c, state)
        assert float(sae.threshold) == pytest.approx(want, rel=1e-6)


def test_batches_from_cpu_memory_go_to_a_gpu_without_a_host_wait(monkeypatch):
    from saes.trainer import to_device

    calls = []

    class Pinned:  # what pin_memory() hands back; its copy to the device is the one the host does not wait for
        def to(self, device, non_blocking=False):
            calls.append(("to", str(device), non_blocking))
            return torch.ones(2, 3)

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or Pinned())
    x = torch.zeros(2, 3, dtype=torch.float64)
    with mock.patch.object(torch.Tensor, "to", lambda self, *a, **kw: calls.append(("plain", a)) or self):
        to_device(x, torch.device("cuda"), torch.float32)
    assert calls == ["pin", ("to", "cuda", True), ("plain", (torch.device("cuda"), torch.float32))]
    calls.clear()
    assert to_device(x, torch.device("cpu"), torch.float32).dtype == torch.float32 and calls == []


def test_a_resumed_run_on_the_gpu_paths_ends_where_an_uninterrupted_one_does(tmp_path):
    class Stop(Exception):
        pass

    class Interrupted(SyntheticSource):
        def batch(self, i):
            if i == 7:
                raise Stop
            return super().batch(i)

    c = cfg(checkpoint_every=3, keep_checkpoints=2)  # dead latents from step 4 on: AuxK's path before and after
    torch.manual_seed(0)
    ref = saes.build("topk", d_model=D, d_sae=M, k=4)
    run = saes.build("topk", d_model=D, d_sae=M, k=4)
    run.load_state_dict(ref.state_dict())
    with gpu_paths():
        Trainer(ref, c).fit(SyntheticSource(D, rows=ROWS))
        with pytest.raises(Stop):
            Trainer(run, c, out_dir=tmp_path).fit(Interrupted(D, rows=ROWS))
        resumed = saes.build("topk", d_model=D, d_sae=M, k=4)
        trainer = Trainer(resumed, c, out_dir=tmp_path)
        trainer.fit(SyntheticSource(D, rows=ROWS), resume=True)
    assert trainer.sites[""].since_bound == 12 * ROWS  # restored from the checkpoint's counters, then counted on
    for (name, p), q in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
