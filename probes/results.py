"""``SweepResult``: the table a sweep produces, with views for notebooks, files and plots."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from interp.atomic import write_json
from interp.errors import InputError

METRICS = ("f1", "accuracy", "precision", "recall", "auc", "train_f1")
"""Per-cell metrics of a sweep (test split unless prefixed ``train_``)."""


@dataclass
class SweepResult:
    """Results of :func:`probes.sweep`: one record per (layer, k), plus rankings and top neurons."""

    config: Any
    """The :class:`probes.SweepConfig` used."""
    classes: list
    """[negative class, positive class]."""
    layers: list[str]
    """Layer names in input order."""
    n_train: int
    """Training examples (after undersampling, if any)."""
    n_test: int
    """Test examples."""
    records: list[dict] = field(default_factory=list)
    """One dict per (layer, k): layer, k, method, f1, accuracy, precision, recall, auc, train_f1, neurons, coef."""
    rankings: dict[str, Tensor] = field(default_factory=dict)
    """Per layer, every neuron index, most useful first."""
    top_neurons: dict[str, list[dict]] = field(default_factory=dict)
    """Per layer, the best-ranked neurons each scored alone: neuron, f1, auc, coef."""

    def to_frame(self):
        """The records as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise InputError("to_frame needs pandas (pip install pandas); .records holds the same rows") from e
        return pd.DataFrame(self.records)

    def metric(self, layer: str, k: int, name: str = "f1") -> float:
        """One cell of the table."""
        for r in self.records:
            if r["layer"] == str(layer) and r["k"] == k:
                return r[name]
        raise InputError(f"no cell for layer={layer!r}, k={k}; layers are {self.layers}, "
                         f"ks are {sorted({r['k'] for r in self.records})}")

    def best(self, k: int | None = None, metric: str = "f1") -> dict:
        """The record with the highest `metric` (at sparsity `k` when given)."""
        if metric not in METRICS:
            raise InputError(f"metric={metric!r}; expected one of {METRICS}")
        rows = [r for r in self.records if k is None or r["k"] == k]
        if not rows:
            raise InputError(f"no records at k={k}")
        return max(rows, key=lambda r: (r[metric], -r["k"]))

    def table(self, metric: str = "f1") -> str:
        """A text table: one row per layer, one column per k."""
        ks = sorted({r["k"] for r in self.records})
        lines = ["layer".ljust(28) + "".join(f"k={k}".rjust(8) for k in ks)]
        for layer in self.layers:
            cells = {r["k"]: r[metric] for r in self.records if r["layer"] == layer}
            lines.append(layer[:27].ljust(28) + "".join(
                f"{cells[k]:8.3f}" if k in cells else " " * 8 for k in ks))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain JSON-able content (config, records, top neurons, the first 64 of each ranking)."""
        return {
            "config": dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else self.config,
            "classes": [c if isinstance(c, (str, int, float, bool)) else str(c) for c in self.classes],
            "layers": self.layers, "n_train": self.n_train, "n_test": self.n_test,
            "records": self.records, "top_neurons": self.top_neurons,
            "rankings": {k: v[:64].tolist() for k, v in self.rankings.items()},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (temporary file, then rename)."""
        return write_json(path, self.to_dict(), default=str)

    def plot_f1(self, path: str | os.PathLike | None = None, *, metric: str = "f1", ax=None,
                title: str | None = None, dpi: int = 100):
        """Plot `metric` against k (log scale), one line per layer; saves a PNG when `path` is given."""
        from probes.plots import plot_metric_vs_k

        return plot_metric_vs_k(self, path, metric=metric, ax=ax, title=title, dpi=dpi)

    def plot_top_neurons(self, path: str | os.PathLike | None = None, *, ax=None, title: str | None = None,
                         dpi: int = 100):
        """Heat map of each layer's best-ranked neurons scored alone (F1), annotated with their index."""
        from probes.plots import plot_top_neurons

        return plot_top_neurons(self, path, ax=ax, title=title, dpi=dpi)
