"""probes: k-sparse and dense linear probes on activations (Gurnee et al. 2023, "Finding Neurons in a Haystack").

>>> import probes
>>> ds = probes.token_dataset(model, tok, texts, ["blocks.5.mlp.hook_post"], label_fn=is_day)
>>> result = probes.sweep(ds.features, ds.labels, groups=ds.groups, ks=(1, 2, 4, 8), method="f_stat")
>>> probes.SparseProbe(k=1).fit(x, y).support_   # the single best neuron
"""

from probes.data import ProbeDataset, aggregate_tokens, sequence_dataset, token_dataset
from probes.estimators import LinearProbe, SparseProbe
from probes.logistic import fit_logistic
from probes.metrics import (accuracy, classification_report, f1, precision, r2, recall, regression_report, roc_auc,
                            spearman)
from probes.plots import plot_metric_vs_k, plot_neuron_activations, plot_top_neurons
from probes.results import SweepResult
from probes.ridge import RidgeProbe
from probes.selection import METHODS, rank_neurons
from probes.split import train_test_split
from probes.sweep import DEFAULT_KS, SweepConfig, sweep

__all__ = [
    "SparseProbe", "LinearProbe", "RidgeProbe", "sweep", "SweepConfig", "SweepResult", "DEFAULT_KS",
    "METHODS", "rank_neurons", "fit_logistic", "token_dataset", "sequence_dataset", "aggregate_tokens",
    "ProbeDataset", "train_test_split", "accuracy", "precision", "recall", "f1", "roc_auc", "r2", "spearman",
    "classification_report", "regression_report", "plot_metric_vs_k", "plot_top_neurons", "plot_neuron_activations",
]
