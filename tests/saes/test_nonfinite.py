"""NaN and inf: the trainer stops at the first non-finite step and keeps its last good checkpoint;
every architecture's loader refuses non-finite weights; MP encoding refuses non-finite rows."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from sae_testdata import SyntheticSource, saelens_style, sparsify_style
from safetensors.torch import load_file, save_file

import saes
from saes.guard import NonFiniteError
from saes.safetensors_check import CheckpointError
from saes.trainer import TrainConfig, Trainer

D, M, ROWS = 16, 64, 64


class Poisoned(SyntheticSource):
    """SyntheticSource whose batch `at` (0-based) holds `value` in the given rows."""

    def __init__(self, *a, at: int, bad: tuple[int, ...], value: float, **kw):
        super().__init__(*a, **kw)
        self.at, self.bad, self.value = at, bad, value

    def batch(self, i: int):
        x = super().batch(i)
        if i == self.at:
            x = x.clone()
            x[list(self.bad), 3] = self.value
        return x


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(total_tokens=ROWS * 10, batch_tokens=ROWS, lr=3e-3, progress=False, log_every=2,
                                 checkpoint_every=1, keep_checkpoints=3), **kw})


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("arch,guard,value", [("topk", "loss", float("nan")), ("batchtopk", "grads", float("inf")),
                                              ("relu", "grads", float("nan")), ("mpsae", "loss", float("-inf"))])
def test_training_stops_at_the_first_nonfinite_batch_and_keeps_the_last_good_checkpoint(arch, guard, value, tmp_path):
    kw = {"k": 4} if "topk" in arch else {"n_steps": 4} if arch == "mpsae" else {}
    torch.manual_seed(0)
    sae = saes.build(arch, d_model=D, d_sae=M, **kw)
    c = cfg(nonfinite_guard=guard)
    with pytest.raises(NonFiniteError) as err:
        Trainer(sae, c, out_dir=tmp_path / "run").fit(Poisoned(D, rows=ROWS, at=2, bad=(5, 17), value=value))
    msg = str(err.value)
    assert "\n" not in msg
    assert "training stopped at step 3 of 10" in msg and "rows [5, 17] of this batch of 64 (batch 3 of the data)" in msg
    assert f"step 2 under {tmp_path / 'run' / 'checkpoints'}, is kept" in msg
    assert all(bool(torch.isfinite(p).all()) for p in sae.parameters())  # the bad step was not applied
    ckpts = tmp_path / "run" / "checkpoints"
    assert json.loads((ckpts / "latest.json").read_text())["step"] == 2
    assert not (tmp_path / "run" / "sae").exists() and not (tmp_path / "run" / "train_history.json").exists()

    # the last good checkpoint is the uninterrupted run's step 2: resuming on fixed data ends where it ends
    torch.manual_seed(0)
    ref = saes.build(arch, d_model=D, d_sae=M, **kw)
    Trainer(ref, c, out_dir=tmp_path / "ref").fit(SyntheticSource(D, rows=ROWS))
    fixed = saes.build(arch, d_model=D, d_sae=M, **kw)
    Trainer(fixed, c, out_dir=tmp_path / "run").fit(SyntheticSource(D, rows=ROWS), resume=True)
    for (name, p), q in zip(ref.state_dict().items(), fixed.state_dict().values()):
        assert torch.equal(p, q), name
    assert files(tmp_path / "run" / "sae") == files(tmp_path / "ref" / "sae")


def test_a_diverging_run_is_named_as_such(tmp_path):
    torch.manual_seed(0)
    sae = saes.build("topk", d_model=D, d_sae=M, k=4)
    with pytest.raises(NonFiniteError, match=r"no input row of this batch is NaN, inf or overflowing, so the training "
                                             r"diverged: "
                                             r"lower lr \(now 1e\+30\).*no resume checkpoint was written yet"):
        Trainer(sae, cfg(lr=1e30, warmup_frac=0.0, checkpoint_every=0), out_dir=tmp_path).fit(
            SyntheticSource(D, rows=ROWS))


def test_without_the_guard_nan_spreads_and_nothing_nonfinite_is_saved(tmp_path):
    torch.manual_seed(0)
    sae = saes.build("topk", d_model=D, d_sae=M, k=4)
    src = Poisoned(D, rows=ROWS, at=2, bad=(5,), value=float("nan"))
    tr = Trainer(sae, cfg(nonfinite_guard="off", checkpoint_every=0)).fit(src)  # what the guard prevents
    assert tr.steps_ == 10 and not bool(torch.isfinite(sae.W_enc).all())
    with pytest.raises(CheckpointError, match=r"tensor 'W_enc' holds \d+ NaN or infinite values"):
        saes.save(sae, tmp_path / "sae")
    assert not (tmp_path / "sae").exists()
    with pytest.raises(saes.SAEError, match="nonfinite_guard must be one of"):
        cfg(nonfinite_guard="sometimes")


def _poison_ours(folder, key: str, value: float) -> None:
    """Put one non-finite value into an SAE we saved, with the checksum in cfg.json updated to match."""
    weights = folder / "sae_weights.safetensors"
    t = load_file(str(weights))
    t[key] = t[key].clone()
    t[key].view(-1)[0] = value
    save_file(t, str(weights), metadata={"format": "pt"})
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["interp"]["files"]["sae_weights.safetensors"] = {"bytes": weights.stat().st_size,
                                                         "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    (folder / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("arch", sorted(saes.REGISTRY))
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_every_architecture_loader_refuses_nonfinite_weights(arch, value, tmp_path):
    kw = {"k": 4} if arch in ("topk", "batchtopk") else {"n_steps": 4} if arch == "mpsae" else {}
    folder = saes.save(saes.build(arch, d_model=8, d_sae=32, **kw), tmp_path / "sae")
    saes.load(folder)  # the clean one loads
    _poison_ours(folder, "W_dec", value)
    with pytest.raises(CheckpointError, match=r"sae_weights.safetensors: tensor 'W_dec' holds 1 NaN or infinite "
                                              r"values \(of 256\)"):
        saes.load(folder)


def test_peer_loaders_refuse_nonfinite_weights(tmp_path):
    w = torch.randn(8, 32)
    w[2, 3] = float("nan")
    f = saelens_style(tmp_path / "saelens", tensors={"W_enc": w, "b_enc": torch.zeros(32),
                                                     "W_dec": torch.randn(32, 8), "b_dec": torch.zeros(8)})
    with pytest.raises(CheckpointError, match="tensor 'W_enc' holds 1 NaN"):
        saes.load(f)
    b = torch.zeros(8)
    b[0] = float("inf")
    f = sparsify_style(tmp_path / "layers.0", tensors={"encoder.weight": torch.randn(32, 8),
                                                       "encoder.bias": torch.zeros(32),
                                                       "W_dec": torch.randn(32, 8), "b_dec": b})
    with pytest.raises(CheckpointError, match="tensor 'b_dec' holds 1 NaN"):
        saes.load(f)


@pytest.mark.parametrize("training", [False, True])
def test_mp_encode_refuses_nonfinite_rows(training):
    torch.manual_seed(0)
    sae = saes.build("mpsae", d_model=D, d_sae=M, n_steps=4).train(training)
    x = torch.randn(3, 5, D)
    clean = sae.encode(x)
    assert clean.shape == (3, 5, M) and bool(torch.isfinite(clean).all())
    x[1, 2, 0] = float("nan")
    x[2, 4, 7] = float("inf")
    for call in (sae.encode, sae.forward, sae.pursue):
        with pytest.raises(saes.SAEError, match=r"MPSAE input rows \[7, 14\] \(2 of 15, .*\) hold NaN or inf"):
            call(x)
    with torch.no_grad():
        with pytest.raises(saes.SAEError, match="hold NaN or inf"):
            sae.encode(x)
