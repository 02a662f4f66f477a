"""The trainer's Adam: torch's fused kernel where it runs, with every tensor it reads in its parameter's layout.

``torch.optim.Adam(fused=True)`` steps each parameter in one kernel (a 9,216-latent, 576-wide SAE on a 2-core
CPU: 10.7 ms a step against 39 ms for the default ``foreach`` path, median of 21 steps; the same values to
float rounding, see ``tests/saes/test_optim.py``). The fused kernel reads the parameter, its gradient
and the two moment buffers as flat arrays in memory order: when one of them has other strides than the
parameter, it pairs the wrong elements without any error. Gradients from autograd always come in the
parameter's strides (torch's gradient layout contract, checked by the tests for TopK's transposed
``W_enc``); moments restored from a checkpoint come back contiguous, so :func:`align_layouts` gives them the
parameter's strides when :func:`saes.resume.optimizer_from_flat` loads them.

The fused CPU kernel also copies a parameter that is not row-major (TopK's ``W_enc``, the transpose of a
contiguous block) to a contiguous one and back on every step: 26 ms against 9.4 ms for a 36,864 x 576
parameter on 2 cores. :class:`Adam` steps such a parameter, its gradient and its moments through their
row-major transposes instead; Adam is elementwise, so the values are the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def fused_ok(params: Iterable[Tensor]) -> bool:
    """Whether torch's fused Adam runs on these parameters (floating point, on CPU or CUDA)."""
    return all(p.device.type in FUSED_DEVICES and p.dtype in FUSED_DTYPES for p in params)


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` that steps a 2-D parameter stored column-major through its row-major transpose
    (see the module docstring). Outside :meth:`step` parameters, gradients and moments keep their layouts."""

    def step(self, closure=None):  # noqa: D102
        loss = None
        if closure is not None:  # evaluated before any parameter is transposed
            with torch.enable_grad():
                loss = closure()
        flipped = [p for g in self.param_groups for p in g["params"] if _column_major(p)]
        for p in flipped:
            _transpose(p, self.state.get(p, {}))
        try:
            super().step()
        finally:
            for p in flipped:
                _transpose(p, self.state.get(p, {}))
        return loss


def _column_major(p: Tensor) -> bool:
    return p.grad is not None and p.dim() == 2 and not p.is_contiguous() and p.T.is_contiguous()


def _transpose(p: Tensor, state: dict) -> None:
    """Swap ``p``, its gradient and its parameter-shaped state for their transposes (views: no copy)."""
    shape, g = p.shape, p.grad
    p.grad = None
    p.data = p.data.T
    p.grad = g.T
    for key, v in state.items():
        if isinstance(v, Tensor) and v.shape == shape:
            state[key] = v.T


def adam(params: Iterable[Tensor], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """:class:`Adam`, fused where :func:`fused_ok` (else torch's default implementation)."""
    params = list(params)
    return Adam(params, lr=lr, betas=betas, fused=True if fused_ok(params) else None)


def align_layouts(opt: torch.optim.Optimizer) -> None:
    """Give every parameter-shaped optimizer state tensor its parameter's strides (a copy only where they
    differ; values unchanged)."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key, v in state.items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=v.dtype).copy_(v)  # keeps a dense tensor's strides


def keep_implementation(opt: torch.optim.Optimizer, groups: list[dict]) -> list[dict]:
    """Saved parameter groups with this optimizer's own choice of implementation (``fused``,
    ``foreach``): a checkpoint from a run with the other kernel resumes on the one this run picked."""
    keys = ("fused", "foreach")
    return [{**g, **{k: cur[k] for k in keys if k in cur}} for g, cur in zip(groups, opt.param_groups)]
