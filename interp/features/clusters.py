"""Cluster SAE decoder directions by cosine similarity (graph or spectral clustering).

Engels et al. find multi-dimensional features by grouping dictionary elements whose decoder
directions are similar, then studying each group's reconstructions (see
:mod:`interp.features.multidim`). Two clusterings, parameters exposed through :class:`ClusterConfig`:

* ``"spectral"`` (the default, the paper's): scikit-learn's ``SpectralClustering`` on the
  precomputed angular affinity ``1 - arccos(cos_sim) / pi`` (in [0, 1]), its k-means step restarted
  `n_init` times. The number of clusters scales with the dictionary: ``d_sae / 25`` by default (the
  paper's 1,000 clusters for 24,576 latents).
* ``"graph"``: link each latent to its `n_neighbors` most similar latents whose cosine similarity
  exceeds `sim_cutoff` (links made symmetric) and take connected components. (`top_k`, the old
  name of `n_neighbors`, is still accepted with a DeprecationWarning.)

When a method finds no cluster of ``min_size..max_size`` latents, :func:`cluster_decoder` warns with
one line saying what to change (a :class:`ClusterWarning`).

Library choice: scikit-learn's ``SpectralClustering`` and ``KMeans`` (the hand-written k-means this
replaces stopped at worse optima); the similarity matrix is built in torch. The affinity is a dense
``[d_sae, d_sae]`` matrix: fine up to a few tens of thousands of latents.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.deprecation import renamed_fields, renamed_keywords
from interp.errors import InputError

LATENTS_PER_CLUSTER = 25
"""Spectral default: ``n_clusters = d_sae / 25`` (Engels et al.: 1,000 clusters for 24,576 latents)."""


class ClusterWarning(UserWarning):
    """A clustering that found nothing usable; the message says what to change."""


def default_n_clusters(d_sae: int) -> int:
    """The spectral method's number of clusters for a dictionary of `d_sae` latents."""
    return max(2, min(d_sae, round(d_sae / LATENTS_PER_CLUSTER)))


@renamed_fields({"top_k": "n_neighbors"})
@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """How to group decoder directions."""

    method: str = "spectral"
    """``"spectral"`` or ``"graph"``."""
    n_clusters: int | None = None
    """Spectral only: number of clusters; None: ``d_sae / 25`` (:func:`default_n_clusters`)."""
    n_neighbors: int = 2
    """Graph only: each latent links to at most this many nearest other latents (``top_k=`` is the
    deprecated name)."""
    sim_cutoff: float = 0.5
    """Graph only: a link needs cosine similarity above this."""
    min_size: int = 2
    """Clusters with fewer latents are dropped (a single latent is a 1-D feature)."""
    max_size: int = 1000
    """Clusters with more latents are dropped (giant components are not features)."""
    n_init: int = 10
    """Spectral only: restarts of the k-means step (the best inertia is kept)."""
    kmeans_iters: int = 300
    """Spectral only: most k-means iterations per restart."""
    seed: int = 0
    """Random seed of the eigensolver and of k-means++."""
    chunk_size: int = 4096
    """Rows of the similarity matrix computed at a time (graph method)."""

    def __post_init__(self):
        if self.method not in ("spectral", "graph"):
            raise InputError(f"ClusterConfig.method must be 'spectral' or 'graph'; got {self.method!r}")
        if self.n_clusters is not None and self.n_clusters < 2:
            raise InputError(f"ClusterConfig.n_clusters must be >= 2 (or None: d_sae / {LATENTS_PER_CLUSTER}); "
                             f"got {self.n_clusters}")
        for name in ("n_neighbors", "min_size", "max_size", "n_init", "kmeans_iters", "chunk_size"):
            if getattr(self, name) < 1:
                raise InputError(f"ClusterConfig.{name} must be >= 1; got {getattr(self, name)}")
        if not -1.0 <= self.sim_cutoff <= 1.0:
            raise InputError(f"ClusterConfig.sim_cutoff must be in [-1, 1]; got {self.sim_cutoff}")
        if self.min_size > self.max_size:
            raise InputError(f"ClusterConfig.min_size ({self.min_size}) must be <= max_size ({self.max_size})")


def unit_rows(w_dec: Float[Tensor, "d_sae d_model"]) -> Float[Tensor, "d_sae d_model"]:
    w = torch.as_tensor(w_dec)
    if w.dim() != 2:
        raise InputError(f"W_dec must be [d_sae, d_model]; got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise InputError("W_dec contains NaN or inf")
    norms = w.float().norm(dim=1, keepdim=True)
    if (norms == 0).any():
        dead = torch.nonzero(norms[:, 0] == 0).flatten()[:10].tolist()
        raise InputError(f"W_dec has all-zero rows (e.g. latents {dead}); drop them before clustering")
    return w.float() / norms


@renamed_keywords({"top_k": "n_neighbors"})
def graph_clusters(w_dec: Float[Tensor, "d_sae d_model"], *, n_neighbors: int = 2, sim_cutoff: float = 0.5,
                   chunk_size: int = 4096) -> list[list[int]]:
    """Connected components of the symmetric `n_neighbors`-nearest-neighbour graph above `sim_cutoff`
    (``top_k=`` is the deprecated name of `n_neighbors`)."""
    w = unit_rows(w_dec)
    n = len(w)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    n_links = min(n_neighbors, n - 1)
    for start in tqdm(range(0, n, chunk_size), desc="similarity graph", disable=n <= chunk_size):
        sims = w[start:start + chunk_size] @ w.T
        rows = torch.arange(len(sims))
        sims[rows, rows + start] = -float("inf")  # no self links
        vals, idx = sims.topk(n_links, dim=1)
        for r, c in torch.nonzero(vals > sim_cutoff).tolist():
            a, b = find(start + r), find(int(idx[r, c]))
            if a != b:
                parent[a] = b
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def _kmeans(x, k: int, n_init: int, iters: int, random_state):
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=n_init, max_iter=iters, random_state=random_state).fit(x)
    return torch.as_tensor(km.labels_, dtype=torch.long), float(km.inertia_)


