"""Matplotlib figures for probe sweeps: metric against n_neurons, top-neuron heat map, activation histograms.

Every function draws on `ax` (or a new figure), saves a PNG when `path` is given, and returns the figure.
matplotlib is imported when a plot is asked for, never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from interp.deprecation import renamed_function
from probes.split import encode_labels


def _figure(ax, size):
    import matplotlib

    if ax is None:
        if not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend().lower():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=size)
        return fig, ax
    return ax.figure, ax


def _save(fig, path, dpi: int) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")


def plot_metric_vs_n_neurons(result, path=None, *, metric: str = "f1", ax=None, title: str | None = None,
                             dpi: int = 100):
    """`metric` against n_neurons for every site of a :class:`probes.SweepResult` (sites coloured in input
    order, i.e. by depth for one site kind per layer)."""
    import matplotlib.pyplot as plt

    fig, ax = _figure(ax, (7, 4.5))
    cmap = plt.get_cmap("viridis")
    n = max(len(result.sites) - 1, 1)
    for i, site in enumerate(result.sites):
        rows = sorted((r["n_neurons"], r[metric]) for r in result.records if r["site"] == site)
        if rows:
            sizes, vals = zip(*rows)
            ax.plot(sizes, vals, marker="o", ms=3, lw=1.2, color=cmap(i / n), label=site)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n_neurons (neurons in the probe)")
    ax.set_ylabel(f"test {metric}")
    method = getattr(result.config, "method", None)  # a regression sweep's config has none
    ax.set_title(title or f"{metric} against n_neurons" + (f" ({method})" if method else ""))
    ax.grid(alpha=0.3)
    if len(result.sites) <= 12:
        ax.legend(fontsize=7, ncol=2)
    else:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(result.sites) - 1))
        fig.colorbar(sm, ax=ax, label="site index")
    _save(fig, path, dpi)
    return fig


plot_metric_vs_k = renamed_function("plot_metric_vs_k", plot_metric_vs_n_neurons)


def plot_top_neurons(result, path=None, *, ax=None, title: str | None = None, dpi: int = 100):
    """Rows: sites; columns: rank 1..top_n; colour: that neuron's F1 alone; text: its index."""
    sites = [site for site in result.sites if site in result.top_neurons]
    top = max((len(result.top_neurons[site]) for site in sites), default=0)
    fig, ax = _figure(ax, (1.0 + 0.75 * top, 0.9 + 0.28 * len(sites)))
    grid = torch.full((len(sites), top), float("nan"))
    for i, site in enumerate(sites):
        for j, cell in enumerate(result.top_neurons[site]):
            grid[i, j] = cell["f1"]
            ax.text(j, i, str(cell["neuron"]), ha="center", va="center", fontsize=6.5)
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set_yticks(range(len(sites)), [site[:24] for site in sites], fontsize=7)
    ax.set_xticks(range(top), [str(j + 1) for j in range(top)])
    ax.set_xlabel("rank of the neuron (selection order)")
    ax.set_title(title or "best single neurons per site (colour: test F1 alone, text: index)", fontsize=9)
    fig.colorbar(im, ax=ax, label="F1 of the neuron alone")
    _save(fig, path, dpi)
    return fig


def plot_neuron_activations(
    values: Float[Tensor, " n"], labels, path=None, *, ax=None, title: str = "", class_names=None,
    dpi: int = 100,
):
    """Histograms of one neuron's activations on held-out examples, split by class.

    `labels` are any two values (as the probes take them; the larger is the positive class); `class_names`
    default to those two values, or "negative"/"positive" for 0/1 and booleans."""
    v = torch.as_tensor(values).float()
    y01, classes = encode_labels(labels, v.shape[0])
    y = y01.bool()
    if class_names is None:
        class_names = ("negative", "positive") if classes in ([0, 1], [False, True]) else tuple(map(str, classes))
    fig, ax = _figure(ax, (4.5, 3))
    lo, hi = float(v.min()), float(v.max())
    bins = torch.linspace(lo, hi if hi > lo else lo + 1, 41).numpy()
    ax.hist(v[~y].numpy(), bins=bins, alpha=0.6, density=True, label=f"{class_names[0]} (n={int((~y).sum())})")
    ax.hist(v[y].numpy(), bins=bins, alpha=0.6, density=True, label=f"{class_names[1]} (n={int(y.sum())})")
    ax.set_xlabel("activation")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path, dpi)
    return fig
