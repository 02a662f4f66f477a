"""Feature finders: each returns a :class:`~interp.subspace.Subspace` that the intervention API accepts.

Supervised (labels or values per activation):
  :func:`class_mean_subspace` -- class-mean PCA with a fitted circle (weekdays, months);
  :func:`lda_subspace`        -- Fisher LDA directions, distractor directions projected out;
  :func:`pls_subspace`        -- PLS for a numeric attribute, components chosen on held-out R^2.
Unsupervised, from an SAE decoder ``W_dec [d_sae, d_model]`` (Engels et al.):
  :func:`cluster_decoder` then :func:`find_multidim_features` -- clusters ranked by the
  separability and epsilon-mixture indices, circles flagged.

Library choice: torch throughout (GPU-capable, no scikit-learn at run time); scikit-learn's PLS,
LDA and spectral clustering serve as test oracles only.
"""

from interp.features.circles import CircleFit, circle_scores, cyclic_order, fit_circle, same_cyclic_order
from interp.features.clusters import ClusterConfig, cluster_decoder, graph_clusters, kmeans, spectral_clusters
from interp.features.indices import mixture_index, reducibility, separability_index
from interp.features.items import ITEM_SETS, TEMPLATES, item_activations
from interp.features.multidim import MultiDimConfig, MultiDimFeature, find_multidim_features
from interp.features.pls import PLSRegression, pls_subspace
from interp.features.supervised import class_mean_subspace, class_means, lda_subspace

__all__ = [
    "class_mean_subspace", "class_means", "lda_subspace", "pls_subspace", "PLSRegression",
    "find_multidim_features", "MultiDimConfig", "MultiDimFeature",
    "cluster_decoder", "ClusterConfig", "graph_clusters", "spectral_clusters", "kmeans",
    "separability_index", "mixture_index", "reducibility",
    "CircleFit", "fit_circle", "circle_scores", "cyclic_order", "same_cyclic_order",
    "ITEM_SETS", "TEMPLATES", "item_activations",
]
