"""The trainer's Adam (fused where it runs): a step equals torch's default Adam's, also after a
checkpoint round trip that brings the moments back contiguous for a transposed parameter."""

from __future__ import annotations

import torch
from safetensors.torch import load, save

from saes import optim, resume


def params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    w_t = torch.nn.Parameter(torch.randn(40, 12).T)  # [12, 40] transposed, like TopK's W_enc
    b = torch.nn.Parameter(torch.randn(40))
    return [w_t, b]


def grads(ps, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in ps:  # autograd hands gradients over in the parameter's layout
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))


def run(make, steps: int, reload_at: int | None = None) -> list[torch.Tensor]:
    ps = params()
    opt = make(ps)
    for s in range(steps):
        if s == reload_at:  # a resume: the state goes through safetensors (contiguous) into a new optimizer
            tensors, meta = resume.optimizer_to_flat(opt, "opt.")
            tensors = load(save({k: v.contiguous() for k, v in tensors.items()}))
            opt = make(ps)
            resume.optimizer_from_flat(opt, tensors, meta, "opt.")
        grads(ps, s)
        opt.step()
    return [p.detach().clone() for p in ps]


def fused(ps):
    return optim.adam(ps, lr=0.1, betas=(0.9, 0.999))


def default(ps):
    return torch.optim.Adam(ps, lr=0.1, betas=(0.9, 0.999))


def test_the_trainer_uses_the_fused_kernel_on_cpu():
    assert fused(params()).param_groups[0]["fused"] is True
    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert not optim.fused_ok(meta)


def test_fused_steps_equal_the_default_adam_and_a_resume_is_bit_exact():
    ref = run(default, 6)
    for a, b in zip(run(fused, 6), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    whole = run(fused, 6)
    for a, b in zip(run(fused, 6, reload_at=3), whole):
        assert torch.equal(a, b)


def restored(make_saved):
    """(saved optimizer after one step, a fused one restored from its flat checkpoint, contiguous), params."""
    ps = params()
    opt = make_saved(ps)
    grads(ps, 0)
    opt.step()
    tensors, meta = resume.optimizer_to_flat(opt, "opt.")
    opt2 = fused(ps)
    resume.optimizer_from_flat(opt2, {k: v.contiguous() for k, v in tensors.items()}, meta, "opt.")
    return opt, opt2, ps


def test_restored_moments_get_the_parameter_strides():
    opt, opt2, ps = restored(fused)
    st = opt2.state[ps[0]]
    assert st["exp_avg"].stride() == ps[0].stride() == st["exp_avg_sq"].stride()
    torch.testing.assert_close(st["exp_avg"], opt.state[ps[0]]["exp_avg"], rtol=0, atol=0)


def test_a_checkpoint_of_the_default_kernel_resumes_on_the_fused_one():
    opt, opt2, ps = restored(default)
    assert opt.param_groups[0]["fused"] is not True
    assert opt2.param_groups[0]["fused"] is True


def test_training_gradients_come_in_the_parameter_layout():
    """The fused step is only right when every gradient has its parameter's strides; the trainer relies on
    autograd's gradient layout contract for that (TopK's W_enc is stored transposed)."""
    import saes
    from saes.losses import TrainState

    torch.manual_seed(0)
    sae = saes.build("topk", d_model=12, d_sae=40, k=4)
    assert not sae.W_enc.is_contiguous()
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True  # the AuxK path too
    sae.training_loss(torch.randn(32, 12), TrainState(global_rows=32, dead_mask=dead, workspace={})).loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad.stride() == p.stride(), name


def test_column_major_parameter_steps_like_torchs_fused_adam_bit_for_bit():
    """The trainer's Adam steps TopK's transposed ``W_enc`` through its row-major view (no copy in the fused
    kernel): the same values as torch's fused Adam, and every tensor keeps its layout between steps."""
    def plain(ps):
        return torch.optim.Adam(ps, lr=0.1, betas=(0.9, 0.999), fused=True)

    ours, ref = run(fused, 4), run(plain, 4)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    ps = params()
    opt = fused(ps)
    grads(ps, 0)
    opt.step()
    w = ps[0]
    assert w.shape == (12, 40) and w.stride() == (1, 12) and w.grad.stride() == (1, 12)
    assert opt.state[w]["exp_avg"].stride() == (1, 12) == opt.state[w]["exp_avg_sq"].stride()
    assert opt.step(lambda: torch.tensor(3.0)) == 3.0  # a closure runs before any parameter is transposed
