"""Weight gradients a training step keeps sparse, for the optimizer to make row by row as it steps.

A TopK step's weight gradients are sparse by latent: ``W_enc``'s row of latent ``l`` (in its ``[d_sae, d_model]``
layout) is the sum of ``g[b, j] * (x[b] - b_dec)`` over the entries ``(b, j)`` that picked ``l``, and ``W_dec``'s the
sum of ``vals[b, j] * grad_x_hat[b]``. Written out whole, each is a pass over a weight-sized matrix, and Adam reads it
back in another; ``b_dec``'s term ``-W_enc @ grad_b_enc`` is a third pass over ``W_enc``. Where the trainer hands
the step a :class:`SparseGrads` (``TrainState.grads``), the sparse backwards (:class:`saes.kernels.GatherPre`,
:class:`saes.kernels.BagSum`) record their entries here instead of returning a gradient for the weight, and
:meth:`saes.optim.Adam.step` makes each row's gradient as it steps that row (:func:`saes.native.sparse_adam`):
no weight gradient is written, and ``b_dec``'s term is summed in the same pass over ``W_enc``.

Inside the trainer's step (batch 1,024, 9,216 latents, 2-core AMD EPYC with AVX-512;
``benchmarks/sae_step_phases.py --grad-kernels sparse dense``, ``sae_step_phases_grads_b1024_avx512_run18.json``):
the gradients written whole take 1.072x the step's time (backward 5.1 → 1.1 ms, Adam 3.9 → 5.9 ms).

The gradients are those of autograd to float rounding: each row's entries in the same order, each use of a weight
summed apart and then added (``tests/saes/test_sparse_grads.py``). :meth:`SparseGrads.materialize` writes them
into ``.grad`` instead, for anything that needs them whole.

Where it applies (:func:`saes.optim.sparse_applies`): the compiled kernels built with OpenMP, float32 CPU
parameters, this project's Adam with plain settings. The trainer also leaves it out under ``torch.distributed``
(gradients are all-reduced whole). With ``nonfinite_guard="grads"`` the waiting gradients are checked by
:meth:`SparseGrads.finite`, made as the step will make them, so the guard does not change the step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saes import native


def rows_of(p: Tensor, t: Tensor | None = None) -> Tensor:
    """``t`` (default ``p``; a tensor of ``p``'s shape: its gradient, a moment) as ``p``'s ``[rows, width]``
    row-major matrix: a vector as one row, a 2-D ``p`` itself, or its transpose where ``p`` is stored as the
    transpose of a contiguous block (TopK's ``W_enc``); a view, no copy."""
    t = p if t is None else t
    return t.view(1, -1) if p.dim() == 1 else t if p.is_contiguous() else t.T


def takes(p: Tensor) -> bool:
    """Whether a weight's gradient can be kept here: a 2-D float32 CPU tensor, row-major or the transpose of a
    row-major block, with the compiled kernels built with OpenMP."""
    lib = native.library()
    return (p.dim() == 2 and p.device.type == "cpu" and p.dtype == torch.float32 and rows_of(p).is_contiguous()
            and lib is not None and bool(lib.native_openmp()))


class SparseGrads:
    """The entries of a step's sparse weight gradients, by parameter (see the module docstring).

    :meth:`add` records one use of a weight: ``rows_of(W)[l] += sum of vals[b, j] * dense[b]`` over the entries
    with ``idx[b, j] = l``. :meth:`add_bias` records ``b_dec.grad -= W_enc @ grad_b_enc`` for the pass over
    ``W_enc``. The optimizer consumes them (:meth:`take`); :meth:`clear` drops them (a step that is not applied)."""

    def __init__(self) -> None:
        self._sources: dict[Tensor, list[tuple[Tensor, Tensor, Tensor, Tensor]]] = {}
        self._bias: dict[Tensor, tuple[Tensor, Tensor]] = {}
        self._sorts: list[tuple[Tensor, int, int, Tensor, Tensor]] = []

    def add(self, W: Tensor, idx: Tensor, vals: Tensor, dense: Tensor) -> None:
        """Record one use of ``W`` (``idx`` ``[batch, k]`` int64, ``vals`` ``[batch, k]`` and ``dense``
        ``[batch, width]`` float32, kept until the step). An index sorted for an earlier use in this step (the
        encoder's and the decoder's share the top-k's) is not sorted again."""
        starts, order = self._sort(idx.contiguous(), rows_of(W).shape[0])
        self._sources.setdefault(W, []).append((starts, order, vals.detach().contiguous(), dense.detach()))

    def _sort(self, idx: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """:func:`saes.native.sort_by_latent` of ``idx``, kept with the tensor (held, so that its memory is not
        another's) and its version (an index written in place since is sorted again)."""
        for held, version, n, starts, order in self._sorts:
            if held is idx and version == idx._version and n == rows:
                return starts, order
        starts, order = native.sort_by_latent(idx, rows, "SparseGrads.add")
        self._sorts.append((idx, idx._version, rows, starts, order))
        return starts, order

    def add_bias(self, W_enc: Tensor, b_dec: Tensor, grad_b_enc: Tensor) -> None:
        """Record ``b_dec.grad -= W_enc @ grad_b_enc`` (summed with ``W_enc``'s step, from ``W_enc`` before it)."""
        if W_enc in self._bias:
            b, g = self._bias[W_enc]
            if b is not b_dec:
                raise ValueError("SparseGrads.add_bias: one W_enc with two different b_dec parameters")
            self._bias[W_enc] = (b, g + grad_b_enc)
        else:
            self._bias[W_enc] = (b_dec, grad_b_enc.detach().clone())

    def holds(self, p: Tensor) -> bool:
        """Whether ``p`` has entries waiting (its ``.grad`` holds only what autograd gave it besides)."""
        return p in self._sources

    def __bool__(self) -> bool:
        return bool(self._sources)

    def take(self, W: Tensor, keep: bool = False) -> tuple[list, Tensor | None, Tensor | None, Tensor | None]:
        """What :func:`saes.native.sparse_adam` makes ``W``'s gradient from: ``(sources, G, b_dec, grad_b_enc)``,
        with ``G`` what ``W.grad`` holds besides (as :func:`rows_of` ``W``, contiguous; None where it holds nothing)
        and ``b_dec`` the parameter whose ``b_dec`` term comes from ``W``'s pass, with its ``grad_b_enc`` (both
        None where there is none); removed from here unless ``keep``."""
        get = dict.get if keep else dict.pop
        sources, bias = get(self._sources, W), get(self._bias, W, None)
        if not self._sources:
            self._sorts.clear()
        G = rows_of(W, W.grad).contiguous() if W.grad is not None else None
        b_dec, gb = bias if bias is not None else (None, None)
        return sources, G, b_dec, gb.to(torch.float32).contiguous() if gb is not None else None

    @torch.no_grad()
    def finite(self) -> bool:
        """Whether every waiting gradient is finite: each row made as the step will make it (with what ``.grad``
        holds besides), and each ``b_dec`` term as the step will add it, bit for bit (``nonfinite_guard="grads"``;
        a pass over the entries and, for a ``b_dec`` term, over ``W_enc``; nothing is written)."""
        for W in self._sources:
            sources, G, _, gb = self.take(W, keep=True)
            rows = rows_of(W)
            ok, term = native.sparse_adam(rows, rows, rows, sources, G, lr=0.0, betas=(0.0, 0.0), eps=0.0, step=1.0,
                                          decoder=False, wb=gb, dry=True)
            if not ok or (term is not None and not bool(torch.isfinite(term).all())):
                return False
        return True

    def clear(self) -> None:
        """Drop every entry (a step that will not be applied)."""
        self._sources.clear()
        self._bias.clear()
        self._sorts.clear()

    @torch.no_grad()
    def materialize(self, params=None) -> None:
        """Write the waiting gradients into ``.grad`` (added to what is there) for ``params`` (default: all), as
        autograd would have: each use's product summed apart, then added; ``b_dec``'s term from ``W_enc`` as it
        is now."""
        for W in [p for p in list(self._sources) if params is None or any(p is q for q in params)]:
            sources, _, b_dec, gb = self.take(W)
            rows = rows_of(W)
            for source in sources:
                part = native.scatter_sorted(*source)
                g = part if rows is W else part.T
                W.grad = g if W.grad is None else W.grad + g
            if b_dec is not None:
                term = -(rows.T @ gb)
                b_dec.grad = term if b_dec.grad is None else b_dec.grad + term
