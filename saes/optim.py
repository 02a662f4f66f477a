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

from saes import native, sparse_grads
from saes.sparse_grads import rows_of

FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def fused_ok(params: Iterable[Tensor]) -> bool:
    """Whether torch's fused Adam runs on these parameters (floating point, on CPU or CUDA)."""
    return all(p.device.type in FUSED_DEVICES and p.dtype in FUSED_DTYPES for p in params)


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` that steps a 2-D parameter stored column-major through its row-major transpose
    (see the module docstring). Outside :meth:`step` parameters, gradients and moments keep their layouts."""

    def step(self, closure=None, *, unit_rows: dict[Tensor, bool] | None = None, sparse=None):
        """Adam's step. ``unit_rows`` maps decoder parameters whose rows are kept at unit norm (each where
        :func:`unit_rows_applies`, or whose gradient waits in ``sparse``) to whether their rows have unit norm now:
        each is stepped by :func:`saes.native.unit_row_adam` in one pass (the gradient's component along each row
        removed, Adam's step, each row renormalised: what :func:`saes.losses.remove_parallel_grad`, this step and
        :func:`saes.losses.normalize_rows` do in three), with the same state (``step``, ``exp_avg``,
        ``exp_avg_sq``) as torch keeps; its ``.grad`` is left as it came.

        ``sparse`` (a :class:`saes.sparse_grads.SparseGrads`): the parameters whose gradients wait there are
        stepped first by :func:`saes.native.sparse_adam`, each row's gradient made as the row is stepped (added to
        what ``.grad`` holds), with a ``b_dec`` term added to that parameter's ``.grad`` before torch's step;
        ``sparse`` is left empty. Where :func:`sparse_applies` does not hold, the gradients are written
        into ``.grad`` first (:meth:`~saes.sparse_grads.SparseGrads.materialize`) and stepped as usual."""
        loss = None
        if closure is not None:  # evaluated before any parameter is transposed
            with torch.enable_grad():
                loss = closure()
        unit_rows = dict(unit_rows or {})
        if sparse:
            kept = [p for g in self.param_groups for p in g["params"] if sparse.holds(p)]
            if sparse_applies(self) and all(sparse_grads.takes(p) and _moments_aligned(self, p) for p in kept):
                for p in kept:
                    self._sparse_step(p, *sparse.take(p), unit=unit_rows.pop(p, None))
                for p in [p for g in self.param_groups for p in g["params"]
                          if p.grad is not None and p not in unit_rows and _vector_applies(self, p)]:
                    # the biases: in the same kernel, not through torch's step for a few vectors
                    self._sparse_step(p, [], rows_of(p, p.grad), None, None)
            else:
                sparse.materialize()
        for p in unit_rows:
            if not unit_rows_applies(self, p):
                raise ValueError(f"unit_rows got a parameter the one-pass kernel cannot step ({tuple(p.shape)}, "
                                 f"{p.dtype}, {p.device}); check unit_rows_applies first and step it as usual")
        held = {p: p.grad for p in unit_rows}
        flipped = [p for g in self.param_groups for p in g["params"] if _column_major(p) and p not in held]
        for p in held:
            p.grad = None  # torch's step skips it
        for p in flipped:
            _transpose(p, self.state.get(p, {}))
        try:
            if any(p.grad is not None for g in self.param_groups for p in g["params"]):
                super().step()
        finally:
            for p in flipped:
                _transpose(p, self.state.get(p, {}))
            for p, g in held.items():
                p.grad = g
        for p, unit in unit_rows.items():
            self._unit_row_step(p, unit)
        return loss

    def _state_of(self, p: Tensor) -> dict:
        """``p``'s state, set up as torch's Adam sets it up where empty (a float32 step count on the parameter's
        device, moments in the parameter's layout)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def _unit_row_step(self, p: Tensor, unit: bool) -> None:
        group = _group_of(self, p)
        state = self._state_of(p)
        state["step"] += 1
        native.unit_row_adam(p, p.grad, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"], betas=group["betas"],
                             eps=group["eps"], step=float(state["step"]), unit=unit)

    @torch.no_grad()
    def _sparse_step(self, p: Tensor, sources: list, G: Tensor | None, b_dec: Tensor | None, gb: Tensor | None, *,
                     unit: bool | None = None) -> None:
        """Step ``p`` by :func:`saes.native.sparse_adam` from the gradient made of ``sources`` and ``G`` (what
        :meth:`saes.sparse_grads.SparseGrads.take` gives; a decoder where ``unit`` is not None), leaving ``.grad``
        None so that torch's step skips it; ``b_dec``'s term (from ``gb``) goes into its ``.grad``."""
        group = _group_of(self, p)
        state = self._state_of(p)
        state["step"] += 1
        term = native.sparse_adam(rows_of(p), rows_of(p, state["exp_avg"]), rows_of(p, state["exp_avg_sq"]), sources,
                                  G, lr=group["lr"], betas=group["betas"], eps=group["eps"], step=float(state["step"]),
                                  decoder=unit is not None, unit=bool(unit), wb=gb)
        p.grad = None
        if b_dec is not None:
            b_dec.grad = -term if b_dec.grad is None else b_dec.grad.sub_(term)


def unit_rows_applies(opt: torch.optim.Optimizer, p: Tensor) -> bool:
    """Whether :meth:`Adam.step` can take ``p`` in ``unit_rows``: the compiled kernels are built
    (:func:`saes.native.library`), ``opt`` is this module's :class:`Adam` holding ``p`` in a group with plain
    settings (no weight decay, amsgrad, maximize, differentiable or capturable step; float ``lr`` and ``betas``),
    and ``p``, its gradient and any moments are contiguous float32 CPU tensors of one 2-D shape.

    Against the three torch passes it replaces (9,216 x 576 in float32, 2-core AMD EPYC with AVX2, ad hoc): 3.4-3.7
    against 8.3-8.7 ms; inside the trainer's batch-1,024 step 7.0 against 12.1 ms with the rest of the optimizer's
    work (``experiments/README.md``, SAE training run 15)."""
    if not isinstance(opt, Adam) or p.grad is None or p.dim() != 2:
        return False
    group = _group_of(opt, p)
    if group is None or not plain_group(group):
        return False
    state = opt.state.get(p, {})
    moments = [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
    if state and (len(moments) != 2 or "step" not in state):
        return False
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and t.shape == p.shape
                for t in (p, p.grad, *moments))
            and native.library() is not None)


def sparse_applies(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` can step weights whose gradients wait in a :class:`saes.sparse_grads.SparseGrads`: this
    module's :class:`Adam` with plain settings in every group (:func:`plain_group`), every parameter float32 on CPU,
    and the compiled kernels built with OpenMP."""
    lib = native.library()
    return (isinstance(opt, Adam) and lib is not None and bool(lib.native_openmp())
            and all(plain_group(g) for g in opt.param_groups)
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for g in opt.param_groups
                    for p in g["params"]))


def _vector_applies(opt: torch.optim.Optimizer, p: Tensor) -> bool:
    """Whether :meth:`Adam.step` steps ``p`` in its own kernel beside the sparse steps: a contiguous float32 CPU
    vector of at most :data:`VECTOR_MAX` entries with a contiguous gradient and moments (one row: one thread)."""
    state = opt.state.get(p, {})
    return (p.dim() == 1 and p.numel() <= VECTOR_MAX and p.device.type == "cpu" and p.dtype == torch.float32
            and p.is_contiguous() and p.grad.is_contiguous() and p.grad.dtype == torch.float32
            and all(state[k].is_contiguous() for k in ("exp_avg", "exp_avg_sq") if k in state))


VECTOR_MAX = 1 << 17
"""Vectors up to this size are stepped by :func:`saes.native.sparse_adam` beside the sparse steps (a TopK SAE's
``b_enc`` and ``b_dec``), in place of torch's step for them alone."""


