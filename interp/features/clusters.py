"""Cluster SAE decoder directions by cosine similarity (graph or spectral clustering).

Engels et al. find multi-dimensional features by grouping dictionary elements whose decoder
directions are similar, then studying each group's reconstructions (see
:mod:`interp.features.multidim`). Two clusterings, parameters exposed through :class:`ClusterConfig`:

* ``"graph"``: link each latent to its `n_neighbors` most similar latents whose cosine similarity
  exceeds `sim_cutoff` (links made symmetric) and take connected components. (`top_k`, the old
  name of `n_neighbors`, is still accepted with a DeprecationWarning.)
* ``"spectral"``: affinity ``1 - arccos(cos_sim) / pi`` (in [0, 1]), the top `n_clusters`
  eigenvectors of the normalised affinity ``D^-1/2 A D^-1/2``, rows normalised to unit length
  (Ng, Jordan and Weiss), then k-means++ with `n_init` restarts.

Library choice: torch for both (the similarity matrix and the eigendecomposition run on GPU; the
k-means is batched over restarts); scikit-learn's ``SpectralClustering`` is the test oracle. The
full eigendecomposition costs O(d_sae^3): fine up to a few thousand latents on CPU, use a GPU (or
the graph method) beyond that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.deprecation import renamed_fields, renamed_keywords
from interp.errors import InputError


@renamed_fields({"top_k": "n_neighbors"})
@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """How to group decoder directions."""

    method: str = "spectral"
    """``"spectral"`` or ``"graph"``."""
    n_clusters: int = 64
    """Spectral only: number of clusters."""
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
    """Spectral only: k-means restarts (the best inertia is kept)."""
    kmeans_iters: int = 100
    """Spectral only: k-means iterations per restart."""
    seed: int = 0
    """Random seed for k-means++."""
    chunk_size: int = 4096
    """Rows of the similarity matrix computed at a time (graph method)."""

    def __post_init__(self):
        if self.method not in ("spectral", "graph"):
            raise InputError(f"ClusterConfig.method must be 'spectral' or 'graph'; got {self.method!r}")
        for name in ("n_clusters", "n_neighbors", "min_size", "max_size", "n_init", "kmeans_iters", "chunk_size"):
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


def kmeans(x: Float[Tensor, "n dim"], k: int, *, n_init: int = 10, iters: int = 100,
           seed: int = 0) -> tuple[Int[Tensor, " n"], float]:
    """k-means++ with `n_init` restarts; returns labels of the best restart and its inertia."""
    if not 1 <= k <= len(x):
        raise InputError(f"k must be in [1, n = {len(x)}]; got {k}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    best = (None, float("inf"))
    for _ in range(n_init):
        centres = x[torch.randint(len(x), (1,), generator=g)]
        d2 = torch.cdist(x, centres).pow(2).min(1).values
        for _ in range(k - 1):
            probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
            nxt = x[torch.multinomial(probs.cpu(), 1, generator=g).to(x.device)]
            centres = torch.cat([centres, nxt])
            d2 = torch.minimum(d2, (x - nxt).pow(2).sum(1))
        labels = None
        for _ in range(iters):
            new = torch.cdist(x, centres).argmin(1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).to(x.dtype)[:, None]
            centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        inertia = (x - centres[labels]).pow(2).sum().item()
        if inertia < best[1]:
            best = (labels, inertia)
    return best


def spectral_clusters(w_dec: Float[Tensor, "d_sae d_model"], *, n_clusters: int = 64, n_init: int = 10,
                      iters: int = 100, seed: int = 0) -> list[list[int]]:
    """Spectral clustering of decoder directions on the angular affinity ``1 - arccos(sim) / pi``."""
    w = unit_rows(w_dec).double()
    if not 2 <= n_clusters <= len(w):
        raise InputError(f"n_clusters must be in [2, d_sae = {len(w)}]; got {n_clusters}")
    aff = 1 - torch.arccos((w @ w.T).clamp(-1, 1)) / torch.pi
    inv_sqrt_deg = aff.sum(1).rsqrt()
    norm_aff = inv_sqrt_deg[:, None] * aff * inv_sqrt_deg[None, :]
    _, evecs = torch.linalg.eigh(norm_aff)  # ascending
    emb = evecs[:, -n_clusters:]
    emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels, _ = kmeans(emb, n_clusters, n_init=n_init, iters=iters, seed=seed)
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels.tolist()):
        groups.setdefault(lab, []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def cluster_decoder(w_dec: Float[Tensor, "d_sae d_model"], config: ClusterConfig | None = None) -> list[list[int]]:
    """Clusters (lists of latent indices) of the decoder, filtered to ``[min_size, max_size]`` latents."""
    cfg = config or ClusterConfig()
    if cfg.method == "graph":
        groups = graph_clusters(w_dec, n_neighbors=cfg.n_neighbors, sim_cutoff=cfg.sim_cutoff,
                                chunk_size=cfg.chunk_size)
    else:
        groups = spectral_clusters(w_dec, n_clusters=cfg.n_clusters, n_init=cfg.n_init, iters=cfg.kmeans_iters,
                                   seed=cfg.seed)
    return [g for g in groups if cfg.min_size <= len(g) <= cfg.max_size]
