"""bf16 against fp32 on a planted dictionary (rows built from known atoms): training under bf16
autocast, and the matching pursuit's bf16 selection, reach the fp32 quality within 2 % relative."""

from __future__ import annotations

import itertools

import pytest
import torch

import saes
from saes.trainer import TrainConfig, Trainer

D, N_ATOMS, ACTIVE, ROWS, NOISE, STEPS = 64, 48, 3, 256, 0.04, 150


class Planted:
    """Rows ``z @ atoms + offset + noise``: each row mixes ``ACTIVE`` of ``N_ATOMS`` known unit-norm atoms
    with weights in [0.5, 2], plus Gaussian noise of std ``NOISE`` per dimension (a floor no SAE can
    reconstruct, so that FVU measures how well the atoms were learned, not how close to zero it gets);
    batch ``i`` is fixed by ``i`` (held-out batches use indices never trained on)."""

    def __init__(self):
        g = torch.Generator().manual_seed(1234)
        self.atoms = torch.nn.functional.normalize(torch.randn(N_ATOMS, D, generator=g), dim=1)
        self.offset = torch.randn(D, generator=g)

    def batch(self, i: int, noise: float = NOISE) -> torch.Tensor:
        g = torch.Generator().manual_seed(7919 * i + 1)
        idx = torch.rand(ROWS, N_ATOMS, generator=g).argsort(1)[:, :ACTIVE]
        z = torch.zeros(ROWS, N_ATOMS).scatter(1, idx, 0.5 + 1.5 * torch.rand(ROWS, ACTIVE, generator=g))
        return z @ self.atoms + self.offset + noise * torch.randn(ROWS, D, generator=g)

    def __iter__(self):
        return (self.batch(i) for i in itertools.count())


HELD_OUT = [Planted().batch(10**6 + j) for j in range(4)]


def held_out_fvu(recon) -> float:
    """1 - explained variance over every held-out row (numerator and denominator summed over the set)."""
    x = torch.cat(HELD_OUT)
    with torch.no_grad():
        err = (x - recon(x).float()).pow(2).sum()
    return float(err / (x - x.mean(0)).pow(2).sum())


def noise_floor() -> float:
    """The FVU that the noise alone leaves on the held-out rows (the rest is the atoms' part)."""
    clean = torch.cat([Planted().batch(10**6 + j, noise=0.0) for j in range(len(HELD_OUT))])
    x = torch.cat(HELD_OUT)
    return float((x - clean).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def train(arch: str, bf16: bool, **kw) -> tuple[saes.SAE, float]:
    torch.manual_seed(0)
    sae = saes.build(arch, d_model=D, d_sae=2 * N_ATOMS, **kw)
    cfg = TrainConfig(total_tokens=ROWS * STEPS, batch_tokens=ROWS, lr=1e-2, bf16=bf16, progress=False,
                      log_every=STEPS)
    Trainer(sae, cfg).fit(Planted())
    sae.eval()
    return sae, held_out_fvu(lambda x: sae(x).x_hat)


@pytest.mark.parametrize(("arch", "kw"), [("topk", dict(k=ACTIVE)), ("mpsae", dict(n_steps=ACTIVE))])
def test_bf16_training_reaches_the_fp32_fvu_on_a_planted_dictionary(arch, kw):
    """Same seed, same batches, same budget. The budget is enough for fp32 to learn the atoms (its FVU
    ends within 0.015 of the noise floor), and FVU still falls with the budget (TopK with 110 steps
    instead of 150 ended 11 % higher when this test was written), so a bf16 path that learned
    markedly less per step, or nothing, falls outside the 2 % band."""
    ref, fvu32 = train(arch, False, **kw)
    low, fvu16 = train(arch, True, **kw)
    assert fvu32 < noise_floor() + 0.015, (fvu32, noise_floor())
    assert not torch.equal(ref.W_dec, low.W_dec)  # bf16 really ran (weights and Adam stay fp32)
    assert low.W_dec.dtype == torch.float32
    assert abs(fvu16 - fvu32) <= 0.02 * fvu32, (fvu32, fvu16)


def test_bf16_pursuit_encodes_like_fp32_with_the_planted_atoms():
    data = Planted()
    fp32 = saes.build("mpsae", d_model=D, d_sae=N_ATOMS, n_steps=ACTIVE).eval()
    with torch.no_grad():
        fp32.W_dec.copy_(data.atoms)
        fp32.b_dec.copy_(data.offset)
    low = saes.build("mpsae", d_model=D, d_sae=N_ATOMS, n_steps=ACTIVE, pursuit_dtype="bfloat16").eval()
    low.load_state_dict(fp32.state_dict())
    x = torch.cat(HELD_OUT)
    a, b = fp32.pursue(x), low.pursue(x)
    fvu32, fvu16 = held_out_fvu(lambda _: a.x_hat), held_out_fvu(lambda _: b.x_hat)
    assert fvu32 < noise_floor() + 0.015, (fvu32, noise_floor())
    assert abs(fvu16 - fvu32) <= 0.02 * fvu32, (fvu32, fvu16)
    same_support = ((a.codes != 0) == (b.codes != 0)).all(1).float().mean()
    assert same_support > 0.95, same_support
    assert not torch.equal(a.codes, b.codes)  # the bf16 selection ran: rounding differs from fp32's
    norms = b.selection.residual_norms
    assert (norms[:, 1:] <= norms[:, :-1] * (1 + 1e-6)).all()  # exact coefficients: the residual never grows
    assert (b.codes >= 0).all()  # nonneg codes stay non-negative
    # a bf16 autocast region selects in bf16 too, whatever pursuit_dtype says
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp32.selects_in_bf16("cpu")
        torch.testing.assert_close(fp32.pursue(x).codes, b.codes)
    assert not fp32.selects_in_bf16("cpu")
