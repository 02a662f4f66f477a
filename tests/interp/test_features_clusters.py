"""Decoder clustering and the SAE-based multi-dimensional feature finder on a planted dictionary."""

from __future__ import annotations

import math

import pytest
import torch

from interp.errors import InputError
from interp.features.clusters import (
    ClusterConfig,
    ClusterWarning,
    cluster_decoder,
    default_n_clusters,
    graph_clusters,
    kmeans,
    spectral_clusters,
)
from interp.features.multidim import MultiDimConfig, coverage, find_multidim_features
from interp.subspace import CircleMap, Subspace

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
N_IND, K_CIRCLE = 20, 6


def planted_sae(d_model, n=3000, seed=0):
    """20 random 1-D latents + 6 latents tiling a circle of radius 2 in a random plane.

    Returns (W_dec, encode, acts, codes, labels): circle rows are labelled with the weekday whose
    sector of the circle they fall in; other rows are labelled "-".
    """
    g = torch.Generator().manual_seed(seed)
    plane, _ = torch.linalg.qr(torch.randn(d_model, 2, generator=g))
    ang = torch.arange(K_CIRCLE) * 2 * math.pi / K_CIRCLE
    circ = torch.stack([ang.cos(), ang.sin()], 1) @ plane.T
    rand = torch.randn(N_IND, d_model, generator=g)
    w_dec = torch.cat([rand / rand.norm(dim=1, keepdim=True), circ])
    codes = torch.zeros(n, len(w_dec))
    codes[:, :N_IND] = (torch.rand(n, N_IND, generator=g) < 0.1) * torch.rand(n, N_IND, generator=g) * 3
    on = torch.rand(n, generator=g) < 0.3
    theta = torch.rand(n, generator=g) * 2 * math.pi
    width = 2 * math.pi / K_CIRCLE
    j = (theta // width).long()
    pair = torch.stack([torch.stack([ang[j].cos(), ang[j].sin()], 1),
                        torch.stack([ang[(j + 1) % K_CIRCLE].cos(), ang[(j + 1) % K_CIRCLE].sin()], 1)], 2)
    coef = torch.linalg.solve(pair, 2 * torch.stack([theta.cos(), theta.sin()], 1))  # [n, 2]
    rows = torch.nonzero(on).flatten()
    codes[rows, N_IND + j[rows]] = coef[rows, 0]
    codes[rows, N_IND + (j[rows] + 1) % K_CIRCLE] = coef[rows, 1]
    acts = codes @ w_dec
    pinv = torch.linalg.pinv(w_dec)

    def encode(x):  # exact up to float error; the bias keeps rounding noise from counting as active
        return torch.relu(x @ pinv - 1e-3)

    labels = ["-"] * n
    for r in rows.tolist():
        labels[r] = DAYS[int(theta[r] // (2 * math.pi / 7))]
    return w_dec, encode, acts, codes, labels


@pytest.mark.parametrize("d_model", [64, 576])
def test_planted_circle_ranked_first_and_flagged(d_model):
    w_dec, encode, acts, _, labels = planted_sae(d_model)
    feats = find_multidim_features(w_dec, acts, encode=encode, labels=labels, order=DAYS,
                                   cluster_config=ClusterConfig(method="graph", sim_cutoff=0.3))
    top = feats[0]
    assert sorted(top.latents) == list(range(N_IND, N_IND + K_CIRCLE))
    assert top.is_circle and top.circle["label_order_matches"]
    assert top.separability > 0.8 and top.mixture < 0.3
    assert all(not f.is_circle for f in feats[1:])
    assert all(f.irreducibility < 0.5 * top.irreducibility for f in feats[1:])
    # the subspace is the planted plane and the intervention API accepts it
    sub = top.subspace
    assert isinstance(sub, Subspace) and isinstance(sub.coord_map, CircleMap)
    assert set(sub.coord_map.angles) == set(DAYS)
    x = acts[:5]
    moved = sub.with_coords(x, sub.to_coords("Friday").expand(5, 2))
    assert torch.allclose(sub.project(moved), sub.to_coords("Friday").expand(5, 2), atol=1e-4)


def test_independent_latents_are_reducible():
    w_dec, _, _, codes, _ = planted_sae(64)
    groups = [[0, 1], [2, 3, 4], list(range(N_IND, N_IND + K_CIRCLE))]
    feats = {tuple(f.latents): f for f in find_multidim_features(w_dec, codes, codes_given=True, clusters=groups)}
    circle = feats[tuple(groups[2])]
    for g in groups[:2]:
        f = feats[tuple(g)]
        assert not f.is_circle
        assert f.mixture > 0.3  # points on the latents' lines: a mixture of lower-dimensional features
        assert f.irreducibility < 0.7 * circle.irreducibility


def test_sae_object_contract_and_row_limit():
    w_dec, encode, acts, _, _ = planted_sae(64)

    class Toy:  # the project's SAE contract: W_dec [d_sae, d_model] and encode
        W_dec = w_dec

        def encode(self, x):
            return encode(x)

    batches = list(acts.split(500))
    feats = find_multidim_features(Toy(), batches, clusters=[list(range(N_IND, N_IND + K_CIRCLE))], max_rows=1000)
    assert len(feats) == 1 and feats[0].rows.max() < 1000
    with pytest.raises(InputError, match="encoder"):
        find_multidim_features(w_dec, acts)


def test_spectral_recovers_planted_groups_like_sklearn():
    cluster = pytest.importorskip("sklearn.cluster")
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(6, 128, generator=g)
    truth = torch.arange(60) % 6
    w = centres[truth] + 0.25 * torch.randn(60, 128, generator=g)
    groups = spectral_clusters(w, n_clusters=6)
    ours = torch.empty(60, dtype=torch.long)
    for i, grp in enumerate(groups):
        ours[grp] = i
    wn = w / w.norm(dim=1, keepdim=True)
    aff = (1 - torch.arccos((wn @ wn.T).clamp(-1, 1)) / math.pi).double().numpy()
    ref = cluster.SpectralClustering(6, affinity="precomputed", random_state=0).fit_predict(aff)
    assert metrics.adjusted_rand_score(truth.numpy(), ours.numpy()) == 1.0
    assert metrics.adjusted_rand_score(ref, ours.numpy()) == 1.0


def test_graph_and_config():
    w_dec, *_ = planted_sae(64)
    comps = graph_clusters(w_dec, n_neighbors=2, sim_cutoff=0.3, chunk_size=7)  # chunking must not matter
    assert sorted(comps[0]) == list(range(N_IND, N_IND + K_CIRCLE))
    kept = cluster_decoder(w_dec, ClusterConfig(method="graph", sim_cutoff=0.3, min_size=3))
    assert all(len(c) >= 3 for c in kept)
    with pytest.raises(InputError, match="method"):
        ClusterConfig(method="dbscan")
    with pytest.raises(InputError, match="min_size"):
        ClusterConfig(min_size=5, max_size=2)
    with pytest.raises(InputError, match="all-zero rows"):
        graph_clusters(torch.zeros(3, 4))
    with pytest.raises(InputError, match="eps"):
        MultiDimConfig(eps=0.0)
    # fewer rows than the indices take would fail inside them, on whichever cluster happened to be small
    with pytest.raises(InputError, match=r"MultiDimConfig.min_points is 5; the reducibility indices need at least "
                                         r"10 rows per cluster: pass min_points >= 10"):
        MultiDimConfig(min_points=5)
    assert MultiDimConfig(min_points=10).min_points == 10


def test_top_k_is_a_deprecated_alias_of_n_neighbors():
    w_dec, *_ = planted_sae(64)
    new = graph_clusters(w_dec, n_neighbors=1, sim_cutoff=0.3)
    assert new != graph_clusters(w_dec, n_neighbors=3, sim_cutoff=0.3)  # the knob matters here
    with pytest.warns(DeprecationWarning, match="'top_k' is deprecated, use 'n_neighbors'") as caught:
        old = graph_clusters(w_dec, top_k=1, sim_cutoff=0.3)
    assert caught[0].filename == __file__ and old == new
    with pytest.raises(InputError, match="both top_k= and n_neighbors="):
        graph_clusters(w_dec, top_k=1, n_neighbors=1)
    with pytest.warns(DeprecationWarning, match="use 'n_neighbors'"):
        cfg = ClusterConfig(method="graph", top_k=1, sim_cutoff=0.3, min_size=1)
    assert cfg == ClusterConfig(method="graph", n_neighbors=1, sim_cutoff=0.3, min_size=1)
    assert cluster_decoder(w_dec, cfg) == new
    with pytest.warns(DeprecationWarning, match="use 'n_neighbors'"):
        assert cfg.top_k == 1
    with pytest.raises(InputError, match="both top_k= and n_neighbors="):
        ClusterConfig(top_k=1, n_neighbors=1)
    with pytest.raises(InputError, match="n_neighbors must be >= 1"):
        ClusterConfig(n_neighbors=0)


def test_kmeans_finds_separated_blobs():
    g = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(50, 3, generator=g) + 10 * i for i in range(4)])
    labels, inertia = kmeans(x, 4, n_init=3)
    assert len(set(labels.tolist())) == 4
    assert all(len(set(labels[50 * i:50 * (i + 1)].tolist())) == 1 for i in range(4))
    assert inertia < 2 * 200 * 3 * 1.5


def planted_circle_group(d_sae: int, seed: int, d_model: int = 576, k: int = 7):
    """`d_sae` random unit atoms, `k` of them replaced by a circular group: a shared direction plus a
    circle in a plane (neighbours' cosine ~0.86, opposite atoms' ~0.3), with a little noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_sae, d_model, generator=g)
    q = torch.linalg.qr(torch.randn(d_model, 3, generator=g))[0].T
    th = torch.arange(k) * 2 * math.pi / k
    circ = q[0] + 0.75 * (th.cos()[:, None] * q[1] + th.sin()[:, None] * q[2])
    circ = circ / circ.norm(dim=1, keepdim=True) + 0.05 * torch.randn(k, d_model, generator=g) / math.sqrt(d_model)
    idx = torch.randperm(d_sae, generator=g)[:k]
    w[idx] = circ
    return w, set(idx.tolist())


@pytest.mark.parametrize("d_sae", [150, 300, 600])
def test_spectral_default_recovers_a_planted_circle_group_in_every_seed(d_sae):
    """The default spectral clustering (d_sae / 25 clusters) keeps a planted 7-atom circular group in at
    most 2 clusters with at most 3 foreign atoms, in each of 10 seeds."""
    assert ClusterConfig().n_clusters is None and default_n_clusters(d_sae) == round(d_sae / 25)
    for seed in range(10):
        w, group = planted_circle_group(d_sae, seed)
        clusters = cluster_decoder(w, ClusterConfig(seed=seed, min_size=1))
        hit = [c for c in clusters if set(c) & group]
        foreign = sum(len(set(c) - group) for c in hit)
        assert set().union(*map(set, hit)) >= group  # nothing filtered away
        assert len(hit) <= 2 and foreign <= 3, (seed, [len(c) for c in hit], foreign)


def test_spectral_equals_sklearn_spectral_clustering_and_kmeans_equals_sklearn():
    cluster = pytest.importorskip("sklearn.cluster")
    metrics = pytest.importorskip("sklearn.metrics")
    w, _ = planted_circle_group(200, 3)
    ours = torch.empty(200, dtype=torch.long)
    for i, grp in enumerate(spectral_clusters(w, n_clusters=8, seed=0)):
        ours[grp] = i
    wn = w / w.norm(dim=1, keepdim=True)
    aff = (1 - torch.arccos((wn @ wn.T).clamp(-1, 1)) / math.pi).double().numpy()
    ref = cluster.SpectralClustering(8, affinity="precomputed", random_state=0).fit_predict(aff)
    assert metrics.adjusted_rand_score(ref, ours.numpy()) == 1.0  # the same partition
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(1))
    labels, inertia = kmeans(x, 5, n_init=4, seed=2)
    km = cluster.KMeans(5, n_init=4, random_state=2).fit(x.double().numpy())
    assert labels.tolist() == km.labels_.tolist() and inertia == pytest.approx(km.inertia_)


def test_a_clustering_that_finds_nothing_says_what_to_change():
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))  # random atoms: no pair above 0.5
    with pytest.warns(ClusterWarning, match=r"largest cosine similarity .* lower sim_cutoff below") as caught:
        assert cluster_decoder(w, ClusterConfig(method="graph")) == []
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    with pytest.warns(ClusterWarning, match="raise n_clusters"):
        assert cluster_decoder(w, ClusterConfig(n_clusters=2, max_size=5)) == []
    with pytest.raises(InputError, match="n_clusters must be >= 2"):
        ClusterConfig(n_clusters=1)


def test_seven_tight_classes_on_a_circle_are_flagged():
    """Days of the week are seven clusters of angles: the coverage of 12 fixed sectors could never reach 0.75
    for them (at most 8 of 12 sectors hold a cluster), so a perfect weekday circle was not flagged."""
    g = torch.Generator().manual_seed(0)
    plane, _ = torch.linalg.qr(torch.randn(32, 2, generator=g))
    w = torch.cat([plane.T, -plane.T])  # +-e1, +-e2 of the plane
    labels = [DAYS[i % 7] for i in range(700)]
    th = torch.tensor([2 * math.pi * DAYS.index(x) / 7 for x in labels]) + 0.05 * torch.randn(700, generator=g)
    c, s = th.cos(), th.sin()
    codes = torch.stack([c.clamp(min=0), s.clamp(min=0), (-c).clamp(min=0), (-s).clamp(min=0)], 1)
    f = find_multidim_features(w, codes, codes_given=True, clusters=[[0, 1, 2, 3]], labels=labels, order=DAYS)[0]
    assert f.circle["radius_cv"] < 1e-3 and f.circle["label_order_matches"]
    assert 0.85 < f.circle["coverage"] < 0.95 and f.is_circle


def test_coverage_is_one_minus_the_largest_empty_arc():
    g = torch.Generator().manual_seed(0)
    half = torch.rand(700, generator=g) * math.pi
    assert coverage(half) <= 0.5
    # 20 stray points in the empty half (under half a sector's share each) do not close the gap
    assert coverage(torch.cat([half, math.pi + torch.rand(20, generator=g) * math.pi])) <= 0.5
    assert coverage(torch.rand(2000, generator=g) * 2 * math.pi) > 0.95
    seven = torch.arange(7).repeat(100) * 2 * math.pi / 7
    assert coverage(seven) == pytest.approx(1 - 10 / 72)  # each day fills one 5-degree sector; 10 empty between
    assert coverage(torch.zeros(10)) == pytest.approx(1 / 72)
