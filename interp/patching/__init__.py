"""Patching sweeps: how much of a behaviour each (site, position) carries, on any HF causal LM.

:func:`activation_patching` runs every cell exactly (built on :func:`interp.intervene` and
:class:`interp.edits.Patch`); :func:`attribution_patching` estimates every cell from gradients in one
forward and one backward pass per prompt pair. Both return a :class:`PatchingResult` (table, heatmap,
files); :func:`agreement` compares two of them. The spec-file runner behind ``interp patch`` is
:mod:`interp.patching.spec`.
"""

from interp.patching.grid import SITE_KINDS, Row, expand_sites
from interp.patching.metrics import KL, FnMetric, LogitDiff, Metric, Prob, as_metric, kl, logit_diff, prob
from interp.patching.result import PatchingResult, agreement, effect_cells, effect_spearman, spearman
from interp.patching.sweep import activation_patching, attribution_patching

__all__ = [
    "activation_patching", "attribution_patching", "PatchingResult", "agreement", "effect_cells", "effect_spearman",
    "spearman", "expand_sites", "SITE_KINDS", "Row",
    "Metric", "LogitDiff", "Prob", "KL", "FnMetric", "logit_diff", "prob", "kl", "as_metric",
]
