"""One contract, checked on every registered architecture."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import saes
from saes import REGISTRY, SaeOutput
from saes.losses import TrainState

D_MODEL, D_SAE, K = 12, 48, 4


def make(arch: str, **extra) -> saes.SAE:
    cls = REGISTRY[arch]
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    sparsity = {name: K for name in ("k", "n_steps") if name in fields}  # active latents / MP steps
    kw = {"d_model": D_MODEL, "d_sae": D_SAE, **sparsity, **extra}
    return saes.build(arch, **kw)


def randomize(sae: saes.SAE, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*sae.parameters(), *sae.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * 0.5 + 0.01)


ARCHS = sorted(REGISTRY)


def test_registry_names():
    assert {"relu", "topk", "batchtopk", "jumprelu"} <= set(REGISTRY)


NO_B_ENC = {"mpsae"}  # MP-SAE's encoder is tied to the decoder and has no bias


@pytest.mark.parametrize("arch", [
    pytest.param(a, marks=pytest.mark.xfail(a in NO_B_ENC, reason="no b_enc", strict=True, raises=AttributeError))
    for a in ARCHS])
def test_shapes_and_named_output(arch):
    sae = make(arch)
    assert sae.W_enc.shape == (D_MODEL, D_SAE) and sae.W_dec.shape == (D_SAE, D_MODEL)
    assert sae.b_enc.shape == (D_SAE,) and sae.b_dec.shape == (D_MODEL,)
    x = torch.randn(2, 5, D_MODEL)
    out = sae(x)
    assert isinstance(out, SaeOutput)
    assert out.x_hat.shape == x.shape and out.codes.shape == (2, 5, D_SAE)
    assert torch.allclose(sae.encode(x), out.codes)
    assert torch.allclose(sae.decode(out.codes), out.x_hat, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_dtype_moves_follow_the_weights(arch):
    sae = make(arch).to(torch.float64)
    assert sae.dtype == torch.float64 and sae.device.type == "cpu"
    out = sae(torch.randn(3, D_MODEL))  # fp32 input, fp64 SAE
    assert out.x_hat.dtype == torch.float64
    sae = sae.to(torch.bfloat16)
    assert sae(torch.randn(3, D_MODEL)).x_hat.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_flow_through_training_loss(arch):
    sae = make(arch)
    x = torch.randn(32, D_MODEL)
    state = TrainState(global_rows=32, total_steps=10,
                       dead_mask=torch.zeros(D_SAE, dtype=torch.bool))
    step = sae.training_loss(x, state)
    assert step.loss.dim() == 0 and torch.isfinite(step.loss)
    assert step.x_hat.shape == x.shape and step.fired.shape == (D_SAE,)
    step.loss.backward()
    for name in ("W_dec", "b_dec"):
        grad = getattr(sae, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    if isinstance(sae.W_enc, torch.nn.Parameter):  # (a tied encoder is W_dec itself)
        assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_after_randomizing(arch, tmp_path):
    from saes.checkpoint import load, save

    sae = make(arch)
    randomize(sae)
    save(sae, tmp_path / "sae", metadata={"hook_name": "blocks.0.hook_resid_post"})
    back = load(tmp_path / "sae")
    assert type(back) is type(sae) and back.cfg == sae.cfg
    sd, bd = sae.state_dict(), back.state_dict()
    assert sd.keys() == bd.keys()
    for k in sd:
        assert torch.equal(sd[k], bd[k]), k
    x = torch.randn(4, D_MODEL)
    assert torch.allclose(sae(x).x_hat, back(x).x_hat)


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_sparse_holds_exactly_the_nonzero_codes(arch, unchecked):
    sae = make(arch)
    randomize(sae, seed=1)
    if hasattr(sae, "b_enc"):
        with torch.no_grad():
            sae.b_enc.sub_(1.5)  # some of the top k are clipped to 0 by the ReLU: they are not stored
    x = torch.randn(9, D_MODEL, generator=torch.Generator().manual_seed(2))
    dense = sae.encode(x)
    if arch == "topk":
        assert bool(((dense != 0).sum(1) < K).any()) and bool((dense != 0).any())
    sp = sae.encode_sparse(x)
    assert sp.is_sparse and sp.is_coalesced() and sp.shape == dense.shape
    assert torch.equal(sp.indices(), dense.nonzero().T)  # the nonzero codes only, in row-major order
    assert torch.equal(sp.values(), dense[dense != 0])  # bit for bit
    with unchecked(), pytest.raises(saes.SAEError, match=r"\[batch, d_model"):
        sae.encode_sparse(x[None])


@pytest.mark.parametrize("arch", sorted(set(ARCHS) - NO_B_ENC))
def test_encode_pre_adds_the_bias_as_written(arch):
    """``(x - b_dec) @ W_enc + b_enc``, bit for bit; under bf16 autocast the sum is promoted to float32."""
    sae = make(arch)
    randomize(sae, seed=3)
    x = torch.randn(6, D_MODEL, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(sae.encode_pre(x), (x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pre, expected = sae.encode_pre(x), (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert pre.dtype == expected.dtype == torch.float32 and torch.equal(pre, expected)


UNTIED = [a for a in ARCHS if issubclass(REGISTRY[a].config_class, saes.UntiedSAEConfig)]


def test_every_architecture_with_its_own_encoder_has_the_init_scale():
    assert set(UNTIED) >= {"topk", "batchtopk", "relu", "jumprelu"}
    assert "mpsae" not in UNTIED and "enc_init_scale" not in {f.name for f in dataclasses.fields(
        REGISTRY["mpsae"].config_class)}  # tied: its encoder is its decoder
    sae = make("mpsae")
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


@pytest.mark.parametrize("arch", UNTIED)
@pytest.mark.parametrize("scale", [None, 0.25, 1.0])
def test_encoder_starts_as_the_scaled_decoder_transpose(arch, scale):
    torch.manual_seed(0)
    sae = make(arch) if scale is None else make(arch, enc_init_scale=scale)
    want = saes.base.ENC_INIT_SCALE if scale is None else scale
    assert sae.cfg.enc_init_scale == want
    rows = saes.relu.DEC_INIT_NORM if arch == "relu" else 1.0  # ReLU's decoder starts at 0.1 (dec_init_norm)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((D_SAE,), rows))
    torch.testing.assert_close(sae.W_enc, want * sae.W_dec.T)
    assert torch.equal(sae.b_enc, torch.zeros(D_SAE)) and torch.equal(sae.b_dec, torch.zeros(D_MODEL))


def test_default_encoder_scale_is_the_row_norm_of_torch_linear_init():
    """The documented default: the norm ``nn.Linear``'s default initialisation gives a latent's encoder
    row (sparsify's ``SparseCoder`` encoder), independent of the widths."""
    for d_in, d_out in ((576, 9216), (64, 4096)):
        torch.manual_seed(0)
        rows = torch.nn.Linear(d_in, d_out).weight.norm(dim=1)
        assert abs(rows.mean().item() - saes.base.ENC_INIT_SCALE) < 0.005, (d_in, rows.mean())


@pytest.mark.parametrize("bad", [0, -0.5, float("inf"), float("nan"), True, "0.5"])
def test_bad_enc_init_scale_is_refused(bad, unchecked):
    with unchecked(), pytest.raises(saes.SAEError, match=r"TopKConfig.enc_init_scale must be a finite number > 0, "
                                                         r"got"):
        make("topk", enc_init_scale=bad)


@pytest.mark.parametrize("seed", range(5))
def test_topk_leaves_exactly_k_nonzeros(seed):
    torch.manual_seed(seed)
    sae = make("topk")
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: ReLU removes none of the top k
    codes = sae.encode(torch.randn(50, D_MODEL))
    assert ((codes != 0).sum(-1) == K).all()
    sae2 = make("topk")  # in general: at most k
    assert ((sae2.encode(torch.randn(50, D_MODEL)) != 0).sum(-1) <= K).all()


@pytest.mark.parametrize("workspace", [False, True])
@pytest.mark.parametrize("center", [True, False])
def test_topk_sparse_kernels_match_dense_autograd(center, workspace):
    torch.manual_seed(0)
    a = make("topk", sparse_kernels=True, apply_b_dec_to_input=center).double()
    b = make("topk", sparse_kernels=False, apply_b_dec_to_input=center).double()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.b_dec.normal_()
        b.b_dec.copy_(a.b_dec)
    x = torch.randn(64, D_MODEL, dtype=torch.float64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True  # exercise AuxK on both paths
    ws = {} if workspace else None
    if workspace:  # a buffer left by an earlier step (other rows) is overwritten, not read
        a.training_loss(torch.randn(64, D_MODEL, dtype=torch.float64), TrainState(global_rows=64, workspace=ws))
        a.zero_grad(set_to_none=True)
        assert ws["pre"].shape == (64, D_SAE)
    for sae in (a, b):
        sae.training_loss(x, TrainState(global_rows=64, dead_mask=dead, workspace=ws)).loss.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_batchtopk_threshold_reproduces_training_l0():
    from saes.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    dic = torch.randn(D_SAE, D_MODEL)

    def data():
        g = torch.Generator().manual_seed(1)
        while True:
            z = (torch.rand(256, D_SAE, generator=g) < 0.1) * torch.rand(256, D_SAE, generator=g)
            yield z @ dic

    sae = make("batchtopk", threshold_momentum=0.1)
    Trainer(sae, TrainConfig(total_tokens=256 * 60, batch_tokens=256, lr=3e-3, progress=False,
                             normalize_inputs=False, b_dec_init="mean")).fit(data())
    assert float(sae.threshold) > 0
    x = next(data())
    l0 = (sae.encode(x) != 0).sum(-1).float().mean().item()
    assert abs(l0 - K) / K < 0.25, l0


def test_jumprelu_thresholds_receive_gradient():
    sae = make("jumprelu", bandwidth=0.5, init_threshold=0.2)
    x = torch.randn(64, D_MODEL)
    sae.training_loss(x, TrainState(global_rows=64)).loss.backward()
    assert sae.threshold.grad is not None and (sae.threshold.grad != 0).sum() > D_SAE // 4
    assert "threshold" in sae.state_dict() and sae.threshold.shape == (D_SAE,)


@pytest.mark.parametrize("to_input", [False, True])
def test_jumprelu_straight_through_gradients(to_input):
    """The rectangle-kernel estimators of the jump and of the L0 step, written out: the thresholds always get them,
    the pre-activations only with ``ste_to_input`` (and then exactly the thresholds' terms negated, row by row)."""
    from saes.jumprelu import _JumpReLU, _Step

    torch.manual_seed(0)
    eps = 0.3
    pre = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    th = (torch.rand(8, dtype=torch.float64) * 0.5).requires_grad_()
    w1, w2 = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    ((_JumpReLU.apply(pre, th, eps, to_input) * w1).sum() + (_Step.apply(pre, th, eps, to_input) * w2).sum()).backward()
    with torch.no_grad():
        kernel = ((pre - th).abs() < eps / 2).double() / eps
        ste = kernel * (th * w1 + w2)
        assert (kernel > 0).any() and (kernel == 0).any()
        torch.testing.assert_close(th.grad, -ste.sum(0))
        torch.testing.assert_close(pre.grad, w1 * (pre > th) + (ste if to_input else 0))


def test_jumprelu_l0_penalty_reaches_the_encoder_only_with_ste_to_input():
    x = torch.randn(64, D_MODEL)

    def encoder_grad(**kw):
        torch.manual_seed(0)
        sae = make("jumprelu", bandwidth=0.5, init_threshold=0.2, **kw)
        sae.training_loss(x, TrainState(global_rows=64)).loss.backward()
        return sae.W_enc.grad

    for to_input in (False, True):
        without, alone = encoder_grad(l0_coeff=0.0, ste_to_input=to_input), encoder_grad(l0_coeff=1.0,
                                                                                          ste_to_input=to_input)
        assert torch.equal(without, alone) != to_input


@pytest.mark.parametrize("arch,bad", [("topk", {"k": 0}), ("topk", {"k": D_SAE + 1}),
                                      ("relu", {"l1_coeff": -1.0}), ("jumprelu", {"bandwidth": 0.0}),
                                      ("batchtopk", {"threshold_momentum": 2.0})])
def test_bad_configs_name_the_field(arch, bad):
    with pytest.raises(saes.SAEError, match=next(iter(bad))):
        make(arch, **bad)


@pytest.mark.parametrize("norm", [None, 1.0, 0.5])
def test_relu_decoder_rows_start_at_dec_init_norm(norm):
    """Unit rows started ReLU far above outputting zeros (FVU 15.7 against 2.05 on layer 12); the default is 0.1,
    and the encoder is scaled with the decoder, so ``W_enc = enc_init_scale * W_dec.T`` still holds."""
    torch.manual_seed(0)
    sae = make("relu") if norm is None else make("relu", dec_init_norm=norm)
    want = saes.relu.DEC_INIT_NORM if norm is None else norm
    assert saes.relu.DEC_INIT_NORM == 0.1 and sae.cfg.dec_init_norm == want
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((D_SAE,), want))
    torch.manual_seed(0)
    unit = make("relu", dec_init_norm=1.0)
    torch.testing.assert_close(sae.W_dec, want * unit.W_dec)  # the same draw, scaled
    with pytest.raises(saes.SAEError, match="dec_init_norm must be a finite number > 0"):
        make("relu", dec_init_norm=0)
