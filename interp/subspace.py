"""Subspace: what joins "find a feature" to "edit the model".

An orthonormal basis ``[rank, d_model]``, an origin ``[d_model]``, and optionally a coordinate map
from an attribute value to a point of the subspace:

* :class:`CircleMap` -- an angle (or a class placed on a circle, e.g. a weekday) to a 2-D point (on
  a round circle, or on the ellipse a circle probe reads through its ``axes``);
* :class:`LinearMap` -- a number (a year, a latitude) to a point, ``intercept + value * slope``, and
  back through a fitted readout (PLS's prediction) when it has one;
* :class:`TableMap`  -- a class label to its mean coordinates.

``Subspace.predict(x)`` reads the map's value at an activation (an angle, a number, a class index);
``Subspace.direction()`` is, for a linear map, the smallest displacement that raises it by one.

Every feature finder returns a Subspace; every intervention consumes one. Saved as
``subspace.safetensors`` + ``subspace.json`` (atomic writes, no pickle).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from interp.atomic import atomic_path, save_file, write_json
from interp.errors import InputError
from interp.folders import inside


@dataclass
class CircleMap:
    """Points ``center + axes @ (radius * (cos a, sin a))`` in the first two coordinates of the subspace.

    ``axes`` is None for a round circle (the identity). A circle probe reads an angle through a
    general linear map, so its circle is an ellipse in the plane: ``axes`` holds, as columns, the
    plane coordinates of the probe's unit cos and sin directions. In a subspace of rank > 2 the
    remaining coordinates of a mapped point are 0 (the origin's).
    """

    center: Float[Tensor, "2"]
    radius: float
    angles: dict[str, float] = field(default_factory=dict)
    """Fitted angle (radians) of each named class, e.g. {"Monday": 0.0, ...}."""
    rank: int = 2
    """Length of the coordinate vectors `to_coords` returns (the subspace's rank)."""
    axes: Float[Tensor, "2 2"] | None = None
    """Columns: the plane coordinates of the circle's unit cos and sin directions (None: identity)."""

    kind = "circle"

    def __post_init__(self):
        if self.axes is not None:
            self.axes = torch.as_tensor(self.axes).float()
            if self.axes.shape != (2, 2) or not torch.isfinite(self.axes).all() or \
                    abs(float(torch.linalg.det(self.axes.double()))) < 1e-12:
                raise InputError(f"CircleMap axes must be an invertible [2, 2] matrix; got {self.axes.tolist()}")

    def angle_of(self, value: float | str) -> float:
        """The angle of a named class (its fitted angle) or an angle given in radians."""
        if isinstance(value, str):
            if value not in self.angles:
                raise InputError(f"unknown class {value!r}; this circle knows {sorted(self.angles)}")
            return self.angles[value]
        return float(value)

    def to_circle(self, coords: Float[Tensor, "... rank"]) -> Float[Tensor, "... 2"]:
        """Coordinates on the circle's own axes, relative to its center (where the radius is ``radius``)."""
        d = coords[..., :2] - self.center.to(coords)
        if self.axes is None:
            return d
        return torch.linalg.solve(self.axes.to(coords), d.unsqueeze(-1)).squeeze(-1)

    def from_circle(self, points: Float[Tensor, "... 2"]) -> Float[Tensor, "... 2"]:
        """Plane coordinates of points given on the circle's axes (the inverse of :meth:`to_circle`)."""
        if self.axes is not None:
            points = points @ self.axes.to(points).T
        return self.center.to(points) + points

    def to_coords(self, value: float | str) -> Tensor:
        angle = self.angle_of(value)
        unit = torch.tensor([math.cos(angle), math.sin(angle)], dtype=self.center.dtype)
        point = self.from_circle(self.radius * unit)
        if self.rank > 2:
            point = torch.cat([point, point.new_zeros(self.rank - 2)])
        return point

    def from_coords(self, coords: Float[Tensor, "... rank"]) -> Tensor:
        """Angle (radians, in (-pi, pi]) of each point."""
        d = self.to_circle(coords)
        return torch.atan2(d[..., 1], d[..., 0])


@dataclass
class LinearMap:
    """A numeric attribute along a line in the subspace.

    ``to_coords(v) = intercept + v * slope``: where activations with value ``v`` sit on average.
    ``from_coords`` reads a value back: through ``weights`` and ``bias`` when the finder fitted a
    readout (PLS's regression: ``coords @ weights + bias`` equals its ``predict``), otherwise by
    projecting onto the line.
    """

    intercept: Float[Tensor, " rank"]
    slope: Float[Tensor, " rank"]
    weights: Float[Tensor, " rank"] | None = None
    """A fitted readout from coordinates to the value (None: project onto the line)."""
    bias: float = 0.0
    """The readout's constant term."""

    kind = "linear"

    def to_coords(self, value: float) -> Tensor:
        return self.intercept + float(value) * self.slope

    def gradient(self) -> Float[Tensor, " rank"]:
        """How the value read by :meth:`from_coords` changes per unit of each coordinate."""
        if self.weights is not None:
            return self.weights
        return self.slope / (self.slope @ self.slope)

    def from_coords(self, coords: Float[Tensor, "... rank"]) -> Tensor:
        if self.weights is not None:
            return coords @ self.weights.to(coords) + self.bias
        s = self.slope.to(coords)
        return ((coords - self.intercept.to(coords)) @ s) / (s @ s)


@dataclass
class TableMap:
    """Each class label to its mean coordinates."""

    labels: list[str]
    coords: Float[Tensor, "n_classes rank"]

    kind = "table"

    def to_coords(self, value: str) -> Tensor:
        if value not in self.labels:
            raise InputError(f"unknown class {value!r}; this subspace knows {self.labels}")
        return self.coords[self.labels.index(value)]

    def from_coords(self, coords: Float[Tensor, "... rank"]) -> Tensor:
        """Index of the nearest class mean."""
        return torch.cdist(coords.reshape(-1, coords.shape[-1]),
                           self.coords.to(coords)).argmin(-1).reshape(coords.shape[:-1])


CoordMap = CircleMap | LinearMap | TableMap
_MAPS = {"circle": CircleMap, "linear": LinearMap, "table": TableMap}


ORTHO_TOL = 1e-4
"""Largest ``|B B^T - I|`` entry a basis given as orthonormal may have, and the smallest length (relative to the
longest row) a row keeps after the rows before it are projected out when the basis is orthonormalised."""


class Subspace:
    """An affine subspace ``origin + span(basis)`` of the residual stream."""

    def __init__(self, basis: Float[Tensor, "rank d_model"], origin: Float[Tensor, " d_model"] | None = None,
                 coord_map: CoordMap | None = None, *, name: str = "", meta: dict[str, Any] | None = None,
                 orthonormalize: bool = True):
        basis = torch.as_tensor(basis)
        if basis.dim() == 1:
            basis = basis[None]
        if basis.dim() != 2 or basis.shape[0] == 0 or basis.shape[0] > basis.shape[1]:
            raise InputError(f"basis must be [rank, d_model] with 1 <= rank <= d_model; got {tuple(basis.shape)}")
        basis = basis.float()
        if not bool(torch.isfinite(basis).all()):
            raise InputError(f"basis [{basis.shape[0]}, {basis.shape[1]}] holds NaN or inf; a subspace needs finite "
                             "directions (check what produced them)")
        if orthonormalize:
            q, r = torch.linalg.qr(basis.T)
            rank = int((torch.diagonal(r).abs() > ORTHO_TOL * basis.norm(dim=1).max()).sum())
            if rank < basis.shape[0]:
                raise InputError(f"basis rows are linearly dependent: {basis.shape[0]} rows span only {rank} "
                                 "dimensions; pass independent directions or fewer rows")
            basis = (q * torch.sign(torch.diagonal(r))).T.contiguous()  # keeps each row's direction
        else:
            err = float((basis.double() @ basis.double().T - torch.eye(basis.shape[0], dtype=torch.float64,
                                                                        device=basis.device)).abs().max())
            if err > ORTHO_TOL:
                raise InputError(f"basis rows are not orthonormal (max |B B^T - I| = {err:.3g}, allowed "
                                 f"{ORTHO_TOL:g}); pass orthonormalize=True or orthonormal rows")
        self.basis = basis
        self.origin = torch.zeros(basis.shape[1]) if origin is None else torch.as_tensor(origin).float()
        if self.origin.shape != (basis.shape[1],):
            raise InputError(f"origin must be [d_model={basis.shape[1]}]; got {tuple(self.origin.shape)}")
        if not bool(torch.isfinite(self.origin).all()):
            raise InputError("origin holds NaN or inf; a subspace needs a finite origin")
        self.coord_map = coord_map
        self.name = name
        self.meta = dict(meta or {})

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    @property
    def d_model(self) -> int:
        return self.basis.shape[1]

    def __repr__(self) -> str:
        cm = f", map={self.coord_map.kind}" if self.coord_map is not None else ""
        return (f"Subspace(rank={self.rank}, d_model={self.d_model}{cm}"
                f"{', name=' + repr(self.name) if self.name else ''})")

    def _bo(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[-1] != self.d_model:
            raise InputError(f"activations must end in d_model={self.d_model}; got shape {tuple(x.shape)}. The "
                             "subspace was found at a site of another width (another site or model?)")
        return self.basis.to(device=x.device, dtype=x.dtype), self.origin.to(device=x.device, dtype=x.dtype)

    def project(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... rank"]:
        """Coordinates of `x` in the subspace: ``(x - origin) @ basis.T``."""
        b, o = self._bo(x)
        return (x - o) @ b.T

    def reconstruct(self, coords: Float[Tensor, "... rank"]) -> Float[Tensor, "... d_model"]:
        """The point ``origin + coords @ basis``."""
        b = self.basis.to(coords)
        return self.origin.to(coords) + coords @ b

    def component(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The part of ``x - origin`` that lies in the subspace."""
        b, _ = self._bo(x)
        return self.project(x) @ b

    def remove(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """``x`` with its in-subspace part (relative to the origin) removed."""
        return x - self.component(x)

    def with_coords(self, x: Float[Tensor, "... d_model"], coords: Float[Tensor, "... rank"]) -> Tensor:
        """``x`` moved so that its coordinates are `coords`; the orthogonal part is kept."""
        b, _ = self._bo(x)
        return x + (coords.to(x) - self.project(x)) @ b

    def to_coords(self, value) -> Tensor:
        """Coordinates of an attribute value through the coordinate map."""
        if self.coord_map is None:
            raise InputError(f"{self!r} has no coordinate map; pass coordinates directly")
        return self.coord_map.to_coords(value)

    def from_coords(self, coords: Tensor) -> Tensor:
        if self.coord_map is None:
            raise InputError(f"{self!r} has no coordinate map")
        return self.coord_map.from_coords(coords)

    def predict(self, x: Float[Tensor, "... d_model"]) -> Tensor:
        """The attribute value the coordinate map reads at `x`: an angle (circle), a number (linear;
        PLS's prediction), the index of the nearest class (table)."""
        return self.from_coords(self.project(x))

    def direction(self) -> Float[Tensor, " d_model"]:
        """The smallest displacement of an activation that raises :meth:`predict` by exactly 1
        (a linear coordinate map only, e.g. PLS: one unit of the target)."""
        cm = self.coord_map
        if not isinstance(cm, LinearMap):
            raise InputError(f"{self!r}: direction() needs a linear coordinate map (pls_subspace); "
                             f"this one is {getattr(cm, 'kind', None)!r}")
        g = cm.gradient().float()
        return (g / (g @ g)) @ self.basis

    def plot(self, acts: Float[Tensor, "n d_model"], labels=None, **kwargs):
        """Scatter of the activations projected onto this subspace, coloured by label.

        See :func:`interp.features.plot.plot_projection` for the options (``order``, ``dims``,
        ``path`` to save a PNG, ``ax``). Returns the matplotlib Axes.
        """
        from interp.features.plot import plot_projection  # matplotlib only when plotting

        return plot_projection(self, acts, labels, **kwargs)

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<path>/subspace.safetensors`` and ``<path>/subspace.json`` atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"basis": self.basis.contiguous(), "origin": self.origin.contiguous()}
        info: dict[str, Any] = {"format": "interp.subspace/1", "name": self.name, "meta": self.meta,
                                "rank": self.rank, "d_model": self.d_model, "coord_map": None}
        cm = self.coord_map
        if cm is not None:
            info["coord_map"] = {"kind": cm.kind}
            if isinstance(cm, CircleMap):
                tensors["map.center"] = cm.center.float().contiguous()
                info["coord_map"].update(radius=float(cm.radius), angles=cm.angles, rank=int(cm.rank))
                if cm.axes is not None:
                    tensors["map.axes"] = cm.axes.float().contiguous()
            elif isinstance(cm, LinearMap):
                tensors["map.intercept"] = cm.intercept.float().contiguous()
                tensors["map.slope"] = cm.slope.float().contiguous()
                if cm.weights is not None:
                    tensors["map.weights"] = cm.weights.float().contiguous()
                    info["coord_map"]["bias"] = float(cm.bias)
            else:
                tensors["map.coords"] = cm.coords.float().contiguous()
                info["coord_map"]["labels"] = list(cm.labels)
        with atomic_path(path / "subspace.safetensors") as tmp:
            save_file(tensors, str(tmp))
        write_json(path / "subspace.json", info, indent=2)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Subspace:
        path = Path(path)
        files = [inside(path, n, str(path), error=InputError) for n in ("subspace.json", "subspace.safetensors")]
        try:
            info = json.loads(files[0].read_text(encoding="utf-8"))
            t = load_file(str(files[1]))
        except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: not a safetensors file (a pickle?)
            raise InputError(f"{path} is not a readable subspace folder (subspace.json + subspace.safetensors; "
                             f"pickles are never read): {' '.join(str(e).split())}") from None
        if not isinstance(info, dict) or info.get("format") != "interp.subspace/1":
            raise InputError(f"{path / 'subspace.json'}: unknown format "
                             f"{info.get('format') if isinstance(info, dict) else type(info).__name__!r}")
        bad = sorted(k for k, v in t.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
        if bad or "basis" not in t or "origin" not in t:
            raise InputError(f"{path / 'subspace.safetensors'}: " + (f"tensors {bad} hold NaN or inf" if bad else
                             f"needs tensors 'basis' and 'origin', has {sorted(t)}") + "; save the subspace again")
        cm = info.get("coord_map")
        coord_map = None
        if cm:
            if cm["kind"] == "circle":
                coord_map = CircleMap(t["map.center"], cm["radius"], dict(cm.get("angles", {})), int(cm.get("rank", 2)),
                                      t.get("map.axes"))
            elif cm["kind"] == "linear":
                coord_map = LinearMap(t["map.intercept"], t["map.slope"], t.get("map.weights"),
                                      float(cm.get("bias", 0.0)))
            elif cm["kind"] == "table":
                coord_map = TableMap(list(cm["labels"]), t["map.coords"])
            else:
                raise InputError(f"{path}: unknown coordinate map {cm['kind']!r}; known: {sorted(_MAPS)}")
        return cls(t["basis"], t["origin"], coord_map, name=info.get("name", ""), meta=info.get("meta"),
                   orthonormalize=False)
