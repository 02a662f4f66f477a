"""saes.native: the compiled top-k picks the values torch.topk picks (ties, NaN, infinities, signed zeros, narrow and
wide rows, strided rows); the one-pass decoder step equals the three torch passes to float rounding and keeps
torch's optimizer state; the trainer gives the same SAE with and without the kernels; a failed build, a missing
compiler or INTERP_NATIVE=0 leave the torch paths with the reason in status()."""

from __future__ import annotations

import warnings

import pytest
import torch

from saes import kernels, native, optim
from saes.losses import normalize_rows, remove_parallel_grad

built = pytest.mark.skipif(native.library() is None, reason=f"saes.native not built here: {native.status()}")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A fresh library lookup building into an empty folder; the process's own lookup comes back afterwards."""
    monkeypatch.setenv("INTERP_NATIVE_DIR", str(tmp_path))
    native.reset()
    yield tmp_path
    monkeypatch.undo()
    native.reset()


def check_topk(pre: torch.Tensor, k: int) -> None:
    idx = native.topk(pre, k)
    assert idx.shape == (pre.shape[0], k) and idx.dtype == torch.long
    assert all(len(set(row.tolist())) == k for row in idx)  # distinct positions
    got = pre.gather(1, idx).sort(1, descending=True).values
    want = pre.topk(k, dim=-1).values
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@built
@pytest.mark.parametrize(("b", "d", "k"), [(1, 1, 1), (3, 7, 7), (5, 256, 8), (130, 4096, 32), (70, 9216, 32),
                                           (64, 2304, 64), (9, 1000, 3), (200, 16 * 64 + 5, 1), (33, 333, 300)])
def test_topk_picks_torch_topk_values(b, d, k):
    g = torch.Generator().manual_seed(b * d + k)
    check_topk(torch.randn(b, d, generator=g), k)
    check_topk(torch.randn(b, d, generator=g) * torch.rand(b, 1, generator=g) * 100, k)  # rows of other scales


@built
def test_topk_with_ties_nan_infinities_and_signed_zeros():
    g = torch.Generator().manual_seed(0)
    pre = torch.randint(-3, 4, (80, 4096), generator=g).float()  # every value tied thousands of times
    check_topk(pre, 32)
    check_topk(torch.zeros(4, 4096), 16)  # one value everywhere
    pre = torch.randn(40, 4096, generator=g)
    pre[3, 100] = pre[7, 5] = float("nan")
    pre[8, :50] = float("nan")
    pre[9, 17] = float("inf")
    pre[10, :] = float("-inf")
    pre[11, :] = -0.0
    pre[11, ::3] = 0.0
    check_topk(pre, 32)
    idx = native.topk(pre, 32)
    assert 100 in idx[3].tolist() and 5 in idx[7].tolist() and 17 in idx[9].tolist()  # NaN counts as largest
    assert set(range(32)) <= set(idx[8].tolist())
    pre = torch.full((5, 4096), float("-inf"))
    pre[0, ::300] = torch.randn(14, generator=g)  # fewer finite entries than k: the first bound falls below -inf
    pre[1] = 1 + torch.rand(4096, generator=g) * 1e-3  # every entry near the bound: all of them sorted out
    pre[2] = -1 - torch.rand(4096, generator=g)  # negative keys only
    pre[3] = torch.randn(4096, generator=g).abs() * 1e-40  # subnormals
    pre[4, 1000:] = torch.randn(3096, generator=g)
    check_topk(pre, 32)
    check_topk(pre, 1)


@built
def test_topk_on_strided_rows_and_the_trainer_dispatch():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(100, 5000, generator=g)
    check_topk(wide[:, :4096], 32)  # row stride 5,000
    check_topk(wide[::3, 100:4196], 32)
    pre = torch.randn(64, 4096, generator=g)
    assert torch.equal(kernels.topk_indices(pre, 32), native.topk(pre, 32))
    assert not native.topk_applies(pre.double(), 32) and not native.topk_applies(pre.T, 32)
    assert not native.topk_applies(pre[:0], 32) and not native.topk_applies(pre, 4097)
    with pytest.raises(ValueError, match="float32 CPU"):
        native.topk(pre.double(), 32)


