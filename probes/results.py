"""``SweepResult``: the table a sweep produces, with views for notebooks, files and plots.

One record per (site, n_neurons) cell. Names changed in this release, the old ones still work with a
DeprecationWarning: record keys ``"layer"`` -> ``"site"`` and ``"k"`` -> ``"n_neurons"`` (``rec["k"]``
still reads), ``SweepResult.layers`` -> ``.sites``, and the keywords ``layer=`` / ``k=`` of
:meth:`SweepResult.metric` and :meth:`SweepResult.best`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from interp.atomic import write_json
from interp.deprecation import RenamedKeys, renamed_fields, renamed_keywords
from interp.errors import InputError

METRICS = ("f1", "accuracy", "precision", "recall", "auc", "train_f1")
"""Per-cell metrics of a classification sweep (test split unless prefixed ``train_``)."""
REGRESSION_METRICS = ("r2", "spearman", "train_r2")
"""Per-cell metrics of a regression sweep (:func:`probes.sweep_regression`)."""


def _is_nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


class SweepRecord(RenamedKeys):
    """One cell of a sweep: ``site``, ``n_neurons``, ``method``, the :data:`METRICS`, ``neurons`` (the
    support, best first) and ``coef``. The old keys ``"layer"`` and ``"k"`` still read, with a warning."""

    _renamed: ClassVar[dict[str, str]] = {"layer": "site", "k": "n_neurons"}
    _owner: ClassVar[str] = "probes.SweepResult record"


@renamed_fields({"layers": "sites"})
@dataclass
class SweepResult:
    """Results of :func:`probes.sweep` (binary labels) or :func:`probes.sweep_regression` (numeric
    targets): one record per (site, n_neurons), plus rankings and (classification) top neurons."""

    config: Any
    """The :class:`probes.SweepConfig` used."""
    classes: list
    """[negative class, positive class]."""
    sites: list[str]
    """Site names (e.g. ``blocks.5.mlp.hook_post``) in input order."""
    n_train: int
    """Training examples (after undersampling, if any)."""
    n_test: int
    """Test examples."""
    records: list[dict] = field(default_factory=list)
    """One :class:`SweepRecord` per (site, n_neurons): site, n_neurons, method, f1, accuracy, precision,
    recall, auc, train_f1, neurons, coef."""
    rankings: dict[str, Tensor] = field(default_factory=dict)
    """Per site, every neuron index, most useful first."""
    top_neurons: dict[str, list[dict]] = field(default_factory=dict)
    """Per site, the best-ranked neurons each scored alone: neuron, f1, auc, coef (classification)."""
    metrics: tuple[str, ...] = METRICS
    """The per-cell metrics: :data:`METRICS` for classification, :data:`REGRESSION_METRICS` for
    regression; the first is the default of :meth:`best`, :meth:`table` and :meth:`plot_f1`."""

    def to_frame(self):
        """The records as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise InputError("to_frame needs pandas (pip install pandas); .records holds the same rows") from e
        return pd.DataFrame(self.records)

    def _n_neurons(self) -> list[int]:
        return sorted({r["n_neurons"] for r in self.records})

    @renamed_keywords({"layer": "site", "k": "n_neurons"})
    def metric(self, site: str, n_neurons: int, name: str = "f1") -> float:
        """One cell of the table: `name` of the probe with `n_neurons` neurons at `site`."""
        for r in self.records:
            if r["site"] == str(site) and r["n_neurons"] == n_neurons:
                return r[name]
        raise InputError(f"no cell for site={site!r}, n_neurons={n_neurons}; sites are {self.sites}, "
                         f"n_neurons values are {self._n_neurons()}")

    @renamed_keywords({"k": "n_neurons"})
    def best(self, n_neurons: int | None = None, metric: str | None = None) -> dict:
        """The record with the highest `metric` (default: the first of :attr:`metrics`), among probes
        with `n_neurons` neurons when given. Records whose metric is NaN (undefined) are skipped;
        InputError when every one is.

        The metrics are test-split scores, so the best of several sites is chosen on the test split: its score
        is optimistic by that choice. To report a held-out score for the chosen site, choose it on a validation
        split (a sweep over the training rows only) and score that site on the test rows."""
        metric = metric or self.metrics[0]
        if metric not in self.metrics:
            raise InputError(f"metric={metric!r}; expected one of {self.metrics}")
        rows = [r for r in self.records if n_neurons is None or r["n_neurons"] == n_neurons]
        if not rows:
            raise InputError(f"no records at n_neurons={n_neurons}; the sweep has n_neurons {self._n_neurons()}")
        scored = [r for r in rows if not _is_nan(r[metric])]  # max() never replaces a NaN key: skip them
        if not scored:
            raise InputError(f"every record{'' if n_neurons is None else f' at n_neurons={n_neurons}'} has "
                             f"{metric}=NaN (undefined, e.g. a constant prediction or a single class); "
                             f"choose another metric from {self.metrics}")
        return max(scored, key=lambda r: (r[metric], -r["n_neurons"]))

    def table(self, metric: str | None = None) -> str:
        """A text table of `metric` (default: the first of :attr:`metrics`): one row per site, one column
        per n_neurons (the header names both)."""
        metric = metric or self.metrics[0]
        sizes = self._n_neurons()
        lines = ["site \\ n_neurons".ljust(28) + "".join(f"{n}".rjust(8) for n in sizes)]
        for site in self.sites:
            cells = {r["n_neurons"]: r[metric] for r in self.records if r["site"] == site}
            lines.append(site[:27].ljust(28) + "".join(
                f"{cells[n]:8.3f}" if n in cells else " " * 8 for n in sizes))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain JSON-able content (config, records, top neurons, the first 64 of each ranking)."""
        return {
            "config": dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else self.config,
            "classes": [c if isinstance(c, (str, int, float, bool)) else str(c) for c in self.classes],
            "sites": self.sites, "n_train": self.n_train, "n_test": self.n_test, "metrics": list(self.metrics),
            "records": self.records, "top_neurons": self.top_neurons,
            "rankings": {k: v[:64].tolist() for k, v in self.rankings.items()},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (temporary file, then rename).

        Fields: ``config`` (the :class:`probes.SweepConfig`), ``classes`` ([negative, positive]),
        ``sites``, ``n_train``, ``n_test``, ``metrics`` (the per-cell metric names), ``records`` (one per
        (site, n_neurons): ``site``,
        ``n_neurons``, ``method``, test ``f1``, ``accuracy``, ``precision``, ``recall``, ``auc``,
        ``train_f1``, ``neurons`` (the support, best first) and ``coef``), ``top_neurons`` (per site,
        the best-ranked neurons scored alone: ``neuron``, ``f1``, ``auc``, ``coef``) and ``rankings``
        (per site, the first 64 neuron indices, most useful first)."""
        return write_json(path, self.to_dict(), default=str)

    def plot_f1(self, path: str | os.PathLike | None = None, *, metric: str | None = None, ax=None,
                title: str | None = None, dpi: int = 100):
        """Plot `metric` (default: the first of :attr:`metrics`: F1, or R^2 for a regression sweep) against
        n_neurons (log scale), one line per site; saves a PNG when `path` is given."""
        from probes.plots import plot_metric_vs_n_neurons

        return plot_metric_vs_n_neurons(self, path, metric=metric or self.metrics[0], ax=ax, title=title, dpi=dpi)

    def plot_top_neurons(self, path: str | os.PathLike | None = None, *, ax=None, title: str | None = None,
                         dpi: int = 100):
        """Heat map of each site's best-ranked neurons scored alone (F1), annotated with their index."""
        from probes.plots import plot_top_neurons

        return plot_top_neurons(self, path, ax=ax, title=title, dpi=dpi)