def _moments_aligned(opt: torch.optim.Optimizer, p: Tensor) -> bool:
    """Whether ``p``'s Adam moments (if any yet) are laid out as ``p`` (what :func:`align_layouts` ensures)."""
    state = opt.state.get(p, {})
    return all(rows_of(p, state[k]).is_contiguous() for k in ("exp_avg", "exp_avg_sq") if k in state)


def plain_group(group: dict) -> bool:
    """Whether a parameter group has the settings the compiled steps take: no weight decay, amsgrad, maximize,
    differentiable or capturable step; float ``lr`` and ``betas``."""
    return not (group.get("weight_decay") or group.get("amsgrad") or group.get("maximize")
                or group.get("differentiable") or group.get("capturable") or group.get("decoupled_weight_decay")
                or not isinstance(group["lr"], float) or not all(isinstance(b, float) for b in group["betas"]))


def _group_of(opt: torch.optim.Optimizer, p: Tensor) -> dict | None:
    """The parameter group holding ``p`` (None where ``opt`` does not hold it)."""
    return next((g for g in opt.param_groups if any(q is p for q in g["params"])), None)


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


def adam(params: Iterable[Tensor] | Iterable[dict], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """:class:`Adam`, fused where :func:`fused_ok` (else torch's default implementation). ``params``: tensors, or
    parameter groups (dicts with ``"params"`` and optionally their own ``"lr"``), as torch's optimizers take."""
    params = list(params)
    tensors = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    return Adam(params, lr=lr, betas=betas, fused=True if fused_ok(tensors) else None)


def param_groups(model: torch.nn.Module, lr: float, factors: dict[str, float]) -> list[dict]:
    """``model``'s parameters as Adam parameter groups: one at ``lr`` for every parameter not named in ``factors``
    or whose factor is 1, then one per other named parameter at ``lr`` times its factor (a name ``model`` does not
    have is an error). A run whose factors are all 1 has the one group a run without factors has, so its
    checkpoints resume either way."""
    named = dict(model.named_parameters())
    unknown = sorted(set(factors) - set(named))
    if unknown:
        raise ValueError(f"lr factors name parameters {unknown} that {type(model).__name__} does not have "
                         f"(it has {sorted(named)})")
    factors = {n: float(f) for n, f in factors.items() if f != 1}
    rest = [p for n, p in named.items() if n not in factors]
    own = [{"params": [named[n]], "lr": lr * f} for n, f in factors.items()]
    return [{"params": rest}, *own] if rest else own


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
