"""Distributed alignment search: learn a low-rank subspace whose interchange moves the model's output.

:class:`RotatedPatch` is an :class:`~interp.edits.Edit` with a trainable ``[rank, d_model]`` matrix
``W`` kept orthonormal (``torch.nn.utils.parametrizations.orthogonal``); it swaps the subspace
component of the base activation for the source's: ``x + (src @ W.T - x @ W.T) @ W``.
:func:`fit_das` learns ``W`` by gradient descent so that the edited base run predicts given labels
(usually the source run's answer), with the model's own weights frozen.

>>> das = fit_das(model, "blocks.8.hook_resid_post", base, source, labels, rank=2, steps=200)
>>> das.subspace()                           # a Subspace for every other edit and for saving
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal
from tqdm.auto import tqdm

from interp.capture import capture, last_token_index
from interp.edits import Edit, EditContext, per_row
from interp.errors import InputError
from interp.intervene import intervene
from interp.subspace import Subspace


class RotatedPatch(nn.Module, Edit):
    """Interchange within a learned orthonormal rank-``rank`` subspace."""

    def __init__(self, d_model: int, rank: int, *, seed: int = 0):
        super().__init__()
        if not 1 <= rank <= d_model:
            raise InputError(f"rank must be in [1, d_model={d_model}]; got {rank}")
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(d_model, rank, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.linalg.qr(torch.randn(d_model, rank, generator=g))[0].T)
        orthogonal(self.proj, "weight")
        self.source: Tensor | None = None

    @property
    def W(self) -> Float[Tensor, "rank d_model"]:
        return self.proj.weight

    def set_source(self, source: Float[Tensor, "batch d_model"]) -> RotatedPatch:
        """Source activations, one per base row (e.g. the source prompt's last token)."""
        self.source = source.detach()
        return self

    def __call__(self, x: Tensor, ctx: EditContext) -> Tensor:  # type: ignore[override]
        if self.source is None:
            raise InputError("RotatedPatch has no source: call set_source(acts) before the forward pass")
        w = self.W.to(x)
        src = per_row(self.source, ctx, x)
        return x + (src @ w.T - x @ w.T) @ w

    def subspace(self, name: str = "das") -> Subspace:
        return Subspace(self.W.detach().float().cpu(), name=name, orthonormalize=False)


def fit_das(model: nn.Module, site: str, base: dict[str, Tensor], source: dict[str, Tensor],
            labels: Int[Tensor, " batch"], *, rank: int = 1, steps: int = 100, lr: float = 1e-2,
            batch_size: int | None = None, seed: int = 0, progress: bool | None = None) -> RotatedPatch:
    """Learn a :class:`RotatedPatch` at `site` (edited at the last real token of each base row).

    Args:
        base, source: tokenizer outputs (``input_ids``, ``attention_mask``) with paired rows.
        labels: the token each edited base row should predict at its last position.
        rank: dimension of the learned subspace.
        steps: optimisation steps (Adam, lr `lr`), each over a minibatch of `batch_size` rows.
    """
    n = base["input_ids"].shape[0]
    if source["input_ids"].shape[0] != n or labels.shape[0] != n:
        raise InputError(f"base ({n} rows), source ({source['input_ids'].shape[0]}) and labels "
                         f"({labels.shape[0]}) must pair up row by row")
    device = next(model.parameters()).device
    src = capture(model, source, site, positions="last")[site].float()
    das = RotatedPatch(src.shape[-1], rank, seed=seed).to(device)
    opt = torch.optim.Adam(das.parameters(), lr=lr)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    bs = batch_size or n
    try:
        for _ in tqdm(range(steps), desc="das", disable=not progress):
            idx = torch.randperm(n, generator=g)[:bs]
            batch = {k: v[idx].to(device) for k, v in base.items() if isinstance(v, Tensor)}
            das.set_source(src[idx].to(device))
            with intervene(model, {site: das}, positions="last"):
                logits = model(**batch).logits
            last = last_token_index(batch["attention_mask"])
            loss = nn.functional.cross_entropy(logits[torch.arange(len(idx), device=device), last].float(),
                                               labels[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    das.set_source(src.to(device))
    return das
