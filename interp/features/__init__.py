"""Feature finders: each returns a :class:`~interp.subspace.Subspace` that the intervention API accepts.

Supervised (labels or values per activation):
  :func:`class_mean_subspace` -- class-mean PCA with a fitted circle (weekdays, months);
  :func:`circle_probe`        -- Engels et al.'s circle probe: a linear read-out of (cos, sin) of each
                                 class's angle, checked on held-out classes and templates;
  :func:`lda_subspace`        -- Fisher LDA directions, distractor directions projected out;
  :func:`pls_subspace`        -- PLS for a numeric attribute, components chosen on held-out R^2, with
                                 ``predict`` and the direction of one unit of the target.
Unsupervised, from an SAE decoder ``W_dec [d_sae, d_model]`` (Engels et al.):
  :func:`cluster_decoder` then :func:`find_multidim_features` -- clusters ranked by the
  separability and epsilon-mixture indices, circles flagged.

Library choice: scikit-learn where it has the estimator (spectral clustering and k-means, the circle
probe's PCA and least squares); torch for the rest (class-mean PCA, LDA and PLS, GPU-capable), with
scikit-learn's LDA and PLS as test oracles.
"""

from interp.features.circle_probe import circle_probe
from interp.features.circles import CircleFit, circle_scores, cyclic_order, fit_circle, same_cyclic_order
from interp.features.clusters import (
    ClusterConfig,
    ClusterWarning,
    cluster_decoder,
    default_n_clusters,
    graph_clusters,
    kmeans,
    spectral_clusters,
)
from interp.features.indices import mixture_index, reducibility, separability_index
from interp.features.items import ITEM_SETS, TEMPLATES, item_activations
from interp.features.multidim import MultiDimConfig, MultiDimFeature, find_multidim_features
from interp.features.pls import PLSRegression, pls_subspace
from interp.features.supervised import class_mean_subspace, class_means, lda_subspace

__all__ = [
    "class_mean_subspace", "class_means", "circle_probe", "lda_subspace", "pls_subspace", "PLSRegression",
    "find_multidim_features", "MultiDimConfig", "MultiDimFeature",
    "cluster_decoder", "ClusterConfig", "ClusterWarning", "default_n_clusters", "graph_clusters",
    "spectral_clusters", "kmeans",
    "separability_index", "mixture_index", "reducibility",
    "CircleFit", "fit_circle", "circle_scores", "cyclic_order", "same_cyclic_order",
    "ITEM_SETS", "TEMPLATES", "item_activations",
]
