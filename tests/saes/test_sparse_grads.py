"""Weight gradients kept sparse (saes.sparse_grads) and made by the optimizer as it steps
(saes.native.sparse_adam): the same step as the gradients written whole, in the trainer and kernel by kernel."""

from __future__ import annotations

import pytest
import torch

from saes import TrainConfig, Trainer, kernels, native, optim, sparse_grads
from saes.base import SAEError
from saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saes.losses import TrainState
from saes.topk import TopKConfig, TopKSAE

built = pytest.mark.skipif(not (native.library() and native.library().native_openmp()),
                           reason=f"saes.native is not built with OpenMP here ({native.status()})")
pytestmark = built


def source(b: int, k: int, rows: int, cols: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(b, rows, generator=g).topk(k, dim=1).indices  # distinct latents per row, as a top-k's
    vals = torch.randn(b, k, generator=g)
    dense = torch.randn(b, cols + 3, generator=g)[:, :cols]  # a row stride other than cols
    return idx, vals, dense


def sorted_source(idx, vals, dense, rows):
    starts, order = native.sort_by_latent(idx, rows)
    return starts, order, vals, dense


def weights(rows: int, cols: int, seed: int, steps_taken: bool = True):
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.functional.normalize(torch.randn(rows, cols, generator=g), dim=1)
    M = 0.1 * torch.randn(rows, cols, generator=g) if steps_taken else torch.zeros(rows, cols)
    V = torch.rand(rows, cols, generator=g) * 1e-2 if steps_taken else torch.zeros(rows, cols)
    return W, M, V


@pytest.mark.parametrize(("b", "k", "rows", "cols"), [(300, 8, 700, 24), (7, 3, 50, 5), (1024, 32, 2048, 64)])
@pytest.mark.parametrize("with_G", [False, True])
def test_a_plain_step_equals_torchs_adam_on_the_dense_gradient(b, k, rows, cols, with_G):
    srcs = [source(b, k, rows, cols, 1), source(b, 2 * k, rows, cols, 2)]
    W, M, V = weights(rows, cols, 3)
    G = torch.randn(rows, cols, generator=torch.Generator().manual_seed(4)) if with_G else None
    wb = torch.randn(rows, generator=torch.Generator().manual_seed(5))
    dense_grad = sum(kernels.scatter_rows(i, v, d, rows) for i, v, d in srcs) + (G if with_G else 0)
    p = torch.nn.Parameter(W.clone())
    opt = torch.optim.Adam([p], lr=1e-2, betas=(0.9, 0.999), fused=True)
    opt.state[p].update(step=torch.tensor(4.0), exp_avg=M.clone(), exp_avg_sq=V.clone())
    p.grad = dense_grad
    opt.step()
    term = native.sparse_adam(W, M, V, [sorted_source(*s, rows) for s in srcs], G, lr=1e-2, betas=(0.9, 0.999),
                              eps=1e-8, step=5, decoder=False, wb=wb)
    torch.testing.assert_close(W, p.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(M, opt.state[p]["exp_avg"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(V, opt.state[p]["exp_avg_sq"], rtol=1e-5, atol=1e-7)
    W0 = weights(rows, cols, 3)[0]
    torch.testing.assert_close(term, (W0.double().T @ wb.double()).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unit", [True, False])
def test_a_decoder_step_equals_the_one_pass_kernel_on_the_dense_gradient(unit):
    rows, cols = 900, 40
    srcs = [source(400, 16, rows, cols, 6), source(400, 40, rows, cols, 7)]
    W, M, V = weights(rows, cols, 8)
    if not unit:
        W *= torch.rand(rows, 1, generator=torch.Generator().manual_seed(9)) + 0.5
    G = kernels.scatter_rows(*srcs[0], rows) + kernels.scatter_rows(*srcs[1], rows)
    W1, M1, V1 = W.clone(), M.clone(), V.clone()
    native.unit_row_adam(W1, G, M1, V1, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, step=3, unit=unit)
    out = native.sparse_adam(W, M, V, [sorted_source(*s, rows) for s in srcs], lr=1e-2, betas=(0.9, 0.999),
                             eps=1e-8, step=3, decoder=True, unit=unit)
    assert out is None
    for got, want in ((W, W1), (M, M1), (V, V1)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(W.norm(dim=1), torch.ones(rows))


def test_the_result_does_not_depend_on_the_threads(monkeypatch):
    rows, cols = 1000, 24
    src = [sorted_source(*source(500, 8, rows, cols, 10), rows)]
    wb = torch.randn(rows)
    runs = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        W, M, V = weights(rows, cols, 11)
        term = native.sparse_adam(W, M, V, src, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, step=2, decoder=False,
                                  wb=wb)
        runs.append((W, M, V, term))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


def test_bad_input_is_refused_with_what_arrived():
    rows, cols = 50, 8
    W, M, V = weights(rows, cols, 12)
    src = sorted_source(*source(20, 4, rows, cols, 13), rows)
    with pytest.raises(ValueError, match="sparse_adam takes"):
        native.sparse_adam(W, M.double(), V, [src], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, step=1, decoder=False)
    with pytest.raises(ValueError, match="sparse_adam takes"):  # a dense of another width
        native.sparse_adam(W, M, V, [(*src[:3], torch.randn(20, cols + 1))], lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                           step=1, decoder=False)
    idx = source(20, 4, rows, cols, 13)[0]
    with pytest.raises(ValueError, match="outside"):
        native.sort_by_latent(idx + rows, rows)


def _loss_grads(sae, x, sink, dead=None):
    for p in sae.parameters():
        p.grad = None
    state = TrainState(step=1, total_steps=10, dead_mask=dead, global_rows=x.shape[0], grads=sink)
    sae.training_loss(x, state).loss.backward()
    if sink is not None:
        assert sink.holds(sae.W_enc) and sink.holds(sae.W_dec)
        assert sae.W_enc.grad is None and sae.W_dec.grad is None  # nothing weight-sized written by the backward
        sink.materialize()
        assert not sink
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("with_dead", [False, True])
def test_kept_gradients_are_autograds(with_dead):
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_model=24, d_sae=512, k=8))
    x = torch.randn(200, 24)
    dead = (torch.arange(512) % 3 == 0) if with_dead else None  # AuxK: a second use of both weights
    want = _loss_grads(sae, x, None, dead)
    got = _loss_grads(sae, x, sparse_grads.SparseGrads(), dead)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d_model,d_sae", [(64, 64), (32, 256)])
@pytest.mark.parametrize("layout", ["W_enc contiguous", "W_dec column-major"])
def test_weights_stored_in_another_layout_take_autograds_gradient(d_model, d_sae, layout):
    """A TopK SAE filled by load_state_dict(assign=True) holds a contiguous W_enc [d_model, d_sae]: the kept
    gradient read its rows as latents (a W_enc gradient 1.4 off at d_model == d_sae, an error otherwise). Such a
    weight now takes the dense gradient, equal to autograd's."""
    torch.manual_seed(0)
    ref = TopKSAE(TopKConfig(d_model=d_model, d_sae=d_sae, k=4))
    sd = {k: v.contiguous().clone() for k, v in ref.state_dict().items()}
    if layout == "W_dec column-major":
        sd["W_dec"] = sd["W_dec"].T.contiguous().T
    sae = TopKSAE(TopKConfig(d_model=d_model, d_sae=d_sae, k=4))
    sae.load_state_dict(sd, assign=True)
    x = torch.randn(128, d_model)
    want = _loss_grads(ref, x, None)
    for p in sae.parameters():
        p.grad = None
    sink = sparse_grads.SparseGrads()
    sae.training_loss(x, TrainState(step=1, total_steps=10, global_rows=128, grads=sink)).loss.backward()
    sink.materialize()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_topk_sae_with_half_precision_weights_trains(dtype):
    """The CPU's CSR product has no bf16/fp16 kernel: a TopK SAE in those dtypes failed in its backward."""
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_model=32, d_sae=256, k=8)).to(dtype)
    ref = TopKSAE(TopKConfig(d_model=32, d_sae=256, k=8))
    ref.load_state_dict({k: v.float() for k, v in sae.state_dict().items()})
    x = torch.randn(64, 32).to(dtype)
    got = _loss_grads(sae, x, None)
    want = _loss_grads(ref, x.float(), None)
    assert got["W_enc"].dtype == dtype
    torch.testing.assert_close(got["W_enc"].float(), want["W_enc"], rtol=0.05, atol=0.02)
    Trainer(sae, TrainConfig(total_tokens=64 * 3, batch_tokens=64, lr=1e-3, progress=False)).fit(
        iter([torch.randn(64, 32) for _ in range(3)]))


def test_one_index_is_sorted_once_and_again_after_an_in_place_change(monkeypatch):
    rows, cols = 60, 8
    idx, vals, dense = source(30, 4, rows, cols, 21)
    W, _, _ = weights(rows, cols, 22)
    V = W.clone()
    calls = []
    real = native.sort_by_latent
    monkeypatch.setattr(native, "sort_by_latent", lambda *a: calls.append(1) or real(*a))
    sink = sparse_grads.SparseGrads()
    sink.add(W, idx, vals, dense)
    sink.add(V, idx, vals * 2, dense)  # the decoder's use of the encoder's top-k: one sort
    assert len(calls) == 1
    want = real(idx, rows)
    assert all(torch.equal(a, b) for a, b in zip(sink.take(V)[0][0][:2], want))
    idx[1] = idx[1].flip(0)  # written in place: row 1's entries in another order
    sink.add(W, idx, vals, dense)
    assert len(calls) == 2 and torch.equal(sink.take(W)[0][1][1], real(idx, rows)[1])
    sink.clear()
    sink.add(W, idx, vals, dense)  # a new step sorts afresh
    assert len(calls) == 3


def _train(arch: str, sparse: bool, monkeypatch, steps: int = 12, **cfg):
    with monkeypatch.context() as m:
        if not sparse:
            m.setattr(optim, "sparse_applies", lambda opt: False)
        else:  # no weight gradient is written whole on this path
            m.setattr(kernels, "scatter_rows", lambda *a: pytest.fail("a weight gradient was written whole"))
        torch.manual_seed(1)
        make = TopKSAE if arch == "topk" else BatchTopKSAE
        conf = TopKConfig if arch == "topk" else BatchTopKConfig
        sae = make(conf(d_model=32, d_sae=1024, k=8))
        g = torch.Generator().manual_seed(2)
        mix = torch.randn(32, 32, generator=g)
        data = [torch.randn(128, 32, generator=g) @ mix for _ in range(steps)]
        trainer = Trainer(sae, TrainConfig(total_tokens=128 * steps, batch_tokens=128, dead_tokens=256,
                                           progress=False, log_every=1, **cfg))
        trainer.fit(data)
    return sae, trainer


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_the_trainer_steps_kept_gradients_as_written_ones(arch, monkeypatch):
    got, trainer = _train(arch, True, monkeypatch)
    assert all(st.grads is not None for st in trainer.sites.values())
    assert trainer.history_[-1][""]["dead"] > 0  # AuxK ran in the later steps
    want, dense = _train(arch, False, monkeypatch)
    assert all(st.grads is None for st in dense.sites.values())
    for name, p in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], p, rtol=1e-4, atol=1e-5)


