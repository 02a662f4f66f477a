"""The encoder matmul's oneDNN path (CPU, float32): equal to ``addmm`` to float rounding, in training (sparse
TopK kernels against dense autograd) and at inference (``encode_pre``), taken only where it applies on a CPU that
prefers it (AVX-512; the tests below force that choice so they run on any CPU), and replaced by ``addmm`` with one
warning when the kernel fails."""

from __future__ import annotations

import pytest
import torch

import saes
from saes import kernels
from saes.losses import TrainState

B, D_MODEL, D_SAE, K = 256, 64, 512, 16  # 2*B*D_MODEL*D_SAE = 1.7e7 flops: over ONEDNN_MIN_FLOPS
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture
def onednn_chosen(monkeypatch):
    """This CPU prefers oneDNN, whatever its vector units (see :func:`saes.kernels.prefer_onednn`)."""
    monkeypatch.setattr(kernels, "prefer_onednn", lambda: True)


def make(**kw) -> saes.SAE:
    torch.manual_seed(0)
    sae = saes.build("topk", d_model=D_MODEL, d_sae=D_SAE, k=K, **kw)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    return sae


@needs_onednn
def test_onednn_matmul_equals_addmm_where_it_applies(onednn_chosen):
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


@pytest.mark.parametrize(("capability", "chosen"), [("AVX512", True), ("AVX512_BF16", True), ("AVX2", False),
                                                   ("DEFAULT", False)])
def test_onednn_is_chosen_on_avx512_cpus_only(monkeypatch, capability, chosen):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert kernels.prefer_onednn() is chosen
    sae = make()
    x = torch.randn(B, D_MODEL)
    assert kernels.onednn_ok(x, sae.W_enc) is (chosen and kernels.onednn_applies(x, sae.W_enc))


def test_without_onednn_the_matmul_is_addmm_into_the_workspace(monkeypatch):
    monkeypatch.setattr(kernels, "prefer_onednn", lambda: False)
    sae = make()
    ws: dict = {}
    with torch.no_grad():
        x = torch.randn(B, D_MODEL)
        first = kernels.encoder_matmul(x, sae.W_enc, sae.b_enc, ws)
        assert first.data_ptr() == ws["pre"].data_ptr()
        assert torch.equal(first, torch.addmm(sae.b_enc, x, sae.W_enc))  # the same kernel: the same sums
        again = kernels.encoder_matmul(x + 1, sae.W_enc, sae.b_enc, ws)
        assert again.data_ptr() == first.data_ptr()  # the buffer is reused, not reallocated


