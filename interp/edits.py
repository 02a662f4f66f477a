"""Edits: small math objects ``edit(x, ctx) -> new x`` applied to the selected rows of a site.

``x`` is ``[..., d_model]`` (the selected rows ``[n, d_model]``, or the whole ``[batch, seq,
d_model]`` when every position is edited) and ``ctx`` (:class:`EditContext`) says which batch
row and absolute position each row of ``x`` is, so per-row values (a patch source, a target
angle per prompt) line up. Every edit returns a new tensor (autograd flows through it) and an
edit that changes nothing returns values bitwise equal to its input.

>>> ProjectOut(sub)                       # remove the in-subspace part (idempotent)
>>> Steer(v, alpha=4.0)                   # x + alpha * v
>>> Patch(source_acts, subspace=sub)      # the subspace component taken from a source run
>>> SetCoords(sub, value="Friday")        # move to a class / PLS value / angle through the map
>>> Rotate(sub, to="Friday")              # turn to Friday's angle on the circle (4 x its radius)
>>> SaeEdit(sae, latents=[12], value=5.0) # clamp an SAE latent, keeping the SAE's error term
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import InputError
from interp.subspace import CircleMap, Subspace


@dataclass
class EditContext:
    """Where the rows of ``x`` come from; tensors have ``x.shape[:-1]``."""

    batch_idx: Int[Tensor, "..."]
    """Row of the batch."""
    pos: Int[Tensor, "..."]
    """Absolute position (column, padding included; stays right during generate)."""
    slot: Int[Tensor, "..."] | None
    """Index into explicit per-row positions (pairs base and source positions), else None."""
    site: str = ""
    n_rows: int | None = None
    """Rows of the whole batch that per-row values are given for (``capture(batch_size=)`` runs it in chunks,
    and ``batch_idx`` counts from the start of the whole batch); None: not known, only checked per index."""


def _check_width(v: Tensor, x: Tensor, what: str) -> None:
    if v.shape[-1] != x.shape[-1]:
        raise InputError(f"{what} has {v.shape[-1]} values, but the site's activations have width {x.shape[-1]}; "
                         "give one value per dimension of the site")


def per_row(value: Tensor, ctx: EditContext, x: Tensor, what: str = "a per-row value") -> Tensor:
    """A value given per batch row (``[batch, ...]``) broadcast to the rows of ``x``; a value with another
    number of rows than the batch is refused (it would pair rows with the wrong prompts)."""
    value = value.to(device=x.device, dtype=x.dtype if value.is_floating_point() else value.dtype)
    idx = ctx.batch_idx.to(x.device)
    if value.dim() == 0:
        return value.expand(idx.shape)
    if value.shape[0] == 1:  # one value for every row
        return value[torch.zeros_like(idx)]
    check_rows(value.shape[0], ctx, idx, what, "give one per prompt (or a single value for all)")
    return value[idx]


def _check_indices(idx: Tensor, n: int, what: str, where: str) -> None:
    """Refuse indices outside ``0..n-1`` in one line."""
    out = (idx < 0) | (idx >= n)
    if bool(out.any()):
        raise InputError(f"{what} {idx[out].unique().tolist()} do not exist in {where} (valid: 0..{n - 1})")


def check_rows(rows: int, ctx: EditContext, idx: Tensor, what: str, hint: str) -> None:
    """Refuse a per-row value of `rows` rows that does not hold one row per prompt of the batch (``ctx.n_rows``
    when known, else at least one for every index in `idx`)."""
    if (ctx.n_rows is not None and rows != ctx.n_rows) or (idx.numel() and int(idx.max()) >= rows):
        raise InputError(f"{what} has {rows} rows, but the batch has "
                         f"{ctx.n_rows if ctx.n_rows is not None else 'more'} prompts; {hint}")


class Edit(abc.ABC):
    """Base class: subclasses implement ``__call__(x, ctx) -> Tensor`` (a new tensor)."""

    @abc.abstractmethod
    def __call__(self, x: Float[Tensor, "... d_model"], ctx: EditContext) -> Float[Tensor, "... d_model"]:
        """The edited activations (a new tensor; ``x`` itself only to leave the pass untouched)."""

    def then(self, other: Edit) -> Compose:
        return Compose([self, other])


class Compose(Edit):
    """Apply edits in order."""

    def __init__(self, edits: Sequence[Edit | Callable]):
        self.edits = [as_edit(e) for e in edits]

    def __call__(self, x, ctx):
        for e in self.edits:
            x = e(x, ctx)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.edits!r})"


class Lambda(Edit):
    """Wrap a plain function ``fn(x, ctx) -> x`` (or ``fn(x)`` with ``with_ctx=False``)."""

    def __init__(self, fn: Callable, *, with_ctx: bool = True):
        self.fn, self.with_ctx = fn, with_ctx

    def __call__(self, x, ctx):
        return self.fn(x, ctx) if self.with_ctx else self.fn(x)


def as_edit(e) -> Edit:
    if isinstance(e, Edit):
        return e
    if isinstance(e, (list, tuple)):
        return Compose(e)
    if callable(e):
        return Lambda(e)
    raise InputError("an edit is an interp.edits.Edit, a callable fn(x, ctx) or a list of them; "
                     f"got {type(e).__name__}")


def _sub(s) -> Subspace:
    if isinstance(s, Subspace):
        return s
    if isinstance(s, Tensor):
        return Subspace(s)
    raise InputError(f"expected a Subspace or a [rank, d_model] tensor of directions; got {type(s).__name__}")


def _basis(sub: Subspace, x: Tensor) -> Tensor:
    return sub.basis.to(device=x.device, dtype=x.dtype)


class ZeroAblate(Edit):
    """Remove the part of ``x`` in ``span(basis)`` (through zero, ignoring the origin)."""

    def __init__(self, subspace: Subspace | Tensor):
        self.subspace = _sub(subspace)

    def __call__(self, x, ctx):
        _check_width(self.subspace.basis, x, "ZeroAblate: the subspace")
        b = _basis(self.subspace, x)
        return x - (x @ b.T) @ b


class ProjectOut(Edit):
    """``x - subspace.component(x)``: coordinates relative to the origin set to 0 (idempotent)."""

    def __init__(self, subspace: Subspace | Tensor):
        self.subspace = _sub(subspace)

    def __call__(self, x, ctx):
        return self.subspace.remove(x)


class MeanAblate(Edit):
    """Set the subspace coordinates to their mean over a reference set of activations."""

    def __init__(self, subspace: Subspace | Tensor, mean_coords: Float[Tensor, " rank"]):
        self.subspace = _sub(subspace)
        self.mean_coords = torch.as_tensor(mean_coords).float()
        if self.mean_coords.shape != (self.subspace.rank,):
            raise InputError(f"mean_coords must be [rank={self.subspace.rank}]; got {tuple(self.mean_coords.shape)}")

    @classmethod
    def fit(cls, subspace: Subspace | Tensor, acts: Float[Tensor, "n d_model"] | Float[Tensor, "b seq d_model"],
            attention_mask: Tensor | None = None) -> MeanAblate:
        """The mean coordinates of `acts`: rows ``[n, d_model]``, or a capture's ``[batch, seq, d_model]`` with its
        `attention_mask`, so that padded positions do not enter the mean."""
        sub = _sub(subspace)
        if acts.dim() == 3:
            if attention_mask is None:
                raise InputError(f"MeanAblate.fit got activations {tuple(acts.shape)}, which may hold padded "
                                 "positions; pass attention_mask= (a capture's acts.attention_mask), or rows "
                                 "[n, d_model] (acts.reshape(-1, d_model) when no position is padding)")
            acts = acts[attention_mask.to(acts.device).bool()]
        if acts.dim() != 2 or len(acts) == 0:
            raise InputError(f"MeanAblate.fit needs at least one [n, d_model] row; got shape {tuple(acts.shape)}")
        return cls(sub, sub.project(acts.float()).mean(0))

    def __call__(self, x, ctx):
        return self.subspace.with_coords(x, self.mean_coords.to(x).expand(*x.shape[:-1], -1))


class Steer(Edit):
    """``x + alpha * v``; ``v`` a ``[d_model]`` vector, or a Subspace with ``coords`` (v = coords @ basis).
    ``alpha`` may be a float or a ``[batch]`` tensor (one strength per prompt)."""

    def __init__(self, direction: Tensor | Subspace, alpha: float | Tensor = 1.0, *, coords: Tensor | None = None):
        if isinstance(direction, Subspace):
            c = torch.ones(direction.rank) if coords is None else torch.as_tensor(coords).float()
            direction = c @ direction.basis
        self.v = torch.as_tensor(direction).float()
        if self.v.dim() != 1:
            raise InputError(f"a steering direction must be [d_model]; got shape {tuple(self.v.shape)}")
        self.alpha = alpha

    def __call__(self, x, ctx):
        _check_width(self.v, x, "Steer: the steering vector")
        v = self.v.to(device=x.device, dtype=x.dtype)
        if isinstance(self.alpha, Tensor):
            return x + per_row(self.alpha, ctx, x, "Steer: alpha")[..., None] * v
        return x + self.alpha * v


class Replace(Edit):
    """Replace the whole activation by a vector ``[d_model]`` (or one per row, ``[batch, d_model]``)."""

    def __init__(self, value: Float[Tensor, "... d_model"]):
        self.value = torch.as_tensor(value).float()

    def __call__(self, x, ctx):
        _check_width(self.value, x, "Replace: the value")
        v = self.value.to(device=x.device, dtype=x.dtype)
        if v.dim() == 2:
            v = per_row(self.value, ctx, x, "Replace: the value")
        return v.expand_as(x).clone()


class Patch(Edit):
    """Take the subspace component (or, with ``subspace=None``, the whole activation) from a source run.

    ``source`` holds the source run's activations at this site: ``[batch, seq_src, d_model]``
    (indexed by each base row's absolute position, or by ``source_positions[row, slot]`` when base
    and source prompts differ in length) or ``[batch, d_model]`` (one vector per row, e.g. the
    source's last token). Source == base gives back the base activations bitwise.

    ``neurons`` patches only these coordinates (MLP neurons at ``mlp.hook_post``, or any coordinates of
    a site): ``[k]`` for every row or ``[batch, k]`` one set per row; the other coordinates keep their
    base values bitwise. ``subspace`` and ``neurons`` exclude each other.
    """

    def __init__(self, source: Float[Tensor, "batch ... d_model"], subspace: Subspace | Tensor | None = None,
                 *, source_positions: Int[Tensor, "batch n"] | Sequence | None = None,
                 neurons: Int[Tensor, "... k"] | Sequence | None = None):
        self.source = source.detach() if isinstance(source, Tensor) else torch.as_tensor(source)
        if self.source.dim() not in (2, 3):
            raise InputError("source must be [batch, seq, d_model] or [batch, d_model]; "
                             f"got {tuple(self.source.shape)}")
        if subspace is not None and neurons is not None:
            raise InputError("Patch takes subspace= or neurons=, not both: a neuron set is the subspace of those "
                             "coordinates")
        self.subspace = None if subspace is None else _sub(subspace)
        self.neurons = None if neurons is None else torch.as_tensor(neurons).long()
        if self.neurons is not None and (self.neurons.dim() not in (1, 2) or self.neurons.shape[-1] == 0):
            raise InputError(f"neurons must be [k] or [batch, k] coordinate indices (k >= 1); got shape "
                             f"{tuple(self.neurons.shape)}")
        self.source_positions = None if source_positions is None else torch.as_tensor(source_positions).long()
        if self.source_positions is not None and self.source_positions.dim() == 1:
            self.source_positions = self.source_positions[None].expand(self.source.shape[0], -1)

    def _source_rows(self, x: Tensor, ctx: EditContext) -> Tensor:
        src = self.source.to(device=x.device, dtype=x.dtype)
        bi = ctx.batch_idx.to(x.device)
        check_rows(src.shape[0], ctx, bi, "Patch: the source", "pair every base prompt with one source prompt")
        if src.dim() == 2:
            return src[bi]
        if self.source_positions is not None:
            if ctx.slot is None:
                raise InputError("source_positions pairs the k-th base position with the k-th source position, "
                                 "so the intervention needs explicit positions=[[...], ...] too")
            sp = self.source_positions.to(x.device)[bi, ctx.slot.to(x.device)]
        else:
            sp = ctx.pos.to(x.device)
        if bool((sp >= src.shape[1]).any()):
            raise InputError(f"patch source has {src.shape[1]} positions but position {int(sp.max())} was "
                             "asked for; pass source_positions to align prompts of different lengths")
        return src[bi, sp]

    def __call__(self, x, ctx):
        _check_width(self.source, x, "Patch: the source")
        src = self._source_rows(x, ctx)
        if self.neurons is not None:
            idx = self.neurons.to(x.device)
            _check_indices(idx, x.shape[-1], "neurons", f"{ctx.site or 'this site'}, whose width is {x.shape[-1]}")
            idx = per_row(idx, ctx, x, "Patch: neurons") if idx.dim() == 2 else idx.expand(*x.shape[:-1], -1)
            return x.scatter(-1, idx, src.gather(-1, idx))
        if self.subspace is None:
            return src.clone()
        _check_width(self.subspace.basis, x, "Patch: the subspace")
        b = _basis(self.subspace, x)
        return x + (src @ b.T - x @ b.T) @ b


def _coords_of(sub: Subspace, coords, value) -> Tensor:
    if coords is None:
        if isinstance(value, (list, tuple)):
            return torch.stack([sub.to_coords(v).float() for v in value])
        return sub.to_coords(value).float()
    coords = torch.as_tensor(coords).float()
    if coords.shape[-1] != sub.rank or coords.dim() not in (1, 2):
        raise InputError(f"coords must be [rank={sub.rank}] or [batch, rank]; got {tuple(coords.shape)}")
    return coords


class SetCoords(Edit):
    """Move ``x`` to given subspace coordinates, keeping its orthogonal part.

    ``coords`` ``[rank]`` or ``[batch, rank]``; or ``value`` mapped through the subspace's coordinate
    map (a PLS value, an angle, a class name such as ``"Friday"``; a list gives one per row).
    """

    def __init__(self, subspace: Subspace, coords: Tensor | None = None, *, value=None):
        if (coords is None) == (value is None):
            raise InputError("SetCoords needs exactly one of coords= or value=")
        self.subspace = subspace
        self.coords = _coords_of(subspace, coords, value)

    def __call__(self, x, ctx):
        c = self.coords
        if c.dim() == 2:
            c = per_row(c, ctx, x, "SetCoords: coords")
        else:
            c = c.to(device=x.device, dtype=x.dtype).expand(*x.shape[:-1], -1)
        return self.subspace.with_coords(x, c)


def _angle(sub: Subspace, value) -> float:
    if isinstance(value, str):
        cm = sub.coord_map
        if not isinstance(cm, CircleMap) or value not in cm.angles:
            known = sorted(cm.angles) if isinstance(cm, CircleMap) else []
            raise InputError(f"Rotate(to={value!r}) needs a circle map with that class; this subspace knows {known}")
        return cm.angles[value]
    return float(value)


ROTATE_SCALE = 4.0
"""Default ``Rotate(scale=)`` when turning ``to=`` a point of a circle map (chosen on fit templates only;
see ``experiments/circle_edit_defaults.md``); other rotations default to ``scale=1``."""
ROTATE_RADIUS = "circle"
"""Default ``Rotate(radius=)``: ``"circle"`` = the circle map's fitted radius when turning ``to=`` a point of
it (so the point lands on the target at ``scale`` x the circle, whatever its own distance); otherwise
each row keeps its own distance (times ``scale``)."""


class Rotate(Edit):
    """Turn the point in a circle's plane to a target angle (``to=``) or by an angle (``angle=``).

    ``to``: a class of the subspace's circle (``"Friday"``) or a target angle, one per row with a
    list; ``angle``: radians to turn each row by (float or ``[batch]``). The plane is coordinates
    ``plane`` of the subspace; the turn is about the circle map's center and along its axes (a
    circle probe's circle is an ellipse in the plane), or about zero without a circle map.

    Distance from the center. Turning ``to=`` a point of a circle map, the defaults put the point
    exactly on the target's angle at ``ROTATE_SCALE`` (4) x the fitted circle radius: an absolute
    position, so applying the edit again, or at several layers, does not compound. These defaults were
    chosen on fit templates only (``experiments/circle_edit_defaults.md``; layer 10 of the embedded
    model, cross-validated over templates): a pure rotation made the model repeat the target weekday
    in 0.38 of the rows and the target month in 0.14, 4 x the circle radius in 0.56 and 0.33 (3 x:
    0.57 and 0.31). Every other turn (``angle=``, or a subspace without a circle map) defaults to a
    pure rotation (``scale=1``, each row's own distance kept; with a zero origin and center it keeps
    the activation's norm). ``radius=`` a number sets the distance (times ``scale``) in the circle's
    units; ``radius=None`` keeps each row's own distance times ``scale``; ``scale`` multiplies either.
    """

    def __init__(self, subspace: Subspace, angle: float | Tensor | None = None, *, to=None,
                 plane: tuple[int, int] = (0, 1), center: Tensor | None = None, scale: float | None = None,
                 radius: float | str | None = ROTATE_RADIUS):
        if (angle is None) == (to is None):
            raise InputError("Rotate needs exactly one of angle= (radians) or to= (target angle or class)")
        if subspace.rank < 2 or not all(0 <= p < subspace.rank for p in plane) or plane[0] == plane[1]:
            raise InputError(f"plane={plane} must name two different coordinates of a rank>=2 subspace "
                             f"(rank {subspace.rank})")
        cm = subspace.coord_map
        on_circle = isinstance(cm, CircleMap) and tuple(plane) == (0, 1) and center is None
        onto_circle = on_circle and to is not None  # the case the defaults were chosen for
        scale = (ROTATE_SCALE if onto_circle else 1.0) if scale is None else scale
        if not scale > 0:
            raise InputError(f"Rotate scale must be > 0; got {scale}")
        if isinstance(radius, str):
            if radius != "circle":
                raise InputError(f"Rotate radius must be a number > 0, 'circle' or None; got {radius!r}")
            radius = float(cm.radius) if onto_circle else None
        if radius is not None and not radius > 0:
            raise InputError(f"Rotate radius must be > 0 (or None to keep each point's own); got {radius}")
        self.subspace, self.plane, self.scale = subspace, tuple(plane), float(scale)
        self.radius = None if radius is None else float(radius)
        self.angle = angle if angle is None or isinstance(angle, Tensor) else float(angle)
        self.to = None if to is None else (torch.tensor([_angle(subspace, t) for t in to])
                                           if isinstance(to, (list, tuple)) else _angle(subspace, to))
        own = torch.zeros(2) if center is None else center
        self.center = torch.as_tensor(cm.center if on_circle else own).float()
        self.axes = cm.axes if on_circle else None

    def turn(self, uw: Tensor, theta: Tensor | None, target=None) -> Tensor:
        """New circle-axis coordinates ``[..., 2]`` of points ``uw`` turned by ``theta`` (or onto ``target``)."""
        u, w = uw[..., 0], uw[..., 1]
        if target is not None and self.radius is not None:  # straight onto the target's point
            t = torch.as_tensor(target, dtype=u.dtype, device=u.device)
            r = self.scale * self.radius
            return torch.stack([r * torch.cos(t) + 0 * u, r * torch.sin(t) + 0 * w], -1)
        if theta is None:
            theta = torch.zeros_like(u)
        f = self.scale if self.radius is None else self.scale * self.radius / torch.hypot(u, w).clamp_min(1e-12)
        cos, sin = torch.cos(theta) * f, torch.sin(theta) * f
        return torch.stack([u * cos - w * sin, u * sin + w * cos], -1)

    def circle_coords(self, x: Tensor) -> Tensor:
        """``x``'s coordinates on the circle's axes, relative to its center ``[..., 2]``."""
        c = self.subspace.project(x)[..., list(self.plane)] - self.center.to(x)
        if self.axes is None:
            return c
        # solved in float32 at least: torch has no half-precision solve on CPU
        dt = torch.promote_types(c.dtype, torch.float32)
        uw = torch.linalg.solve(self.axes.to(device=c.device, dtype=dt), c.to(dt).unsqueeze(-1)).squeeze(-1)
        return uw.to(c.dtype)

    def thetas(self, uw: Tensor, ctx: EditContext, x: Tensor):
        """``(turn per row, target angle per row or None)``; the turn is None for a no-op angle."""
        if self.to is not None:
            target = per_row(self.to, ctx, x, "Rotate: to") if isinstance(self.to, Tensor) else self.to
            return target - torch.atan2(uw[..., 1], uw[..., 0]), target
        if isinstance(self.angle, Tensor):
            return per_row(self.angle, ctx, x, "Rotate: angle"), None
        return (torch.full_like(uw[..., 0], self.angle) if self.angle % (2 * math.pi) else None), None

    def __call__(self, x, ctx):
        uw = self.circle_coords(x)
        theta, target = self.thetas(uw, ctx, x)
        if theta is None and self.scale == 1.0 and self.radius is None:
            return x.clone()
        delta = self.turn(uw, theta, target) - uw
        if self.axes is not None:
            delta = delta @ self.axes.to(delta).T
        b = _basis(self.subspace, x)
        i, j = self.plane
        return x + delta[..., :1] * b[i] + delta[..., 1:] * b[j]


class SaeEdit(Edit):
    """Clamp, scale or ablate SAE latents, keeping the SAE's error term.

    ``sae`` is any object with ``encode(x) -> codes`` and ``decode(codes) -> x_hat``. The result is
    ``decode(codes') + (x - decode(codes))``, computed as ``x + decode(codes') - decode(codes)`` so that
    an edit that leaves the codes alone returns ``x`` bitwise.
    ``mode``: "clamp" (set to ``value``), "scale" (multiply by ``value``) or "ablate" (set to 0).
    """

    def __init__(self, sae, latents: Sequence[int] | Tensor = (), value: float | Tensor = 0.0, *, mode: str = "clamp"):
        if not (hasattr(sae, "encode") and hasattr(sae, "decode")):
            raise InputError(f"sae must have encode(x) and decode(codes); got {type(sae).__name__}")
        if mode not in ("clamp", "scale", "ablate"):
            raise InputError(f"mode must be 'clamp', 'scale' or 'ablate'; got {mode!r}")
        self.sae, self.mode, self.value = sae, mode, value
        self.latents = torch.as_tensor(list(latents) if not isinstance(latents, Tensor) else latents, dtype=torch.long)

    def _sae_dtype(self, x: Tensor) -> torch.dtype:
        p = next(iter(self.sae.parameters()), None) if hasattr(self.sae, "parameters") else None
        return p.dtype if p is not None else x.dtype

    def __call__(self, x, ctx):
        if self.latents.numel() == 0:
            return x.clone()
        xs = x.to(self._sae_dtype(x))
        codes = self.sae.encode(xs)
        idx = self.latents.to(codes.device)
        _check_indices(idx, codes.shape[-1], "SaeEdit: latents", f"an SAE of {codes.shape[-1]} latents")
        picked = codes.index_select(-1, idx)
        if self.mode == "ablate":
            new = torch.zeros_like(picked)
        elif self.mode == "scale":
            new = picked * torch.as_tensor(self.value).to(picked)
        else:
            new = torch.as_tensor(self.value).to(picked).expand_as(picked)
        edited = codes.index_copy(-1, idx, new)
        return x + (self.sae.decode(edited) - self.sae.decode(codes)).to(x.dtype)
