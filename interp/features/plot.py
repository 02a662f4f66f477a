"""Plots of activations projected onto a Subspace, labelled by class.

Uses matplotlib's object API (``matplotlib.figure.Figure``) so nothing touches pyplot's global
state or needs a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import matplotlib
import torch
from jaxtyping import Float
from matplotlib.figure import Figure
from torch import Tensor

from interp.errors import InputError
from interp.subspace import CircleMap, Subspace


def plot_projection(subspace: Subspace, acts: Float[Tensor, "n d_model"] | None = None,
                    labels: Sequence[str] | None = None, *, coords: Float[Tensor, "n rank"] | None = None,
                    dims: tuple[int, int] = (0, 1), order: Sequence[str] | None = None, title: str = "",
                    ax=None, path: str | os.PathLike | None = None, max_points: int = 5000):
    """Scatter of ``subspace.project(acts)`` (or given `coords`) in two of its coordinates.

    Points are coloured by `labels` (classes in `order` if given, using a cyclic colour map so
    neighbouring classes of a cyclic family get neighbouring colours); each class mean is marked and
    named. A :class:`CircleMap` is drawn as its fitted circle with each class's fitted angle.
    Returns the matplotlib Axes; with `path`, also saves the figure (PNG, 120 dpi).
    """
    if coords is None:
        if acts is None:
            raise InputError("pass acts (projected here) or coords")
        coords = subspace.project(torch.as_tensor(acts).float().cpu())
    coords = torch.as_tensor(coords).float().cpu()
    if coords.dim() != 2 or max(dims) >= coords.shape[1]:
        raise InputError(f"coords must be [n, rank] with rank > {max(dims)}; got {tuple(coords.shape)}")
    if labels is not None and len(labels) != len(coords):
        raise InputError(f"got {len(coords)} points but {len(labels)} labels")
    if ax is None:
        fig = Figure(figsize=(5.5, 5))
        ax = fig.add_subplot()
    keep = torch.arange(len(coords))
    if len(coords) > max_points:
        keep = torch.randperm(len(coords), generator=torch.Generator().manual_seed(0))[:max_points]
    x, y = coords[:, dims[0]], coords[:, dims[1]]
    if labels is None:
        ax.scatter(x[keep], y[keep], s=4, color="0.3", alpha=0.5, linewidths=0)
    else:
        labels = [str(v) for v in labels]
        classes = [c for c in (order or dict.fromkeys(labels)) if c in set(labels)]
        cmap = matplotlib.colormaps["hsv" if order is not None else "tab10"]
        keep_set = set(keep.tolist())
        others = [j for j, v in enumerate(labels) if v not in set(classes) and j in keep_set]
        if others:  # rows whose label is outside `order` (e.g. non-day tokens): light grey, unnamed
            ax.scatter(x[others], y[others], s=3, color="0.75", alpha=0.4, linewidths=0)
        for i, c in enumerate(classes):
            idx = [j for j, v in enumerate(labels) if v == c]
            color = cmap(i / max(len(classes), 1)) if order is not None else cmap(i % 10)
            shown = [j for j in idx if j in keep_set]
            ax.scatter(x[shown], y[shown], s=6, color=color, alpha=0.35, linewidths=0)
            mx, my = x[idx].mean().item(), y[idx].mean().item()
            ax.scatter([mx], [my], s=60, color=color, edgecolors="k", zorder=3)
            ax.annotate(c, (mx, my), textcoords="offset points", xytext=(5, 5), fontsize=9, zorder=4)
    cm = subspace.coord_map
    if isinstance(cm, CircleMap) and dims == (0, 1):
        t = torch.linspace(0, 2 * math.pi, 200)
        cx, cy = cm.center.tolist()
        ax.plot(cx + cm.radius * t.cos(), cy + cm.radius * t.sin(), "k--", lw=0.8, label="fitted circle")
    ev = subspace.meta.get("explained_variance")
    for setter, d in ((ax.set_xlabel, dims[0]), (ax.set_ylabel, dims[1])):
        setter(f"coord {d}" + (f" ({100 * ev[d]:.0f}% of class-mean var.)" if ev and d < len(ev) else ""))
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title or repr(subspace), fontsize=10)
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
    return ax


def plot_clusters(features: Sequence, path: str | os.PathLike | None = None, *, top: int = 12, cols: int = 4):
    """Grid of the best principal-component pair of each scored SAE cluster (most irreducible first)."""
    feats = list(features)[:top]
    if not feats:
        raise InputError("no clusters to plot")
    rows = math.ceil(len(feats) / cols)
    fig = Figure(figsize=(3.2 * min(cols, len(feats)), 3.2 * rows))
    for i, f in enumerate(feats):
        ax = fig.add_subplot(rows, min(cols, len(feats)), i + 1)
        p = f.points
        if f.label_angles:
            plot_projection(f.subspace, coords=p, labels=_row_labels(f), ax=ax, order=list(f.label_angles),
                            title=" ")
        else:
            ax.scatter(p[:, 0], p[:, 1], s=3, color="0.3", alpha=0.4, linewidths=0)
            ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(f"#{i} {len(f.latents)} latents, n={f.n_points}\nS={f.separability:.2f} M={f.mixture:.2f}"
                     + (" circle" if f.is_circle else ""), fontsize=8)
        ax.set_xlabel(f"PC{f.best_pair[0]}", fontsize=7)
        ax.set_ylabel(f"PC{f.best_pair[1]}", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _row_labels(feature) -> list[str]:
    labels = getattr(feature, "row_labels", None)
    return labels if labels is not None else ["?"] * len(feature.points)


def plot_layer_scores(rows: Sequence[dict], path: str | os.PathLike | None = None, *,
                      keys: Sequence[str] = ("loco_angle_error", "radius_cv", "top2_explained"), title: str = ""):
    """One line per score across layers (``rows``: dicts with ``layer`` and the score keys)."""
    fig = Figure(figsize=(6.5, 3.5))
    ax = fig.add_subplot()
    layers = [r["layer"] for r in rows]
    for k in keys:
        ax.plot(layers, [r.get(k, float("nan")) for r in rows], marker="o", ms=3, label=k)
    ax.set_xlabel("layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
