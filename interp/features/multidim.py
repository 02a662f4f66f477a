"""Multi-dimensional features from an SAE, the way Engels et al. find them.

1. Cluster the decoder directions (:func:`interp.features.clusters.cluster_decoder`).
2. For each cluster, reconstruct every activation using only that cluster's latents
   (``codes[:, cluster] @ W_dec[cluster]``), keeping the rows where one of them is active.
3. Take the top principal components of those reconstructions and score each consecutive pair
   with the separability and epsilon-mixture indices (:mod:`interp.features.indices`).
4. Rank clusters by ``irreducibility = S * (1 - M)`` of their best pair, and flag circles
   (small radius spread, points all around the circle, and, when the rows carry labels with an
   expected cyclic `order`, the labels' mean angles in that order).

The SAE is only a matrix ``W_dec [d_sae, d_model]`` plus an ``encode`` callable
(``[n, d_model] -> [n, d_sae]``); anything with ``W_dec`` and ``encode`` attributes (the project's
SAE contract) works too, and so do precomputed ``codes``. Each result carries a :class:`Subspace`
(the pair's principal plane, origin at the mean reconstruction) for the intervention API.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.errors import InputError
from interp.features.circles import circle_scores, cyclic_order, fit_circle, same_cyclic_order
from interp.features.clusters import ClusterConfig, cluster_decoder
from interp.features.indices import MIN_POINTS, reducibility
from interp.subspace import CircleMap, Subspace


@dataclass(frozen=True, kw_only=True)
class MultiDimConfig:
    """How clusters are turned into point clouds and scored."""

    n_pcs: int = 4
    """Principal components of each cluster's reconstructions to score (pairs 0-1, 1-2, ...)."""
    eps: float = 0.1
    """Width of the epsilon-mixture slab, relative to the rms projection."""
    bins: int = 10
    """Bins per axis for the separability index (fixed grid)."""
    threshold: float = 0.0
    """A latent counts as active when its code exceeds this."""
    max_points: int = 5000
    """Rows kept per cluster (the first ones met)."""
    min_points: int = 50
    """Clusters active on fewer rows are not scored (at least :data:`interp.features.indices.MIN_POINTS`, the
    fewest rows the reducibility indices take)."""
    circle_radius_cv: float = 0.35
    """Circle flag: largest spread of distances to the centre (a round Gaussian blob gives ~0.52)."""
    circle_coverage: float = 0.75
    """Circle flag: smallest fraction of the circle outside its largest empty arc (:func:`coverage`; seven
    evenly spread classes give about 0.86, a half circle at most 0.5)."""

    def __post_init__(self):
        for name in ("n_pcs", "bins", "max_points"):
            if getattr(self, name) < (2 if name in ("n_pcs", "bins") else 1):
                raise InputError(f"MultiDimConfig.{name} is too small: {getattr(self, name)}")
        if self.min_points < MIN_POINTS:  # a cluster on fewer rows would fail deep inside the indices
            raise InputError(f"MultiDimConfig.min_points is {self.min_points}; the reducibility indices need at "
                             f"least {MIN_POINTS} rows per cluster: pass min_points >= {MIN_POINTS}")
        if not self.eps > 0:
            raise InputError(f"MultiDimConfig.eps must be > 0; got {self.eps}")
        if not 0 <= self.circle_coverage <= 1 or self.circle_radius_cv <= 0:
            raise InputError(f"MultiDimConfig circle thresholds out of range: radius_cv={self.circle_radius_cv}, "
                             f"coverage={self.circle_coverage}")


@dataclass
class MultiDimFeature:
    """One scored cluster of latents."""

    latents: list[int]
    n_points: int
    explained_variance: list[float]
    pairs: list[dict]
    best_pair: list[int]
    separability: float
    mixture: float
    irreducibility: float
    circle: dict
    is_circle: bool
    subspace: Subspace
    points: Tensor = field(repr=False)
    """``[n_points, 2]`` coordinates of the cluster's reconstructions in the best pair's plane."""
    rows: Tensor = field(repr=False)
    """``[n_points]`` index of each point's row in the input activations."""
    label_angles: dict[str, float] | None = None
    """Mean angle of each label around the fitted circle (when rows carry labels)."""
    row_labels: list[str] | None = field(default=None, repr=False)
    """Label of each point (when rows carry labels)."""

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("latents", "n_points", "explained_variance", "pairs", "best_pair",
                                                "separability", "mixture", "irreducibility", "circle", "is_circle",
                                                "label_angles")}