def kmeans(x: Float[Tensor, "n dim"], k: int, *, n_init: int = 10, iters: int = 300,
           seed: int = 0) -> tuple[Int[Tensor, " n"], float]:
    """scikit-learn's k-means++ with `n_init` restarts; returns the best restart's labels and inertia."""
    if not 1 <= k <= len(x):
        raise InputError(f"k must be in [1, n = {len(x)}]; got {k}")
    return _kmeans(torch.as_tensor(x).detach().double().cpu().numpy(), k, n_init, iters, seed)


def angular_affinity(w_dec: Float[Tensor, "d_sae d_model"]) -> Float[Tensor, "d_sae d_sae"]:
    """``1 - arccos(cos_sim) / pi`` between every pair of decoder directions (1 on the diagonal)."""
    w = unit_rows(w_dec).double()
    return 1 - torch.arccos((w @ w.T).clamp(-1, 1)) / torch.pi


def _groups(labels) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def spectral_clusters(w_dec: Float[Tensor, "d_sae d_model"], *, n_clusters: int | None = None, n_init: int = 10,
                      iters: int = 300, seed: int = 0) -> list[list[int]]:
    """Spectral clustering of decoder directions on the angular affinity, as scikit-learn's
    ``SpectralClustering(affinity="precomputed")`` does it: its ``spectral_embedding`` of the affinity,
    then :func:`kmeans` with `n_init` restarts of at most `iters` iterations.

    `n_clusters` None: :func:`default_n_clusters` (``d_sae / 25``)."""
    import numpy as np
    from sklearn.manifold import spectral_embedding

    aff = angular_affinity(w_dec)
    n = len(aff)
    n_clusters = default_n_clusters(n) if n_clusters is None else n_clusters
    if not 2 <= n_clusters <= n:
        raise InputError(f"n_clusters must be in [2, d_sae = {n}]; got {n_clusters}")
    rng = np.random.RandomState(seed)  # one stream for both steps, as SpectralClustering(random_state=seed)
    with warnings.catch_warnings():  # a nearly disconnected affinity graph is what clusters look like
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        emb = spectral_embedding(aff.cpu().numpy(), n_components=n_clusters, random_state=rng, drop_first=False)
    labels, _ = _kmeans(emb, n_clusters, n_init, iters, rng)
    return _groups(labels.tolist())


def _hint(cfg: ClusterConfig, w_dec: Tensor, groups: list[list[int]]) -> str:
    sizes = sorted((len(g) for g in groups), reverse=True)
    if cfg.method == "graph":
        w = unit_rows(w_dec)
        top = 0.0
        for start in range(0, len(w), cfg.chunk_size):
            sims = w[start:start + cfg.chunk_size] @ w.T
            sims[torch.arange(len(sims)), torch.arange(len(sims)) + start] = -1.0
            top = max(top, float(sims.max()))
        return (f"graph clustering found no cluster of {cfg.min_size}..{cfg.max_size} latents: the largest cosine "
                f"similarity between two decoder directions is {top:.2f}, sim_cutoff is {cfg.sim_cutoff} "
                f"(component sizes: {sizes[:5]}); lower sim_cutoff below {top:.2f} or use method='spectral'")
    return (f"spectral clustering into {len(groups)} clusters found none of {cfg.min_size}..{cfg.max_size} "
            f"latents (largest: {sizes[:5]}); raise n_clusters for smaller clusters, or widen min_size/max_size")


def cluster_decoder(w_dec: Float[Tensor, "d_sae d_model"], config: ClusterConfig | None = None) -> list[list[int]]:
    """Clusters (lists of latent indices) of the decoder, filtered to ``[min_size, max_size]`` latents.

    Warns (:class:`ClusterWarning`, one line saying what to change) when none is left."""
    cfg = config or ClusterConfig()
    if cfg.method == "graph":
        groups = graph_clusters(w_dec, n_neighbors=cfg.n_neighbors, sim_cutoff=cfg.sim_cutoff,
                                chunk_size=cfg.chunk_size)
    else:
        groups = spectral_clusters(w_dec, n_clusters=cfg.n_clusters, n_init=cfg.n_init, iters=cfg.kmeans_iters,
                                   seed=cfg.seed)
    kept = [g for g in groups if cfg.min_size <= len(g) <= cfg.max_size]
    if not kept:
        warnings.warn(_hint(cfg, torch.as_tensor(w_dec), groups), ClusterWarning, stacklevel=2)
    return kept