@needs_onednn
def test_encode_pre_without_grad_equals_the_autograd_path(onednn_chosen):
    sae = make()
    x = torch.randn(2, B // 2, D_MODEL)  # leading dims are kept
    with torch.no_grad():
        fast = sae.encode_pre(x)
    slow = sae.encode_pre(x)  # parameters require grad: the plain matmul, differentiable
    assert slow.requires_grad and not fast.requires_grad and fast.shape == (2, B // 2, D_SAE)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_sparse_training_step_on_onednn_matches_dense_autograd(onednn_chosen):
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


@pytest.mark.parametrize("d", [4096, 9216])  # 256 groups: one step to the kept groups; 576: two (top_groups)
@pytest.mark.parametrize("data", ["continuous", "ties", "negative"])
def test_two_level_topk_picks_the_values_torch_topk_picks(data, d):
    torch.manual_seed(0)
    b, k = 64, 32
    if data == "ties":  # many rows have more than k kept entries at the k-th group maximum: the second topk runs
        pre = torch.randint(0, 6, (b, d)).float()
    else:
        pre = torch.randn(b, d) - (50.0 if data == "negative" else 0.0)
    idx = kernels.two_level_topk(pre, k)
    assert idx.shape == (b, k)
    assert all(len(set(row)) == k for row in idx.tolist())  # k distinct positions per row
    want = pre.topk(k, dim=-1).values
    torch.testing.assert_close(pre.gather(1, idx).sort(1, descending=True).values, want, rtol=0, atol=0)
    if data == "continuous":  # no ties: the very same positions
        assert torch.equal(idx.sort(1).values, pre.topk(k, dim=-1).indices.sort(1).values)


def test_two_level_topk_mixes_exact_rows_and_rows_needing_a_second_topk():
    torch.manual_seed(1)
    pre = torch.randn(8, 8192)
    pre[::2] = pre[::2].round()  # ties at the k-th group maximum in the even rows only
    idx = kernels.two_level_topk(pre, 16)
    torch.testing.assert_close(pre.gather(1, idx).sort(1).values, pre.topk(16, dim=-1).values.sort(1).values,
                               rtol=0, atol=0)


@pytest.mark.parametrize(("g", "k"), [(576, 32), (2304, 64), (256, 32), (100, 8)])
@pytest.mark.parametrize("data", ["continuous", "ties"])
def test_top_groups_picks_the_largest_maxima(g, k, data):
    torch.manual_seed(2)
    gm = torch.randn(200, g) if data == "continuous" else torch.randint(0, 8, (200, g)).float()
    sel, m = kernels.top_groups(gm, k)
    assert sel.shape == (200, k) and m.shape == (200, 1)
    assert all(len(set(row)) == k for row in sel.tolist())
    want = gm.topk(k, dim=-1).values
    torch.testing.assert_close(gm.gather(1, sel).sort(1, descending=True).values, want, rtol=0, atol=0)
    torch.testing.assert_close(m, want[:, -1:], rtol=0, atol=0)


def test_narrow_rows_go_to_torch_topk():
    pre = torch.randn(4, 1024)
    assert torch.equal(kernels.two_level_topk(pre, 8), pre.topk(8, dim=-1, sorted=False).indices)


def sparse_rows(b: int, k: int, d_sae: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(idx, vals, W)``: ``k`` distinct latents per row of ``b``, their values and a decoder, both requiring grad."""
    torch.manual_seed(seed)
    idx = torch.stack([torch.randperm(d_sae)[:k] for _ in range(b)])
    return idx, torch.rand(b, k, requires_grad=True), torch.randn(d_sae, d, requires_grad=True)


@pytest.mark.parametrize("k", [1, 7])
def test_bag_sum_and_its_gradients_equal_embedding_bag(k):
    idx, vals, W = sparse_rows(50, k, 300, 24, 0)
    g = torch.randn(50, 24)
    out = kernels.BagSum.apply(idx, vals, W)
    got = torch.autograd.grad(out, (vals, W), g)
    ref_out = torch.nn.functional.embedding_bag(idx, W, per_sample_weights=vals, mode="sum")
    want = torch.autograd.grad(ref_out, (vals, W), g)
    torch.testing.assert_close(out, ref_out)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
    # only the values' gradient asked for (a frozen decoder)
    (gv,) = torch.autograd.grad(kernels.BagSum.apply(idx, vals, W.detach()), (vals,), g)
    torch.testing.assert_close(gv, want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (saes.native.library() and saes.native.library().native_openmp()),
                    reason="saes.native is not built with OpenMP here")
@pytest.mark.parametrize("k", [1, 8, 40])
def test_sparse_fvu_and_its_gradients_equal_the_decode_and_loss_by_autograd(k):
    b, d_sae, d = 70, 300, 24
    idx, vals, W = sparse_rows(b, k, d_sae, d, 1)
    b_dec = torch.randn(d, requires_grad=True)
    x = torch.randn(b, d + 3)[:, :d]  # a row stride other than d
    tv = torch.tensor(37.5)
    assert kernels.sparse_fvu_applies(idx, W, x)
    loss, x_hat = kernels.sparse_fvu(idx, vals, W, b_dec, x, tv)
    assert type(loss.grad_fn).__name__ == "SparseFVUBackward" and not x_hat.requires_grad
    got = torch.autograd.grad(3 * loss, (vals, W, b_dec))
    ref_hat = torch.nn.functional.embedding_bag(idx, W, per_sample_weights=vals, mode="sum") + b_dec
    ref = (ref_hat - x).pow(2).sum() / tv
    want = torch.autograd.grad(3 * ref, (vals, W, b_dec))
    torch.testing.assert_close(x_hat, ref_hat.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, a, w in zip(("vals", "W", "b_dec"), got, want):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="outside"):
        saes.native.sparse_fvu(idx + d_sae, vals.detach(), W.detach(), b_dec.detach(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps the torch ops
        assert not kernels.sparse_fvu_applies(idx, W, x)


def test_bag_sum_takes_the_sparse_backward_in_float32_on_cpu():
    W = torch.randn(64, 8, requires_grad=True)
    vals = torch.rand(16, 4, requires_grad=True)
    idx = torch.randint(0, 64, (16, 4))  # one entry per latent: sparse rows take it too
    assert type(kernels.bag_sum(idx, vals, W).grad_fn).__name__ == "BagSumBackward"
    W64 = W.detach().double().requires_grad_()
    assert "EmbeddingBag" in type(kernels.bag_sum(idx, vals, W64).grad_fn).__name__


@needs_onednn
def test_sparse_training_step_with_wide_rows_matches_dense_autograd(onednn_chosen):
    """4,096 latents: the two-level top-k in the step, with ``BagSum`` at a quarter of an entry per latent."""
    kw = dict(d_model=32, d_sae=4096, k=8)
    torch.manual_seed(0)
    a = saes.build("topk", sparse_kernels=True, **kw)
    torch.manual_seed(0)
    b = saes.build("topk", sparse_kernels=False, **kw)
    x = torch.randn(128, 32)
    dead = torch.zeros(4096, dtype=torch.bool)
    dead[::5] = True
    for s in (a, b):
        s.training_loss(x, TrainState(global_rows=128, dead_mask=dead, workspace={})).loss.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_csr_matmul_equals_the_csr_product_and_ignores_what_out_held():
    torch.manual_seed(0)
    idx = torch.randn(64, 512).topk(8, dim=1).indices
    st = kernels._sparse_t(idx, torch.randn(64, 8), 512)
    dense = torch.randn(64, 24)
    want = st @ dense
    assert torch.equal(kernels.csr_matmul(st, dense), want)
    garbage = torch.full((512, 24), float("nan"))  # an uninitialised output may hold anything
    assert torch.equal(kernels.csr_matmul(st, dense, out=garbage), want)


def test_parallel_grad_removal_with_unit_rows_matches_the_general_one():
    from saes.losses import normalize_rows, remove_parallel_grad

    torch.manual_seed(0)
    grads = {}
    for unit in (False, True):
        W = torch.nn.Parameter(torch.randn(300, 40))
        normalize_rows(W)
        W.grad = torch.randn(300, 40)
        remove_parallel_grad(W, unit_rows=unit)
        grads[unit] = W.grad
        assert torch.linalg.vecdot(W.grad, W).abs().max() < 1e-5  # what is left is orthogonal to each row
        torch.manual_seed(0)
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=1e-6)
    # rows of other norms: unit_rows=False divides by them
    W = torch.nn.Parameter(3 * torch.randn(5, 7))
    W.grad = torch.randn(5, 7)
    remove_parallel_grad(W)
    assert torch.linalg.vecdot(W.grad, W).abs().max() < 1e-4


@pytest.mark.parametrize("unit", [False, True])
def test_parallel_grad_removal_in_row_blocks_is_the_whole_decoder_formula_bit_for_bit(unit, monkeypatch):
    from saes import losses

    monkeypatch.setattr(losses, "PROJECTION_ROWS", 64)  # 300 rows: four whole blocks and a part
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(300, 40))
    losses.normalize_rows(W)
    if not unit:
        with torch.no_grad():
            W.mul_(torch.rand(300, 1) + 0.5)  # rows of other norms
    grad = torch.randn(300, 40)
    W.grad = grad.clone()
    losses.remove_parallel_grad(W, unit_rows=unit)
    with torch.no_grad():
        coef = torch.linalg.vecdot(grad, W)
        if not unit:
            coef /= torch.linalg.vecdot(W, W).clamp_min(1e-24)
        want = grad.addcmul(W, coef[:, None], value=-1)
    assert torch.equal(W.grad, want)
