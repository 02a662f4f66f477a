"""probes: sparse and dense linear probes on activations (Gurnee et al. 2023, "Finding Neurons in a Haystack").

>>> import probes
>>> ds = probes.token_dataset(model, tok, texts, ["blocks.5.mlp.hook_post"], label_fn=is_day)
>>> result = probes.sweep(ds.acts, ds.labels, groups=ds.groups, n_neurons=(1, 2, 4, 8), method="f_stat")
>>> probes.SparseProbe(n_neurons=1).fit(x, y).support_   # the single best neuron
>>> probes.sweep_regression(ds.acts, years, groups=ds.groups).table()  # held-out R^2 per site and n_neurons

``n_neurons`` is the number of neurons a probe may use (the paper's k); a sweep's records name the
``site`` the activations come from. :func:`first_letter_absorption` measures the feature absorption of
any sparse dictionary (an encode callable and its decoder rows) with these probes. The previous names
(``k=``, ``ks=``, ``DEFAULT_KS``, ``plot_metric_vs_k``, ``ProbeDataset.features``, record keys ``"k"`` /
``"layer"``) still work for one release, with a DeprecationWarning.
"""

from interp.deprecation import renamed_module_attributes
from probes.absorption import AbsorptionConfig, LetterData, first_letter_absorption, first_letter_data, letter_probes
from probes.data import ProbeDataset, aggregate_tokens, sequence_dataset, token_dataset
from probes.estimators import LinearProbe, SparseProbe
from probes.logistic import fit_logistic
from probes.metrics import (
                            accuracy,
                            classification_report,
                            f1,
                            precision,
                            r2,
                            recall,
                            regression_report,
                            roc_auc,
                            spearman,
)
from probes.plots import plot_metric_vs_n_neurons, plot_neuron_activations, plot_top_neurons
from probes.regression import RegressionSweepConfig, sweep_regression
from probes.results import SweepRecord, SweepResult
from probes.ridge import RidgeProbe
from probes.selection import METHODS, rank_neurons
from probes.split import train_test_split
from probes.sweep import DEFAULT_N_NEURONS, SweepConfig, sweep

__all__ = [
    "SparseProbe", "LinearProbe", "RidgeProbe", "sweep", "SweepConfig", "SweepResult", "SweepRecord",
    "sweep_regression", "RegressionSweepConfig",
    "DEFAULT_N_NEURONS", "METHODS", "rank_neurons", "fit_logistic", "token_dataset", "sequence_dataset",
    "aggregate_tokens", "ProbeDataset", "train_test_split", "accuracy", "precision", "recall", "f1", "roc_auc", "r2",
    "spearman", "classification_report", "regression_report", "plot_metric_vs_n_neurons", "plot_top_neurons",
    "plot_neuron_activations", "first_letter_absorption", "first_letter_data", "letter_probes", "AbsorptionConfig",
    "LetterData",
]

__getattr__ = renamed_module_attributes(
    __name__, {"DEFAULT_KS": "DEFAULT_N_NEURONS", "plot_metric_vs_k": "plot_metric_vs_n_neurons"}, globals())
