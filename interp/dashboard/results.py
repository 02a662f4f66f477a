"""Read a dashboard's data files back as one plain record per unit (what the pages show).

:func:`load` returns a :class:`DashboardData`; ``units()`` gives, per unit, a dict with ``index``,
``id``, ``name``, ``frequency`` (nonzero activations / positions read), ``max`` (largest
activation, None when it never fired), ``mean`` (mean nonzero activation), ``contexts`` (top
contexts, largest first: ``value``, ``window``, ``position``, ``tokens`` as ``[text, activation]``
pairs and ``center``, the index of the activating token in ``tokens``), ``histogram`` (per bin:
``lo``, ``hi``, ``count``), ``quantiles`` (consecutive histogram bins grouped into about
``n_quantiles`` groups of equal counts: ``lo``, ``hi`` (None: unbounded), ``count`` and the
``samples`` drawn from those bins, as contexts), ``logits_up`` / ``logits_down`` (``[text, value]``)
and ``neighbors`` (``index``, ``name``, ``cosine``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from interp.errors import InputError
from interp.folders import inside

__all__ = ["DashboardData", "load"]


@dataclass
class DashboardData:
    """The data files of one dashboard folder."""

    path: Path
    info: dict[str, Any]
    """``data.json`` (see :mod:`interp.dashboard.collect`)."""
    tensors: dict[str, Tensor]
    """``data.safetensors``."""

    @property
    def n_units(self) -> int:
        return len(self.info["names"])

    def _text(self, i: int) -> str:
        return self.info["vocab"].get(str(i), f"<{i}>")

    def _context(self, tok: Tensor, act: Tensor, value: float, window: int, pos: int) -> dict[str, Any]:
        left = self.info["settings"]["left"]
        pairs = [[self._text(int(t)), float(a)] for t, a in zip(tok.tolist(), act.tolist()) if t >= 0]
        missing = sum(1 for t in tok[:left].tolist() if t < 0)
        return {"value": value, "window": window, "position": pos, "tokens": pairs, "center": left - missing}

    def unit(self, u: int) -> dict[str, Any]:
        """The record of unit number `u` (0-based, in the order of ``names``)."""
        t, info = self.tensors, self.info
        n_tok = max(1, int(info["n_tokens"]))
        count = int(t["count"][u])
        top = t["top_val"][u]
        contexts = [self._context(t["top_tok"][u, j], t["top_act"][u, j], float(top[j]), int(t["top_win"][u, j]),
                                  int(t["top_pos"][u, j])) for j in range(top.shape[0]) if math.isfinite(float(top[j]))]
        edges = info["bin_edges"]
        hist = t["hist"][u].tolist()
        rec = {"index": u, "id": info["ids"][u], "name": info["names"][u], "frequency": count / n_tok,
               "max": contexts[0]["value"] if contexts else None, "mean": float(t["sum"][u]) / count if count else None,
               "contexts": contexts, "histogram": [{"lo": edges[j], "hi": edges[j + 1], "count": c}
                                                   for j, c in enumerate(hist)],
               "quantiles": self._quantiles(u, hist, edges), "logits_up": [], "logits_down": [], "neighbors": []}
        if "logit_up_ids" in t:
            for side in ("up", "down"):
                rec[f"logits_{side}"] = [[self._text(int(i)), float(v)] for i, v in
                                         zip(t[f"logit_{side}_ids"][u].tolist(), t[f"logit_{side}_values"][u].tolist())]
        if "neighbor_ids" in t:
            rec["neighbors"] = [{"index": int(i), "name": info["names"][int(i)], "cosine": float(c)}
                                for i, c in zip(t["neighbor_ids"][u].tolist(), t["neighbor_cos"][u].tolist())]
        return rec

    def _quantiles(self, u: int, hist: list[int], edges: list[float | None]) -> list[dict[str, Any]]:
        total = sum(hist)
        if not total:
            return []
        nq = self.info["settings"]["n_quantiles"]
        nb = len(hist)
        groups: dict[int, list[int]] = {}
        cum = 0
        for j, c in enumerate(hist):
            if c:
                groups.setdefault(min(nq - 1, int(nq * (cum + c / 2) / total)), []).append(j)
            cum += c
        t = self.tensors
        out = []
        for bins in groups.values():
            samples = []
            for j in bins:
                g = u * nb + j
                for s in range(t["smp_key"].shape[1]):
                    if float(t["smp_key"][g, s]) >= 0:
                        samples.append(self._context(t["smp_tok"][g, s], t["smp_act"][g, s], float(t["smp_val"][g, s]),
                                                     int(t["smp_win"][g, s]), int(t["smp_pos"][g, s])))
            samples.sort(key=lambda c: -c["value"])
            out.append({"lo": edges[bins[0]], "hi": edges[bins[-1] + 1], "count": sum(hist[j] for j in bins),
                        "samples": samples})
        return out[::-1]  # largest activations first

    def units(self) -> list[dict[str, Any]]:
        return [self.unit(u) for u in range(self.n_units)]


def load(folder: str | os.PathLike) -> DashboardData:
    """Read ``data.json`` + ``data.safetensors`` written by :func:`interp.dashboard.collect`."""
    folder = Path(folder)
    paths = [inside(folder, n, str(folder), error=InputError) for n in ("data.json", "data.safetensors")]
    try:
        info = json.loads(paths[0].read_text(encoding="utf-8"))
        tensors = load_file(str(paths[1]))
    except (OSError, ValueError, SafetensorError) as e:
        raise InputError(f"{folder} holds no finished dashboard data (data.json + data.safetensors): "
                         f"{' '.join(str(e).split())}; run the data pass first") from None
    from interp.dashboard.collect import FORMAT

    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise InputError(f"{paths[0]}: format {info.get('format') if isinstance(info, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    return DashboardData(folder, info, tensors)
