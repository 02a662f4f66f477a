"""Reducibility indices of a 2-D point cloud (Engels et al., "Not All Language Model Features Are Linear").

A multi-dimensional feature is *reducible* if it is separable (after some rotation its two
coordinates are independent) or a mixture (a large share of its points lies on a line, i.e. it is
mostly a lower-dimensional feature). An irreducible feature, such as a circle, is neither.

* :func:`separability_index` -- ``S``: the minimum over rotations of the binned mutual information
  (bits) between the two coordinates. High S = not separable. The cloud is first whitened (zero
  mean, identity covariance) and the bins are fixed for all rotations (a square grid spanning a
  high quantile of the radius), because the plug-in estimate depends on the binning: with a fixed
  grid, scores of different clouds are comparable.
* :func:`mixture_index` -- ``M_eps``: the maximum over directions ``v`` and offsets ``c`` of the
  fraction of points with ``|v.x + c| < eps * rms(v.x + c)``. High M = mostly a line (a mixture).
  Searched exhaustively over a grid of angles and, for each angle, over offsets centred on every
  point's projection plus a regular grid (gradient ascent misses the optimum on mixtures of lines).
  ``M`` is affine invariant, so whitening first does not change it.
* :func:`reducibility` -- both, on every consecutive pair of principal components of a cloud in
  any dimension, plus ``irreducibility = S * (1 - M)`` used to rank clusters.

Pure torch, deterministic.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import InputError

MIN_POINTS = 10
"""The fewest points a reducibility index is computed on."""


def _points2(points: Tensor) -> Tensor:
    p = torch.as_tensor(points).double()
    if p.dim() != 2 or p.shape[1] != 2:
        raise InputError(f"expected a 2-D point cloud of shape [n, 2]; got {tuple(p.shape)}")
    if len(p) < MIN_POINTS:
        raise InputError(f"need at least {MIN_POINTS} points for a reducibility index; got {len(p)}")
    if not torch.isfinite(p).all():
        raise InputError("points contain NaN or inf")
    return p


def whiten(points: Float[Tensor, "n 2"]) -> Float[Tensor, "n 2"]:
    """Zero mean, identity covariance (a degenerate direction is left unscaled)."""
    p = _points2(points)
    p = p - p.mean(0)
    cov = p.T @ p / len(p)
    evals, evecs = torch.linalg.eigh(cov)
    scale = torch.where(evals > 1e-12 * evals.max().clamp_min(1e-300), evals.rsqrt(), torch.ones_like(evals))
    return p @ evecs * scale


def _mutual_info_bits(a: Tensor, b: Tensor, edges: Tensor) -> Tensor:
    """Plug-in mutual information (bits) of each row pair of `a`, `b` ``[n_angles, n]`` on a fixed grid."""
    bins = len(edges) - 1
    ia = torch.bucketize(a.clamp(edges[0], edges[-1]), edges[1:-1])
    ib = torch.bucketize(b.clamp(edges[0], edges[-1]), edges[1:-1])
    rows = torch.arange(len(a))[:, None] * bins * bins
    joint = torch.bincount((rows + ia * bins + ib).flatten(), minlength=len(a) * bins * bins)
    joint = joint.double().reshape(len(a), bins, bins)
    joint = joint / joint.sum((1, 2), keepdim=True)
    outer = joint.sum(2, keepdim=True) * joint.sum(1, keepdim=True)
    ratio = torch.where(joint > 0, joint / outer.clamp_min(1e-300), torch.ones_like(joint))
    return (joint * ratio.log()).sum((1, 2)) / math.log(2)


def separability_index(points: Float[Tensor, "n 2"], *, bins: int = 10, n_angles: int = 90,
                       range_quantile: float = 0.99, return_curve: bool = False):
    """Minimum over rotations of the binned mutual information (bits) between the coordinates.

    Rotations over ``[0, pi/2)`` suffice (a quarter turn maps the grid onto itself). Points beyond
    the grid (the `range_quantile` of the radius) fall into the edge bins.
    """
    if bins < 2 or n_angles < 1 or not 0 < range_quantile <= 1:
        raise InputError(f"need bins >= 2, n_angles >= 1, 0 < range_quantile <= 1; got {bins}, {n_angles}, "
                         f"{range_quantile}")
    p = whiten(points)
    r = torch.quantile(p.norm(dim=1), range_quantile).clamp_min(1e-12)
    edges = torch.linspace(-r.item(), r.item(), bins + 1, dtype=p.dtype)
    angles = torch.arange(n_angles, dtype=p.dtype) * (math.pi / 2 / n_angles)
    c, s = angles.cos()[:, None], angles.sin()[:, None]
    curve_t = _mutual_info_bits(p[:, 0] * c - p[:, 1] * s, p[:, 0] * s + p[:, 1] * c, edges)
    value = float(curve_t.min())
    return (value, angles, curve_t) if return_curve else value


def mixture_index(points: Float[Tensor, "n 2"], *, eps: float = 0.1, n_angles: int = 180, n_offsets: int = 201,
                  max_centres: int = 2000) -> float:
    """Largest fraction of points within ``eps * rms`` of a line ``v.x + c = 0`` (grid search)."""
    if not eps > 0:
        raise InputError(f"eps must be > 0; got {eps}")
    p = whiten(points)
    n = len(p)
    angles = torch.arange(n_angles, dtype=p.dtype) * (math.pi / n_angles)
    dirs = torch.stack([angles.cos(), angles.sin()], 1)  # [A, 2]
    proj = torch.sort(p @ dirs.T, dim=0).values.T  # [A, n] sorted projections (mean 0, var 1)
    stride = max(1, n // max_centres)
    lim = proj.abs().max().item()
    grid = torch.linspace(-lim, lim, n_offsets, dtype=p.dtype).expand(n_angles, -1)
    centres = torch.cat([proj[:, ::stride], grid], 1)  # window centre m = -c
    # rms(v.x + c) = sqrt(var + mean^2) = sqrt(1 + m^2) for whitened points
    half = eps * (1 + centres.pow(2)).sqrt()
    lo = torch.searchsorted(proj.contiguous(), (centres - half).contiguous(), side="right")
    hi = torch.searchsorted(proj.contiguous(), (centres + half).contiguous(), side="left")
    return float((hi - lo).max().item() / n)


def reducibility(points: Float[Tensor, "n dim"], *, n_pcs: int = 4, eps: float = 0.1,
                 bins: int = 10) -> list[dict[str, float | list[int]]]:
    """Both indices on each consecutive pair of principal components (0-1, 1-2, ...).

    Returns one dict per pair: ``pcs``, ``separability`` (bits), ``mixture`` and
    ``irreducibility = separability * (1 - mixture)``.
    """
    x = torch.as_tensor(points).double()
    if x.dim() != 2 or x.shape[1] < 2:
        raise InputError(f"points must be [n, dim] with dim >= 2; got {tuple(x.shape)}")
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(n_pcs, vh.shape[0])
    pcs = x @ vh[:k].T
    out = []
    for i in range(k - 1):
        s = separability_index(pcs[:, i:i + 2], bins=bins)
        m = mixture_index(pcs[:, i:i + 2], eps=eps)
        out.append({"pcs": [i, i + 1], "separability": s, "mixture": m, "irreducibility": s * (1 - m)})
    return out
