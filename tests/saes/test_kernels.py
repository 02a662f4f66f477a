"""The encoder matmul's oneDNN path (CPU, float32): equal to ``addmm`` to float rounding, in training (sparse
TopK kernels against dense autograd) and at inference (``encode_pre``), taken only where it applies, and
replaced by ``addmm`` with one warning when the kernel fails."""

from __future__ import annotations

import pytest
import torch

import saes
from saes import kernels
from saes.losses import TrainState

B, D_MODEL, D_SAE, K = 256, 64, 512, 16  # 2*B*D_MODEL*D_SAE = 1.7e7 flops: over ONEDNN_MIN_FLOPS
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def make(**kw) -> saes.SAE:
    torch.manual_seed(0)
    sae = saes.build("topk", d_model=D_MODEL, d_sae=D_SAE, k=K, **kw)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    return sae


@needs_onednn
def test_onednn_matmul_equals_addmm_where_it_applies():
    sae = make()
    x = torch.randn(B, D_MODEL)
    assert kernels.onednn_ok(x, sae.W_enc)
    with torch.no_grad():
        got = kernels.encoder_matmul(x, sae.W_enc, sae.b_enc)
        torch.testing.assert_close(got, torch.addmm(sae.b_enc, x, sae.W_enc), rtol=1e-5, atol=1e-5)
    assert not kernels.onednn_ok(x[:4], sae.W_enc)  # a small product stays on addmm
    assert not kernels.onednn_ok(x.double(), sae.W_enc.double())
    assert not kernels.onednn_ok(x, sae.W_enc.detach().contiguous())  # row-major W_enc: oneDNN would copy it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.onednn_ok(x, sae.W_enc)


@needs_onednn
def test_encode_pre_without_grad_equals_the_autograd_path():
    sae = make()
    x = torch.randn(2, B // 2, D_MODEL)  # leading dims are kept
    with torch.no_grad():
        fast = sae.encode_pre(x)
    slow = sae.encode_pre(x)  # parameters require grad: the plain matmul, differentiable
    assert slow.requires_grad and not fast.requires_grad and fast.shape == (2, B // 2, D_SAE)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_sparse_training_step_on_onednn_matches_dense_autograd():
    a, b = make(sparse_kernels=True), make(sparse_kernels=False)
    x = torch.randn(B, D_MODEL)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True  # AuxK reads the same pre-activations
    losses = [s.training_loss(x, TrainState(global_rows=B, dead_mask=dead, workspace={})).loss for s in (a, b)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_failing_kernel_falls_back_to_addmm_with_one_warning(monkeypatch):
    sae = make()
    x = torch.randn(B, D_MODEL)
    monkeypatch.setattr(kernels, "onednn_ok", lambda *a: not kernels._onednn_failed)
    monkeypatch.setattr(kernels, "_onednn_failed", [])

    def broken(*a):
        raise RuntimeError("unsupported configuration\ndetails")

    monkeypatch.setattr(kernels, "_linear", broken)
    ref = torch.addmm(sae.b_enc, x, sae.W_enc).detach()
    with pytest.warns(UserWarning, match="unsupported configuration.*uses addmm from now on"):
        torch.testing.assert_close(kernels.encoder_matmul(x, sae.W_enc, sae.b_enc), ref)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(kernels.encoder_matmul(x, sae.W_enc, sae.b_enc), ref)


def test_auxk_picks_the_top_dead_latents():
    from saes.losses import auxk_loss

    torch.manual_seed(0)
    pre = torch.randn(16, 64)
    dead = torch.rand(64) < 0.3
    picked = {}

    def gather(i):
        picked["idx"] = i
        return pre.gather(1, i)

    state = TrainState(global_rows=16, dead_mask=dead)
    auxk_loss(torch.randn(16, 8), torch.zeros(16, 8), pre, gather, torch.randn(64, 8), state, k_aux=4)
    want = torch.where(dead, pre, -torch.inf).topk(4, dim=-1).indices
    assert torch.equal(picked["idx"].sort(-1).values, want.sort(-1).values)
    assert dead[picked["idx"]].all()
