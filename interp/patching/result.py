"""The result of a patching sweep: a grid of cells (row = what was patched, column = position), its
table, its heatmap and the files it is saved as.

:meth:`PatchingResult.save` writes three files into a folder (``NAME`` defaults to ``patching``):

``NAME.csv``, one line per cell:
  ``row`` (the grid row's label), ``site``, ``unit`` (empty: the whole activation; ``subspace``;
  ``n12`` or ``n3+n7``: those neurons), ``position`` (column of the patched run's prompt, pair 0),
  ``source_position`` (column of the source prompt it was taken from), ``token`` and ``source_token``
  (the tokens there, pair 0), ``effect`` (metric after the patch minus the patched run's own metric,
  mean over pairs; for attribution patching the first-order estimate of it) and ``normalized``
  (``effect`` over the gap source metric minus base metric, both means over pairs: 1 = the
  patch moves the metric all the way to the source run's value, 0 = no change).
``NAME.json``:
  ``method`` (``exact`` or ``attribution``), ``direction`` (``denoise``: clean activations patched
  into the corrupted run; ``noise``: corrupted into clean), ``metric`` (its description),
  ``clean_metric`` / ``corrupted_metric`` (each run's metric, mean over pairs), ``rows``,
  ``sites``, ``units``, ``positions``, ``source_positions``, ``tokens``, ``source_tokens`` (as in
  the CSV; per grid row or column), ``effects`` (``[pairs][rows][positions]``), ``base_metric`` and
  ``source_metric`` (per pair), ``n_pairs``, ``prompts`` (``{clean: [...], corrupted: [...]}``),
  ``model`` and ``seconds`` (wall time of the sweep).
``NAME.png``: the heatmap (:meth:`PatchingResult.plot`).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from matplotlib.figure import Figure
from torch import Tensor

from interp.atomic import atomic_path, write_json
from interp.errors import InputError

_KIND = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass
class PatchingResult:
    """Per-pair effects of patching each cell, with the labels needed to read them."""

    method: str
    """``exact`` (every cell run) or ``attribution`` (first-order estimate from gradients)."""
    direction: str
    """``denoise`` (clean into corrupted) or ``noise`` (corrupted into clean)."""
    metric: dict
    """Description of the metric (``Metric.describe()``)."""
    rows: list[str]
    """Label of each grid row: the site, plus ``[unit]`` when part of the activation is patched."""
    sites: list[str]
    units: list[str]
    positions: list[int]
    """Columns of the patched (base) run's prompt, pair 0."""
    source_positions: list[int]
    tokens: list[str]
    source_tokens: list[str]
    effects: Float[Tensor, "pairs rows positions"]
    base_metric: Float[Tensor, " pairs"]
    source_metric: Float[Tensor, " pairs"]
    prompts: dict = field(default_factory=dict)
    model: str = ""
    seconds: float = 0.0

    @property
    def effect(self) -> Float[Tensor, "rows positions"]:
        """Mean effect over prompt pairs."""
        return self.effects.mean(0)

    @property
    def gap(self) -> float:
        """Source metric minus base metric, means over pairs (what a full patch would move)."""
        return float(self.source_metric.mean() - self.base_metric.mean())

    @property
    def normalized(self) -> Float[Tensor, "rows positions"]:
        """``effect / gap``: 1 = moved all the way to the source run's metric (NaN when the gap is 0)."""
        return self.effect / self.gap if self.gap != 0 else torch.full_like(self.effect, float("nan"))

    @property
    def clean_metric(self) -> float:
        return float((self.source_metric if self.direction == "denoise" else self.base_metric).mean())

    @property
    def corrupted_metric(self) -> float:
        return float((self.base_metric if self.direction == "denoise" else self.source_metric).mean())

    def labels(self) -> list[str]:
        """Column labels: ``column:token``, or ``column:clean/corrupted`` where the prompts differ."""
        out = []
        for p, t, s in zip(self.positions, self.tokens, self.source_tokens):
            clean, corrupt = (s, t) if self.direction == "denoise" else (t, s)
            out.append(f"{p}:{clean!r}" if clean == corrupt else f"{p}:{clean!r}/{corrupt!r}")
        return out

    def table(self) -> list[dict]:
        """One dict per cell: row, site, unit, position, source_position, token, source_token, effect, normalized."""
        eff, norm = self.effect, self.normalized
        return [{"row": r, "site": self.sites[i], "unit": self.units[i], "position": self.positions[k],
                 "source_position": self.source_positions[k], "token": self.tokens[k],
                 "source_token": self.source_tokens[k], "effect": float(eff[i, k]), "normalized": float(norm[i, k])}
                for i, r in enumerate(self.rows) for k in range(len(self.positions))]

    def top(self, n: int = 10, *, by: str = "effect") -> list[dict]:
        """The ``n`` cells with the largest ``|effect|`` (or ``|normalized|``)."""
        return sorted(self.table(), key=lambda r: -abs(r[by]) if r[by] == r[by] else 0.0)[:n]

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("effects", "base_metric", "source_metric"):
            d[k] = getattr(self, k).tolist()
        return {**d, "clean_metric": self.clean_metric, "corrupted_metric": self.corrupted_metric,
                "n_pairs": int(self.effects.shape[0])}

    @classmethod
    def from_dict(cls, d: dict) -> PatchingResult:
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("effects", "base_metric", "source_metric"):
            kw[k] = torch.tensor(d[k], dtype=torch.float32)
        return cls(**kw)

    def plot(self, path: str | os.PathLike | None = None, *, value: str = "normalized", title: str | None = None,
             axes=None, vmax: float | None = None) -> Figure:
        """Heatmap of the grid (``value``: ``normalized`` or ``effect``), token labels below, one panel per
        kind of site (``hook_resid_post``, ``hook_attn_out`` ...) with layers as rows; a shared,
        symmetric colour scale. ``axes``: draw into these (one per panel) instead of a new Figure."""
        if value not in ("normalized", "effect"):
            raise InputError(f"value must be 'normalized' or 'effect'; got {value!r}")
        grid = (self.normalized if value == "normalized" else self.effect).float()
        if value == "normalized" and bool(torch.isnan(grid).all()):
            grid = self.effect.float()  # no gap: show the raw effect
            value = "effect"
        panels: dict[str, list[int]] = {}
        for i, (site, unit) in enumerate(zip(self.sites, self.units)):
            m = _KIND.match(site)
            kind = m.group(2).replace("mlp.hook_post", "mlp_post").replace("hook_", "") if m else "other"
            panels.setdefault(kind + (f" [{unit}]" if unit and not unit.startswith("n") else ""), []).append(i)
        finite = grid[torch.isfinite(grid)]
        vmax = vmax or (float(finite.abs().max()) if finite.numel() else 1.0) or 1.0
        n_cols = len(self.positions)
        if axes is None:
            height = 1.6 + 0.16 * max(len(v) for v in panels.values())
            fig = Figure(figsize=(min(1.5 + 0.3 * n_cols, 9.0) * len(panels) + 1.0, height), layout="constrained")
            axes = fig.subplots(1, len(panels), squeeze=False)[0]
        else:
            axes = list(axes) if isinstance(axes, (list, tuple)) else [axes]
            fig = axes[0].figure
        if len(axes) != len(panels):
            raise InputError(f"this result has {len(panels)} panels ({list(panels)}); got {len(axes)} axes")
        xlabels = self.labels()
        im = None
        for ax, (kind, idx) in zip(axes, panels.items()):
            im = ax.imshow(grid[idx].numpy(), cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto",
                           interpolation="nearest")
            ax.set_yticks(range(len(idx)), [_row_label(self.rows[i]) for i in idx], fontsize=6)
            ax.set_xticks(range(n_cols), xlabels, rotation=90, fontsize=6)
            ax.set_title(kind, fontsize=8)
        fig.colorbar(im, ax=list(axes), shrink=0.8,
                     label="fraction restored" if value == "normalized" else f"change of {self.metric['type']}")
        fig.suptitle(title or f"{self.method} patching ({self.direction}), {self.metric['type']}", fontsize=9)
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        return fig

    def save(self, folder: str | os.PathLike, name: str = "patching", *, plot: bool = True) -> Path:
        """Write ``NAME.csv``, ``NAME.json`` and ``NAME.png`` into ``folder`` (fields: module docstring)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        rows = self.table()
        with atomic_path(out / f"{name}.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        write_json(out / f"{name}.json", self.to_dict(), indent=1)
        if plot:
            with atomic_path(out / f"{name}.png") as tmp:
                self.plot().savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        return out


def _row_label(row: str) -> str:
    m = _KIND.match(row)
    if not m:
        return row
    unit = m.group(2).partition("[")[2]
    return f"L{m.group(1)}" + (f" [{unit}" if unit else "")


def _ranks(x: Tensor) -> Tensor:
    """Ranks with ties averaged (for Spearman's correlation)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else float("nan")


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two tensors of the same size (ties get their average rank)."""
    return _pearson(_ranks(a.flatten()), _ranks(b.flatten()))


EFFECT_FLOOR = 1e-4
"""Cells whose |reference effect| is at most this fraction of the largest one count as no effect (see
:func:`effect_cells`)."""


def effect_cells(reference: Tensor, floor: float = EFFECT_FLOOR) -> Tensor:
    """Boolean mask of the cells of ``reference`` (effects) above ``floor`` times its largest |effect|.

    Exact patching gives float noise where a patch changes nothing (a position before the prompts differ),
    attribution an exact 0 there; where such cells are most of the grid, a rank correlation over every cell
    mostly ranks that noise. On the benchmark's 64-token pair of the embedded model (``benchmarks/patching.py``,
    30 layers, 1,920 cells; noise up to 1.05e-5 against a largest effect of 3.21), Spearman of attribution
    against exact was 0.919 over every cell on the CPU (0.625 on a GPU, whose noise differs), 0.999 over the
    283 cells above this floor (224 cells at 1e-3, 291 at 1e-5: 0.999 each), and noise of 1e-7 added to both
    took the every-cell value to 0.40.
    """
    if not 0 <= floor < 1:
        raise InputError(f"floor must be a fraction of the largest effect in [0, 1); got {floor!r}")
    mag = reference.abs().nan_to_num(0.0)
    return mag > floor * mag.max() if mag.numel() else mag.bool()


def effect_spearman(reference: Tensor, estimate: Tensor, floor: float = EFFECT_FLOOR) -> tuple[float, int]:
    """Spearman of ``estimate`` against ``reference`` over :func:`effect_cells` of ``reference``, and how many
    cells that is (NaN where fewer than two)."""
    rho, _, n = _over_effect_cells(reference, estimate, floor)
    return rho, n


def _over_effect_cells(a: Tensor, b: Tensor, floor: float) -> tuple[float, float, int]:
    """Spearman and Pearson of ``b`` against ``a`` over :func:`effect_cells` of ``a`` (NaN below two cells),
    and how many cells that is."""
    cells = effect_cells(a, floor)
    n = int(cells.sum())
    if n < 2:
        return float("nan"), float("nan"), n
    return spearman(a[cells], b[cells]), _pearson(a[cells], b[cells]), n


def agreement(reference: PatchingResult, estimate: PatchingResult, *, top: int = 10,
              floor: float = EFFECT_FLOOR) -> dict:
    """How well ``estimate`` (e.g. attribution patching) matches ``reference`` (exact patching) cell by cell.

    Returns ``spearman`` and ``pearson`` over all cells (mean effects); ``spearman_effect_cells`` and
    ``pearson_effect_cells`` over the ``n_effect_cells`` cells whose |reference effect| is above ``floor``
    times the largest (:func:`effect_cells`: where most cells have no effect, the every-cell figures mostly
    rank float noise; read these); ``sign_agreement`` (fraction of cells with |reference normalized effect|
    > 0.05 whose signs match), ``top_overlap`` (shared cells among each one's ``top`` largest |effect|),
    ``per_row_spearman`` (one per grid row) and ``disagreements``: the ``top`` cells with the largest
    |difference| of normalized effects.
    """
    if (reference.rows, reference.positions) != (estimate.rows, estimate.positions):
        raise InputError("the two results have different grids (rows or positions); run both sweeps with the same "
                         "sites, positions and prompts")
    a, b = reference.effect.flatten(), estimate.effect.flatten()
    na, nb = reference.normalized.flatten(), estimate.normalized.flatten()
    big = na.abs() > 0.05
    k = min(top, a.numel())
    ta, tb = set(a.abs().topk(k).indices.tolist()), set(b.abs().topk(k).indices.tolist())
    n_pos = len(reference.positions)
    diff = (na - nb).abs()
    worst = diff.nan_to_num(0.0).topk(k).indices.tolist()
    per_row = {}
    for i, r in enumerate(reference.rows):
        ra, rb = reference.effect[i], estimate.effect[i]
        per_row[r] = spearman(ra, rb) if ra.std() > 0 and rb.std() > 0 else float("nan")
    rho, r, n_effect = _over_effect_cells(a, b, floor)
    return {"spearman": spearman(a, b), "pearson": _pearson(a, b), "n_cells": int(a.numel()),
            "spearman_effect_cells": rho, "pearson_effect_cells": r, "n_effect_cells": n_effect, "effect_floor": floor,
            "sign_agreement": float((torch.sign(na[big]) == torch.sign(nb[big])).float().mean()) if big.any() else
            float("nan"), "n_cells_over_0.05": int(big.sum()), "top_overlap": len(ta & tb) / k,
            "per_row_spearman": per_row,
            "disagreements": [{"row": reference.rows[j // n_pos], "position": reference.positions[j % n_pos],
                               "token": reference.tokens[j % n_pos], "exact_normalized": float(na[j]),
                               "estimate_normalized": float(nb[j]), "exact_effect": float(a[j]),
                               "estimate_effect": float(b[j])} for j in worst]}