def test_the_gradient_guard_checks_kept_gradients_and_leaves_the_step_alone(monkeypatch):
    loss_only, _ = _train("topk", True, monkeypatch)
    checked, trainer = _train("topk", True, monkeypatch, nonfinite_guard="grads")
    assert all(st.grads is not None for st in trainer.sites.values())
    for name, p in loss_only.state_dict().items():  # the guard is not part of the result (a resume may change it)
        assert torch.equal(checked.state_dict()[name], p)


@pytest.mark.parametrize("bad", ["none", "nan", "inf", "overflow", "grad", "bias"])
def test_finite_sees_what_the_step_would_apply(bad):
    torch.manual_seed(3)
    W = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(300, 12), dim=1).T)  # W_enc's layout
    b_dec = torch.nn.Parameter(torch.zeros(12))
    idx, vals, dense = source(64, 4, 300, 12, 14)
    dense = dense.contiguous()
    if bad == "nan":
        dense[5, 3] = float("nan")
    elif bad == "inf":
        vals[7, 1] = float("inf")
    elif bad == "overflow":  # finite factors whose products sum past float32's range
        vals[:] = 1e30
        dense[:] = 1e30
    elif bad == "grad":
        W.grad = torch.zeros_like(W)
        W.grad[2, 9] = float("nan")
    sink = sparse_grads.SparseGrads()
    sink.add(W, idx, vals, dense)
    gb = torch.randn(300)
    if bad == "bias":
        gb[0] = float("inf")
    sink.add_bias(W, b_dec, gb)
    assert sink.finite() is (bad == "none")
    assert sink.holds(W)  # nothing consumed or written
    assert W.grad is None or bad == "grad"