def torch_steps(W0: torch.Tensor, grads: list[torch.Tensor], lr: float = 1e-2):
    p = torch.nn.Parameter(W0.clone())
    opt = optim.adam([p], lr, (0.9, 0.999))
    for step, g in enumerate(grads):
        p.grad = g.clone()
        remove_parallel_grad(p, unit_rows=step > 0)
        opt.step()
        normalize_rows(p)
    return p, opt


@built
def test_one_pass_decoder_step_equals_projection_adam_and_renorm():
    g = torch.Generator().manual_seed(2)
    W0 = torch.randn(300, 40, generator=g) * 3  # rows not unit norm before the first step
    grads = [torch.randn(300, 40, generator=g) for _ in range(25)]
    ref, ref_opt = torch_steps(W0, grads)
    p = torch.nn.Parameter(W0.clone())
    opt = optim.adam([p], 1e-2, (0.9, 0.999))
    for step, grad in enumerate(grads):
        p.grad = grad.clone()
        assert optim.unit_rows_applies(opt, p)
        opt.step(unit_rows={p: step > 0})
        assert torch.equal(p.grad, grad)  # left as it came
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(300), rtol=0, atol=1e-6)
    ours, theirs = opt.state[p], ref_opt.state[ref]
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-7)
    # a checkpoint's state dict loads into torch's path and steps on from there
    again = torch.nn.Parameter(p.detach().clone())
    opt2 = optim.adam([again], 1e-2, (0.9, 0.999))
    opt2.load_state_dict(opt.state_dict())
    assert float(opt2.state[again]["step"]) == 25


@built
def test_unit_rows_refuses_what_the_kernel_cannot_step():
    p = torch.nn.Parameter(torch.randn(20, 8))
    p.grad = torch.randn(20, 8)
    assert optim.unit_rows_applies(optim.adam([p], 1e-3, (0.9, 0.999)), p)  # plain settings: it applies
    for opt in (optim.Adam([p], lr=1e-3, weight_decay=0.1), optim.Adam([p], lr=1e-3, amsgrad=True),
                torch.optim.Adam([p], lr=1e-3)):
        assert not optim.unit_rows_applies(opt, p)
    q = torch.nn.Parameter(torch.randn(8, 20).T)  # not contiguous
    q.grad = torch.randn(20, 8)
    opt = optim.adam([q], 1e-3, (0.9, 0.999))
    assert not optim.unit_rows_applies(opt, q)
    with pytest.raises(ValueError, match="unit_rows_applies"):
        opt.step(unit_rows={q: True})


def train(seed: int, use_native: bool, monkeypatch) -> torch.nn.Module:
    from saes import TrainConfig, Trainer
    from saes.topk import TopKConfig, TopKSAE

    with monkeypatch.context() as m:
        if not use_native:
            m.setattr(native, "library", lambda: None)
        g = torch.Generator().manual_seed(seed)
        dictionary = torch.nn.functional.normalize(torch.randn(512, 32, generator=g), dim=1)
        codes = torch.rand(16 * 256, 512, generator=g) * (torch.rand(16 * 256, 512, generator=g) < 0.01)
        rows = codes @ dictionary
        torch.manual_seed(seed)
        sae = TopKSAE(TopKConfig(d_model=32, d_sae=4096, k=8))
        cfg = TrainConfig(batch_tokens=256, total_tokens=16 * 256, lr=1e-3, seed=seed, log_every=4, progress=False)
        Trainer(sae, cfg).fit([rows[i:i + 256] for i in range(0, len(rows), 256)])
    return sae


@built
def test_trainer_gives_the_same_sae_with_and_without_the_kernels(monkeypatch):
    a, b = train(0, True, monkeypatch), train(0, False, monkeypatch)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-4, msg=name)


