"""Random controls: the same edit made in a random subspace, so every experiment's control is one call.

An edit that changes the model's output could do so because it moved the activation *somewhere
specific* or merely because it moved it *that far*. The control answers the second: a random subspace
of the same rank (inside a span you name, or anywhere), moved as much as the real edit moves it.

>>> edit = Rotate(circle, to=targets)                         # the circle edit
>>> control = random_control(edit, seed=0)                    # a random plane, turned by the same angles
>>> control = random_control(SetCoords(days, value=targets))  # a random rank-6 subspace, moved by the same norm
>>> with intervene(model, {site: control}, positions=...): ...

* :func:`random_subspace` / :func:`random_like` -- a random orthonormal basis of a given rank, inside
  ``span(within)`` when given (e.g. the span of the class means), with the subspace's origin.
* :func:`random_control` -- for :class:`~interp.edits.Rotate`, each row's point in the random plane
  (about the subspace's origin) is turned by the angle the real edit turns that row and put as far
  from the origin as the real edit puts it from the circle's center (an absolute ``radius``), or has
  its distance multiplied by the same factor (each row's own radius kept, times ``scale``);
  for any other edit, the real edit's displacement ``edit(x) - x`` is carried over to the random
  subspace: its coordinates in the edit's subspace become coordinates in the random one (same norm
  whenever the displacement lies in the edit's subspace), or, for edits without a subspace
  (``Steer``, ``Replace``), a random direction scaled to the displacement's norm.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from interp.edits import Edit, EditContext, Rotate, as_edit
from interp.errors import InputError
from interp.subspace import Subspace


def random_subspace(rank: int, d_model: int, *, within: Tensor | Subspace | None = None,
                    origin: Tensor | None = None, seed: int = 0) -> Subspace:
    """A random rank-`rank` subspace of ``R^d_model`` (Haar-distributed), inside ``span(within)`` when given.

    `within`: directions ``[k, d_model]`` (or a Subspace's basis) whose span holds the result; `rank`
    must not exceed the span's dimension. `origin` defaults to zero.
    """
    g = torch.Generator().manual_seed(seed)
    if within is None:
        if not 1 <= rank <= d_model:
            raise InputError(f"rank must be in [1, d_model={d_model}]; got {rank}")
        basis = torch.linalg.qr(torch.randn(d_model, rank, generator=g, dtype=torch.float64))[0].T
    else:
        w = (within.basis if isinstance(within, Subspace) else torch.as_tensor(within)).double().cpu()
        if w.dim() != 2 or w.shape[1] != d_model:
            raise InputError(f"within must be [k, d_model={d_model}] directions or a Subspace; got {tuple(w.shape)}")
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        span = vh[s > s.max() * 1e-8]  # an orthonormal basis of span(within)
        if not 1 <= rank <= len(span):
            raise InputError(f"rank {rank} does not fit in span(within), which has dimension {len(span)}; "
                             f"pass rank <= {len(span)} or a wider span")
        mix = torch.linalg.qr(torch.randn(len(span), rank, generator=g, dtype=torch.float64))[0]
        basis = mix.T @ span
    return Subspace(basis.float(), origin, name=f"random rank {rank} (seed {seed})", orthonormalize=False,
                    meta={"finder": "random", "seed": seed, "within_rank": None if within is None else int(
                        torch.linalg.matrix_rank(basis.double()))})


def random_like(subspace: Subspace, *, within: Tensor | Subspace | None = None, seed: int = 0) -> Subspace:
    """A random subspace with `subspace`'s rank and origin (no coordinate map)."""
    return random_subspace(subspace.rank, subspace.d_model, within=within, origin=subspace.origin, seed=seed)


class RandomControl(Edit):
    """`edit` made in a random subspace of the same rank: see :func:`random_control`."""

    def __init__(self, edit, *, seed: int = 0, within: Tensor | Subspace | None = None):
        self.edit = as_edit(edit)
        self.seed, self.within = seed, within
        sub = getattr(self.edit, "subspace", None)
        self.random = None if sub is None else random_like(sub, within=within, seed=seed)

    def _random(self, d_model: int) -> Subspace:
        if self.random is None:  # an edit without a subspace: one random direction, made on first use
            self.random = random_subspace(1, d_model, within=self.within, seed=self.seed)
        return self.random

    def __call__(self, x: Float[Tensor, "... d_model"], ctx: EditContext) -> Float[Tensor, "... d_model"]:
        rand = self._random(x.shape[-1])
        b = rand.basis.to(device=x.device, dtype=x.dtype)
        e = self.edit
        if isinstance(e, Rotate):
            uw = e.circle_coords(x)
            theta, target = e.thetas(uw, ctx, x)
            if theta is None and e.scale == 1.0 and e.radius is None:
                return x.clone()
            if theta is None:
                theta = torch.zeros_like(uw[..., 0])
            # the real edit's distances from the center, in plane coordinates (a probe's map is elliptical)
            axes = torch.eye(2, dtype=x.dtype, device=x.device) if e.axes is None else e.axes.to(x)
            old = (uw @ axes.T).norm(dim=-1)
            new = (e.turn(uw, theta, target) @ axes.T).norm(dim=-1)
            r = rand.project(x)[..., :2]
            # turn the random plane's point by the same angle; put it as far out as the real result
            # (absolute radius rule) or scale its distance by the same factor (each row's own radius)
            f = new / r.norm(dim=-1).clamp_min(1e-12) if e.radius is not None else new / old.clamp_min(1e-12)
            cos, sin = torch.cos(theta) * f, torch.sin(theta) * f
            turned = torch.stack([r[..., 0] * cos - r[..., 1] * sin, r[..., 0] * sin + r[..., 1] * cos], -1)
            return x + (turned - r) @ b[:2]
        delta = e(x, ctx) - x
        sub = getattr(e, "subspace", None)
        if sub is not None:  # the displacement's coordinates in the edit's subspace, carried over
            coords = delta @ sub.basis.to(device=x.device, dtype=x.dtype).T
            return x + coords @ b
        return x + delta.norm(dim=-1, keepdim=True) * b[0]

    def __repr__(self) -> str:
        return f"RandomControl({self.edit!r}, seed={self.seed})"


def random_control(edit, *, seed: int = 0, within: Tensor | Subspace | None = None) -> RandomControl:
    """The control of `edit`: the same edit made in a random subspace of the same rank.

    Args:
        edit: the real edit (``Rotate``, ``SetCoords``, ``ProjectOut``, ``Patch``, ``Steer``, ...).
        seed: seed of the random subspace (average several seeds for a stable control).
        within: directions ``[k, d_model]`` or a Subspace whose span holds the random subspace (e.g.
            the class means minus their mean, for a control inside the span the classes occupy);
            None: anywhere in the residual stream.
    """
    return RandomControl(edit, seed=seed, within=within)
