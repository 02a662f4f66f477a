"""Circles in a plane: fit one, read a cyclic order off it, and score how circular a cloud is.

Used by the supervised finder (class means of weekdays, months, ...) and by the SAE cluster
finder (flag clusters whose top-2 principal components look like a circle).

* :func:`fit_circle` -- least-squares (Kasa) circle through 2-D points, with the centroid as a
  fallback when the points are nearly collinear; returns the centre, radius and each point's angle.
* :func:`cyclic_order` / :func:`same_cyclic_order` -- the order of points around the circle and
  whether it equals an expected order up to rotation and reflection.
* :func:`align_angles` -- the rotation (and reflection) that best maps ideal evenly spaced angles
  onto fitted ones; used for the leave-one-class-out angle error.
* :func:`circle_scores` -- radius spread, angular-order agreement and how much of the 2-D
  scatter a 1-D angle explains.

Pure torch (float64 internally for the small solves); no scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import InputError

TWO_PI = 2 * math.pi

# A least-squares circle whose radius is this many times the points' mean distance to their
# centroid is treated as a line fit (nearly collinear points); the centroid is used instead.
_DEGENERATE_RADIUS_RATIO = 10.0


def wrap(angle: Tensor) -> Tensor:
    """Angles wrapped into ``(-pi, pi]``."""
    return torch.remainder(angle + math.pi, TWO_PI) - math.pi


@dataclass(frozen=True)
class CircleFit:
    """A circle fitted to 2-D points."""

    center: Tensor
    """``[2]`` centre of the circle."""
    radius: float
    """Mean distance of the points to the centre."""
    angles: Tensor
    """``[n]`` angle (radians, ``(-pi, pi]``) of each point around the centre."""
    radius_cv: float
    """Coefficient of variation of the points' distances to the centre (0 for a perfect circle)."""
    method: str
    """``"kasa"`` (least-squares circle) or ``"centroid"`` (fallback for nearly collinear points)."""


def _check_points(points: Tensor) -> Tensor:
    points = torch.as_tensor(points)
    if points.dim() != 2 or points.shape[1] < 2 or points.shape[0] < 3:
        raise InputError(f"a circle needs at least 3 points with 2 coordinates, shape [n, 2]; got "
                         f"{tuple(points.shape)}")
    if not torch.isfinite(points).all():
        raise InputError("points for a circle fit contain NaN or inf; check the activations")
    return points[:, :2].double()


def fit_circle(points: Float[Tensor, "n 2"], *, weights: Float[Tensor, " n"] | None = None) -> CircleFit:
    """Fit a circle to 2-D points by least squares (Kasa: ``x^2 + y^2 = 2ax + 2by + c``)."""
    p = _check_points(points)
    w = torch.ones(len(p), dtype=p.dtype) if weights is None else torch.as_tensor(weights).double()
    centroid = (w[:, None] * p).sum(0) / w.sum()
    spread = (p - centroid).norm(dim=1).mean().item()
    if spread == 0:
        raise InputError("all points for the circle fit coincide; the classes have identical means")
    q = (p - centroid) / spread  # condition the solve
    a = torch.cat([2 * q, torch.ones(len(q), 1, dtype=q.dtype)], 1)
    sw = w.sqrt()[:, None]
    sol = torch.linalg.lstsq(a * sw, (q.pow(2).sum(1, keepdim=True)) * sw).solution.squeeze(1)
    center = sol[:2]
    method = "kasa"
    sv = torch.linalg.svdvals(q)
    collinear = sv[-1] <= 1e-6 * sv[0]
    if collinear or not torch.isfinite(center).all() or center.norm().item() > _DEGENERATE_RADIUS_RATIO:
        center, method = torch.zeros(2, dtype=q.dtype), "centroid"
    center = centroid + spread * center
    d = p - center
    r = d.norm(dim=1)
    radius = r.mean().item()
    return CircleFit(center=center.float(), radius=radius, angles=torch.atan2(d[:, 1], d[:, 0]).float(),
                     radius_cv=(r.std(unbiased=False) / r.mean()).item() if radius > 0 else float("inf"),
                     method=method)


def cyclic_order(labels: Sequence[str], angles: Tensor) -> list[str]:
    """`labels` sorted by angle, starting from the first label (so the result is canonical)."""
    idx = torch.argsort(torch.as_tensor(angles)).tolist()
    order = [labels[i] for i in idx]
    start = order.index(labels[0])
    return order[start:] + order[:start]


def same_cyclic_order(found: Sequence[str], expected: Sequence[str]) -> bool:
    """Whether `found` equals `expected` up to rotation and reflection."""
    found, expected = list(found), list(expected)
    if sorted(found) != sorted(expected):
        return False
    n = len(expected)
    for seq in (expected, expected[::-1]):
        for s in range(n):
            if seq[s:] + seq[:s] == found:
                return True
    return False


def align_angles(fitted: Tensor, ideal: Tensor) -> tuple[int, float, float]:
    """Best ``fitted ~ sign * ideal + offset`` (circular). Returns ``(sign, offset, mean |error|)``."""
    fitted, ideal = torch.as_tensor(fitted).double(), torch.as_tensor(ideal).double()
    best = None
    for sign in (1, -1):
        diff = fitted - sign * ideal
        offset = math.atan2(diff.sin().mean().item(), diff.cos().mean().item())
        err = wrap(fitted - sign * ideal - offset).abs().mean().item()
        if best is None or err < best[2]:
            best = (sign, offset, err)
    return best


def angular_order_agreement(angles: Tensor, values: Tensor) -> float:
    """Fraction of consecutive-value pairs that are also neighbours around the circle.

    `values` are the expected cyclic positions (e.g. 0..6 for weekdays). 1.0 means the points
    sit around the circle in exactly the expected cyclic order (either direction).
    """
    angles, values = torch.as_tensor(angles), torch.as_tensor(values)
    n = len(angles)
    by_angle = torch.argsort(angles).tolist()
    neighbours = {frozenset((by_angle[i], by_angle[(i + 1) % n])) for i in range(n)}
    by_value = torch.argsort(values).tolist()
    expected = [frozenset((by_value[i], by_value[(i + 1) % n])) for i in range(n)]
    return sum(e in neighbours for e in expected) / n


def circle_scores(points: Float[Tensor, "n 2"], values: Tensor | None = None) -> dict[str, float | str]:
    """How circular a 2-D cloud is.

    Returns ``radius``, ``radius_cv`` (spread of distances to the centre; 0 for a circle, ~0.52 for
    a round Gaussian blob), ``angle_r2`` (fraction of the cloud's variance kept when each point is
    replaced by ``centre + radius * (cos a, sin a)``, i.e. explained by a 1-D angle) and, when
    `values` (expected cyclic positions per point) are given, ``order_agreement``.
    """
    p = _check_points(points)
    fit = fit_circle(p)
    c = fit.center.double()
    a = fit.angles.double()
    recon = c + fit.radius * torch.stack([a.cos(), a.sin()], 1)
    total = (p - p.mean(0)).pow(2).sum().item()
    resid = (p - recon).pow(2).sum().item()
    out = {"radius": fit.radius, "radius_cv": fit.radius_cv,
           "angle_r2": 1.0 - resid / total if total > 0 else 0.0, "fit": fit.method}
    if values is not None:
        out["order_agreement"] = angular_order_agreement(fit.angles, torch.as_tensor(values))
    return out