def test_turned_off_and_no_compiler_leave_the_torch_paths(fresh, monkeypatch):
    monkeypatch.setenv("INTERP_NATIVE", "0")
    assert native.library() is None and "INTERP_NATIVE" in native.status()
    pre = torch.randn(8, 4096)
    assert not native.topk_applies(pre, 32)
    assert torch.equal(pre.gather(1, kernels.topk_indices(pre, 32)).sort(1).values,
                       pre.topk(32).values.sort(1).values)
    native.reset()
    monkeypatch.delenv("INTERP_NATIVE")
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.library() is None and "no C compiler" in native.status()


def test_a_failed_build_warns_once_and_leaves_nothing_behind(fresh, monkeypatch, tmp_path):
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: error: this compiler refuses' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    with pytest.warns(UserWarning, match="slower torch paths"):
        assert native.library() is None
    assert "refuses" in native.status()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None  # no second warning
    assert [f.name for f in fresh.iterdir()] == ["cc"]  # no half-written library


@built
def test_a_built_library_is_kept_and_found_again(fresh):
    assert native.library() is not None
    (lib,) = [f for f in fresh.iterdir() if f.name.startswith("saes-native-")]
    stamp = lib.stat().st_mtime_ns
    native.reset()
    assert native.library() is not None and lib.stat().st_mtime_ns == stamp
    assert str(lib) in native.status()


@built
@pytest.mark.parametrize(("b", "k", "d_sae", "m"), [(1024, 32, 9216, 64), (7, 3, 50, 5), (300, 8, 4096, 33)])
def test_scatter_rows_equals_the_csr_product(b, k, d_sae, m):
    g = torch.Generator().manual_seed(b + k)
    idx = torch.rand(b, d_sae, generator=g).topk(k, dim=1).indices  # distinct latents per row, as a top-k's
    vals = torch.randn(b, k, generator=g)
    dense = torch.randn(b, m + 3, generator=g)[:, :m]  # a row stride other than m
    got = native.scatter_rows(idx, vals, dense, d_sae)
    want = kernels.csr_matmul(kernels._sparse_t(idx, vals, d_sae), dense.contiguous())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unused = torch.ones(d_sae, dtype=torch.bool)
    unused[idx.reshape(-1)] = False
    assert (got[unused] == 0).all()
    assert torch.equal(kernels.scatter_rows(idx, vals, dense, d_sae), got)  # the backwards' dispatch
    with pytest.raises(ValueError, match="outside"):
        native.scatter_rows(idx.clamp_max(d_sae - 2) + 1, vals, dense, d_sae - 1)


@built
@pytest.mark.parametrize(("b", "k", "n", "m"), [(1024, 32, 9216, 64), (7, 3, 50, 5), (300, 8, 4096, 33)])
def test_gather_dot_equals_the_sampled_product(b, k, n, m):
    g = torch.Generator().manual_seed(b + k)
    idx = torch.rand(b, n, generator=g).topk(k, dim=1).indices
    grad = torch.randn(b, m + 3, generator=g)[:, :m]  # row strides other than m
    W = torch.randn(n, m + 2, generator=g)[:, :m]
    got = native.gather_dot(idx, grad, W)
    want = (W.double()[idx] * grad.double()[:, None, :]).sum(-1).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    crow = torch.arange(0, b * k + 1, k)
    pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.zeros(b * k), (b, n), check_invariants=False)
    sampled = torch.sparse.sampled_addmm(pattern, grad.contiguous(), W.T, beta=0.0).values().view(b, k)
    torch.testing.assert_close(got, sampled, rtol=1e-5, atol=1e-5)  # what the decoder's backward took before
    with pytest.raises(ValueError, match="outside"):
        native.gather_dot(idx.clamp_max(n - 2) + 1, grad, W[: n - 1])
    with pytest.raises(ValueError, match="gather_dot takes"):
        native.gather_dot(idx, grad.double(), W)