def _as_batches(acts) -> Iterable[Tensor]:
    if isinstance(acts, Tensor):
        if acts.dim() != 2:
            raise InputError(f"acts must be [n, d_model]; got {tuple(acts.shape)}")
        acts = [acts]
    for i, x in enumerate(acts):
        x = next(iter(x.values())) if isinstance(x, dict) else x
        if x.dim() != 2:
            raise InputError(f"each batch must be [n, d_model]; got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            rows = (~torch.isfinite(x)).any(-1).nonzero().flatten()
            raise InputError(f"batch {i} of acts holds NaN or inf in rows {rows[:10].tolist()} "
                             f"({rows.numel()} of {x.shape[0]}); drop or fix those rows")
        yield x


def gather_cluster_codes(clusters: Sequence[Sequence[int]], batches: Iterable[Tensor],
                         encode: Callable[[Tensor], Tensor] | None, *, threshold: float = 0.0,
                         max_points: int = 5000, max_rows: int | None = None) -> list[tuple[Tensor, Tensor]]:
    """For each cluster: ``(codes of its latents on rows where one is active, row indices)``."""
    idx = [torch.as_tensor(list(c), dtype=torch.long) for c in clusters]
    kept: list[list[Tensor]] = [[] for _ in clusters]
    rows: list[list[Tensor]] = [[] for _ in clusters]
    counts = [0] * len(clusters)
    seen = 0
    for x in tqdm(batches, desc="cluster codes", disable=max_rows is None):
        with torch.no_grad():
            codes = x if encode is None else encode(x)
        codes = codes.float()
        for i, c in enumerate(idx):
            if counts[i] >= max_points:
                continue
            sub = codes[:, c.to(codes.device)]
            active = torch.nonzero((sub > threshold).any(1)).flatten()[: max_points - counts[i]]
            if len(active):
                kept[i].append(sub[active].cpu())
                rows[i].append(active.cpu() + seen)
                counts[i] += len(active)
        seen += len(codes)
        if (max_rows is not None and seen >= max_rows) or min(counts, default=max_points) >= max_points:
            break
    return [(torch.cat(k) if k else torch.zeros(0, len(c)), torch.cat(r) if r else torch.zeros(0, dtype=torch.long))
            for k, r, c in zip(kept, rows, idx)]


COVERAGE_SECTORS = 72
"""Sectors (5 degrees each) in which :func:`coverage` looks for the largest empty arc."""


def coverage(angles: Tensor, sectors: int = COVERAGE_SECTORS) -> float:
    """Fraction of the circle outside its largest empty arc: 1 minus the longest run of consecutive (cyclic)
    sectors holding less than half their uniform share of the points.

    It does not depend on how many clusters the points form: seven tight, evenly spread classes (days of the
    week) give 0.86 to 0.92 (angle noise 0 to 0.1 rad), twelve 0.92 to 0.97, a uniform ring about 1, and points
    on a half circle at most 0.5. Stray points in a gap (under half a sector's share each) do not close it.
    """
    hist = torch.histc(torch.remainder(angles.double(), 2 * math.pi), bins=sectors, min=0, max=2 * math.pi)
    full = (hist >= 0.5 * len(angles) / sectors).tolist()
    if not any(full):
        return 0.0
    start = full.index(True)  # walk once around from a full sector, so every empty run is seen whole
    longest = run = 0
    for f in full[start:] + full[:start]:
        run = 0 if f else run + 1
        longest = max(longest, run)
    return 1.0 - longest / sectors


def score_cluster(latents: Sequence[int], codes: Float[Tensor, "n n_latents"], rows: Tensor,
                  w_dec: Float[Tensor, "d_sae d_model"], cfg: MultiDimConfig, *,
                  labels: Sequence[str] | None = None, order: Sequence[str] | None = None) -> MultiDimFeature:
    """Reconstruct, take principal components, score pairs and check for a circle."""
    # recon = codes @ W lies in the row space of W = R^T Q^T: do the PCA on codes @ R^T ([n, |cluster|])
    q, r = torch.linalg.qr(w_dec[list(latents)].double().cpu().T)
    low = codes.double() @ r.T
    low_mean = low.mean(0)
    _, s, vh = torch.linalg.svd(low - low_mean, full_matrices=False)
    var = s.pow(2)
    evr = (var / var.sum().clamp_min(1e-300))[: cfg.n_pcs].tolist()
    pairs = reducibility(low, n_pcs=cfg.n_pcs, eps=cfg.eps, bins=cfg.bins)
    best = max(pairs, key=lambda p: p["irreducibility"])
    points = (low - low_mean) @ vh[best["pcs"]].T
    basis = vh[best["pcs"]] @ q.T  # [2, d_model]
    mean = low_mean @ q.T
    circ = circle_scores(points)
    fit = fit_circle(points)
    circ["coverage"] = coverage(fit.angles)
    is_circle = circ["radius_cv"] <= cfg.circle_radius_cv and circ["coverage"] >= cfg.circle_coverage
    label_angles = row_labels = None
    if labels is not None:
        row_labels = [str(labels[r]) for r in rows.tolist()]
        names = list(dict.fromkeys(row_labels)) if order is None else [o for o in order if o in set(row_labels)]
        label_angles = {}
        for name in names:
            a = fit.angles[[i for i, x in enumerate(row_labels) if x == name]].double()
            label_angles[name] = math.atan2(a.sin().mean().item(), a.cos().mean().item())
        if order is not None and len(label_angles) >= 3:
            found = cyclic_order(list(label_angles), torch.tensor(list(label_angles.values())))
            circ["label_order"] = found
            circ["label_order_matches"] = same_cyclic_order(found, list(label_angles))
            is_circle = is_circle and circ["label_order_matches"]
    cmap = CircleMap(fit.center.float(), float(fit.radius), dict(label_angles or {})) if is_circle else None
    sub = Subspace(basis.float(), mean.float(), cmap, name=f"cluster{list(latents)[:4]}",
                   meta={"finder": "sae_cluster", "latents": list(latents), "pcs": best["pcs"]}, orthonormalize=False)
    return MultiDimFeature(latents=list(latents), n_points=len(codes), explained_variance=evr, pairs=pairs,
                           best_pair=best["pcs"], separability=best["separability"], mixture=best["mixture"],
                           irreducibility=best["irreducibility"], circle=circ, is_circle=is_circle, subspace=sub,
                           points=points.float(), rows=rows, label_angles=label_angles, row_labels=row_labels)


def find_multidim_features(decoder, acts, *, encode: Callable[[Tensor], Tensor] | None = None,
                           codes_given: bool = False, clusters: Sequence[Sequence[int]] | None = None,
                           cluster_config: ClusterConfig | None = None, config: MultiDimConfig | None = None,
                           labels: Sequence[str] | None = None, order: Sequence[str] | None = None,
                           max_rows: int | None = None) -> list[MultiDimFeature]:
    """Cluster an SAE's decoder and rank the clusters by how irreducible their reconstructions are.

    Args:
        decoder: ``W_dec [d_sae, d_model]``, or an object with ``W_dec`` (and ``encode``) attributes.
        acts: activations ``[n, d_model]`` or an iterable of such batches (e.g. an activation
            store); with ``codes_given=True``, SAE codes ``[n, d_sae]`` instead.
        encode: ``[n, d_model] -> [n, d_sae]``; defaults to ``decoder.encode``.
        clusters: skip clustering and score these latent groups.
        labels / order: a label per input row (e.g. the token) and the expected cyclic order of
            some labels; used to check whether a circle puts them in order.
        max_rows: stop reading `acts` after this many rows.

    Returns the scored clusters, most irreducible first.
    """
    cfg = config or MultiDimConfig()
    w_dec = decoder.W_dec if hasattr(decoder, "W_dec") else decoder
    w_dec = torch.as_tensor(w_dec).detach()
    if w_dec.dim() != 2:
        raise InputError(f"W_dec must be [d_sae, d_model]; got {tuple(w_dec.shape)}")
    if not bool(torch.isfinite(w_dec).all()):
        raise InputError("W_dec contains NaN or inf (the SAE diverged?); load a finite decoder")
    if not codes_given and encode is None:
        encode = getattr(decoder, "encode", None)
        if encode is None:
            raise InputError("activations need an encoder: pass encode=..., an SAE object with .encode, or "
                             "precomputed codes with codes_given=True")
    if labels is not None and not isinstance(acts, Tensor):
        raise InputError("labels need the activations as one [n, d_model] tensor (rows must align)")
    groups = [list(c) for c in clusters] if clusters is not None else cluster_decoder(w_dec, cluster_config)
    gathered = gather_cluster_codes(groups, _as_batches(acts), None if codes_given else encode,
                                    threshold=cfg.threshold, max_points=cfg.max_points, max_rows=max_rows)
    out = []
    for latents, (codes, rows) in tqdm(list(zip(groups, gathered)), desc="score clusters", disable=len(groups) < 20):
        if len(codes) >= cfg.min_points and len(latents) >= 2:
            out.append(score_cluster(latents, codes, rows, w_dec, cfg, labels=labels, order=order))
    return sorted(out, key=lambda f: -f.irreducibility)