def test_gradients_left_for_a_tensor_the_optimizer_does_not_hold_stop_the_run(monkeypatch):
    stray = torch.nn.Parameter(torch.randn(256, 16))
    real = TopKSAE.training_loss

    def leaky(self, x, state):
        out = real(self, x, state)
        idx = torch.arange(4).repeat(x.shape[0], 1)
        return out._replace(loss=out.loss + kernels.bag_sum(idx, torch.ones(x.shape[0], 4), stray,
                                                            state.grads).sum() * 0)

    monkeypatch.setattr(TopKSAE, "training_loss", leaky)
    sae = TopKSAE(TopKConfig(d_model=16, d_sae=256, k=4))
    with pytest.raises(SAEError, match="unapplied"):
        Trainer(sae, TrainConfig(total_tokens=64, batch_tokens=64, progress=False)).fit([torch.randn(64, 16)])


def test_applies_only_to_this_projects_plain_adam():
    p = torch.nn.Parameter(torch.randn(8, 4))
    assert optim.sparse_applies(optim.adam([p], lr=1e-3, betas=(0.9, 0.999)))
    assert not optim.sparse_applies(torch.optim.Adam([p], lr=1e-3))
    assert not optim.sparse_applies(optim.Adam([p], lr=1e-3, weight_decay=0.1))
    assert not optim.sparse_applies(optim.adam([torch.nn.Parameter(torch.randn(8, 4).double())], lr=1e-3,
                                               betas=(0.9, 0.999)))


def test_moments_in_another_layout_are_stepped_from_the_written_gradient():
    """Moments that do not have the parameter's strides (the fused kernel would pair the wrong elements): the kept
    gradient is written into ``.grad`` and torch's step takes it, as without a sink."""
    torch.manual_seed(4)
    idx, vals, dense = source(64, 4, 300, 12, 15)

    def stepped(kept: bool):
        W = torch.nn.Parameter(torch.randn(300, 12, generator=torch.Generator().manual_seed(16)).T)  # W_enc's layout
        opt = optim.adam([W], lr=1e-2, betas=(0.9, 0.999))
        opt.state[W].update(step=torch.tensor(2.0), exp_avg=torch.full((12, 300), 0.1),  # contiguous: not W's strides
                            exp_avg_sq=torch.full((12, 300), 0.01))
        sink = sparse_grads.SparseGrads()
        if kept:
            sink.add(W, idx, vals, dense)
        else:
            W.grad = kernels.scatter_rows(idx, vals, dense, 300).T
        opt.step(sparse=sink)
        assert not sink
        return W.detach()

    torch.testing.assert_close(stepped(True), stepped(False), rtol=0, atol=0)
