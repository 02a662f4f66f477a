"""Write a dashboard's data in the batch layout Neuronpedia imports (SAE-Dashboard's ``batch-N.json``).

:func:`neuronpedia_batch` writes ``neuronpedia/batch-0.json``: one JSON object

* ``model_id``: Neuronpedia's id of the model (default: the model name the data records);
* ``layer``: the block number of the site (``blocks.{L}...``), else 0;
* ``sae_set``: the name of the SAE set on Neuronpedia (e.g. ``"res-topk"``);
* ``features``: one object per unit:

  - ``feature_index``: the latent's number in the SAE (``ids`` of the data);
  - ``pos_str`` / ``pos_values``, ``neg_str`` / ``neg_values``: the promoted and suppressed tokens
    and their logit effect (empty lists without directions);
  - ``frac_nonzero``: the frequency (nonzero activations / positions read);
  - ``freq_hist_data_bar_values`` / ``freq_hist_data_bar_heights``: the centre (geometric mean of
    the edges; the open end bins use their finite edge) and the count of every nonempty histogram bin;
  - ``logits_hist_data_bar_values`` / ``logits_hist_data_bar_heights``, ``neuron_alignment_*``,
    ``correlated_neurons_*``, ``correlated_features_*``, ``decoder_weights_dist``: empty (not computed);
  - ``n_prompts_total``: the windows read; ``n_tokens_in_prompt``: their length (``context_size``);
    ``dataset``: the text read (its name, or ``""`` for the built-in offline corpus);
  - ``activations``: the top contexts, each ``bin_min = -1``, ``bin_max`` = the largest activation,
    ``bin_contains = -1`` (Neuronpedia's marks for "top activations"), ``tokens`` and ``values``
    (per-token activations, rounded to 3 decimals), ``qualifying_token_index`` (the token the context
    was chosen for: Neuronpedia highlights it, and reads 0, the first token, when it is missing); then the
    quantile samples, each with its
    quantile's ``bin_min``, ``bin_max`` and ``bin_contains`` (the fraction of nonzero activations
    in that quantile).

Explanations are left out: Neuronpedia stores them separately (an empty list would say the same).
Values are rounded to 3 decimals as SAE-Dashboard rounds them. The keys are those of SAE-Dashboard's
``NeuronpediaDashboardBatch`` / ``NeuronpediaDashboardFeature`` / ``NeuronpediaDashboardActivation`` (0.8),
whose constructors refuse any other key (:data:`FEATURE_KEYS`); the optional ``vector`` and ``sae_id_suffix``
are left out.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from interp.atomic import write_json
from interp.dashboard.results import load

__all__ = ["FEATURE_KEYS", "neuronpedia_batch"]

_EMPTY = ("logits_hist_data_bar_values", "logits_hist_data_bar_heights", "neuron_alignment_indices",
          "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_l1",
          "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
          "correlated_features_pearson", "decoder_weights_dist")


FEATURE_KEYS = frozenset({"feature_index", "pos_str", "pos_values", "neg_str", "neg_values", "frac_nonzero",
                          "freq_hist_data_bar_values", "freq_hist_data_bar_heights", *_EMPTY, "n_prompts_total",
                          "n_tokens_in_prompt", "dataset", "activations"})
"""Every key of a feature object: SAE-Dashboard's ``NeuronpediaDashboardFeature`` takes these and no other."""


def _r(x: float) -> float:
    return round(float(x), 3)


def _centre(lo: float | None, hi: float | None) -> float:
    if lo is None or hi is None or lo == 0 or hi == 0:
        edge = next(e for e in (lo, hi) if e not in (None, 0))
        return edge
    return math.copysign(math.sqrt(lo * hi), lo)


def _activation(ctx: dict[str, Any], lo: float, hi: float, contains: float) -> dict[str, Any]:
    return {"bin_min": lo, "bin_max": hi, "bin_contains": contains, "tokens": [t for t, _ in ctx["tokens"]],
            "values": [_r(a) for _, a in ctx["tokens"]], "qualifying_token_index": ctx["center"]}


def neuronpedia_batch(folder: str | os.PathLike, *, sae_set: str, model_id: str | None = None,
                      layer: int | None = None) -> Path:
    """Write ``<folder>/neuronpedia/batch-0.json`` from the dashboard data in `folder` (fields above)."""
    data = load(folder)
    info = data.info
    settings = info.get("settings") or {}
    if layer is None:
        m = re.match(r"blocks\.(\d+)\.", info["site"])
        layer = int(m.group(1)) if m else 0
    features = []
    for u in range(data.n_units):
        rec = data.unit(u)
        hist = [h for h in rec["histogram"] if h["count"]]
        acts = [_activation(c, -1, _r(rec["max"]), -1) for c in rec["contexts"]]
        total = sum(q["count"] for q in rec["quantiles"]) or 1
        for q in rec["quantiles"]:
            lo = q["lo"] if q["lo"] is not None else min(s["value"] for s in q["samples"]) if q["samples"] else 0.0
            hi = q["hi"] if q["hi"] is not None else rec["max"] or 0.0
            acts += [_activation(s, _r(lo), _r(hi), _r(q["count"] / total)) for s in q["samples"]]
        features.append({
            "feature_index": rec["id"],
            "pos_str": [t for t, _ in rec["logits_up"]], "pos_values": [_r(v) for _, v in rec["logits_up"]],
            "neg_str": [t for t, _ in rec["logits_down"]], "neg_values": [_r(v) for _, v in rec["logits_down"]],
            "frac_nonzero": rec["frequency"],
            "freq_hist_data_bar_values": [_r(_centre(h["lo"], h["hi"])) for h in hist],
            "freq_hist_data_bar_heights": [h["count"] for h in hist],
            **{k: [] for k in _EMPTY},
            "n_prompts_total": info["n_windows"], "n_tokens_in_prompt": settings.get("context_size", 0),
            "dataset": settings.get("dataset") or "",
            "activations": acts,
        })
    batch = {"model_id": model_id or info["model"], "layer": layer, "sae_set": sae_set, "features": features}
    return write_json(Path(folder) / "neuronpedia" / "batch-0.json", batch)