class NoOpenMP:
    """The built library as one without OpenMP would look: the Python threads split the rows."""

    def __init__(self, lib):
        self.lib = lib

    def native_openmp(self):
        return 0

    def __getattr__(self, name):
        return getattr(self.lib, name)


@built
def test_python_threads_split_rows_as_openmp_does(monkeypatch):
    g = torch.Generator().manual_seed(5)
    pre = torch.randn(700, 4096, generator=g)
    W, G = torch.nn.functional.normalize(torch.randn(700, 24, generator=g), dim=1), torch.randn(700, 24, generator=g)
    M, V = torch.zeros(700, 24), torch.zeros(700, 24)
    want_idx = native.topk(pre, 16)
    W1, M1, V1 = W.clone(), M.clone(), V.clone()
    native.unit_row_adam(W1, G, M1, V1, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, step=1, unit=True)
    lib = native.library()
    monkeypatch.setattr(native, "library", lambda: NoOpenMP(lib))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert torch.equal(native.topk(pre, 16), want_idx)
    native.unit_row_adam(W, G, M, V, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, step=1, unit=True)
    assert torch.equal(W, W1) and torch.equal(M, M1) and torch.equal(V, V1)


@built
def test_a_compiler_without_openmp_gives_the_kernels_without_it(fresh, monkeypatch, tmp_path):
    real = native._compiler()
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    lib = native.library()
    assert lib is not None and not lib.native_openmp() and "OpenMP" not in native.status()
    pre = torch.randn(300, 4096)
    check_topk(pre, 32)
    idx = pre.topk(8, dim=1).indices  # the sparse backward keeps the CSR products without OpenMP
    vals, dense = torch.randn(300, 8), torch.randn(300, 24)
    assert not native.sparse_applies(idx, vals, dense)
    with pytest.raises(ValueError, match="OpenMP"):
        native.scatter_rows(idx, vals, dense, 4096)
    assert torch.equal(kernels.scatter_rows(idx, vals, dense, 4096),
                       kernels.csr_matmul(kernels._sparse_t(idx, vals, 4096), dense))


@built
def test_the_portable_build_without_this_cpus_vector_instructions(fresh, monkeypatch, tmp_path):
    """Without ``-march=native`` (the set the build falls back to) an x86-64 build has no AVX2: the scalar paths of
    ``native.c``, which other CPUs (ARM) always take, are tested here."""
    real = native._compiler()
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && exit 1; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    assert native.library() is not None
    g = torch.Generator().manual_seed(7)
    for b, d, k in [(70, 9216, 32), (9, 1000, 3), (40, 16 * 64 + 5, 8), (5, 256, 8)]:
        check_topk(torch.randn(b, d, generator=g), k)
    pre = torch.randint(-3, 4, (30, 4096), generator=g).float()
    pre[2, 9] = float("nan")
    check_topk(pre, 32)
    idx = torch.rand(300, 4096, generator=g).topk(8, dim=1).indices
    vals, dense = torch.randn(300, 8, generator=g), torch.randn(300, 24, generator=g)
    torch.testing.assert_close(native.scatter_rows(idx, vals, dense, 4096),
                               kernels.csr_matmul(kernels._sparse_t(idx, vals, 4096), dense), rtol=1e-5, atol=1e-5)


@built
def test_topk_values_are_the_entries_at_its_positions():
    g = torch.Generator().manual_seed(8)
    pre = torch.randn(200, 9216, generator=g)
    pre[3, :100] = float("nan")  # a row counted over whole
    idx, vals = native.topk(pre, 32, values=True)
    assert torch.equal(idx, native.topk(pre, 32))
    assert torch.allclose(vals, pre.gather(1, idx), equal_nan=True, rtol=0, atol=0)
    i2, v2 = kernels.topk_indices(pre[:, :64].contiguous(), 8, values=True)  # the torch path's gather
    assert torch.allclose(v2, pre[:, :64].gather(1, i2), equal_nan=True, rtol=0, atol=0)
