"""Class-mean PCA with a fitted circle, and LDA, on planted structure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interp.errors import InputError
from interp.features import class_mean_subspace, lda_subspace
from interp.features.circles import same_cyclic_order, wrap
from interp.subspace import CircleMap, Subspace, TableMap

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def planted_circle(classes, d_model, *, per_class=20, noise=0.3, radius=4.0, seed=0, shuffle=True):
    """Points on a circle of `radius` in a random plane, one angle per class, plus isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    plane, _ = torch.linalg.qr(torch.randn(d_model, 2, generator=g))
    offset = torch.randn(d_model, generator=g) * 3
    n = len(classes)
    labels, rows = [], []
    for k, c in enumerate(classes):
        a = 2 * math.pi * k / n
        centre = offset + radius * (math.cos(a) * plane[:, 0] + math.sin(a) * plane[:, 1])
        rows.append(centre + noise * torch.randn(per_class, d_model, generator=g))
        labels += [c] * per_class
    acts = torch.cat(rows)
    if shuffle:
        perm = torch.randperm(len(labels), generator=g)
        acts, labels = acts[perm], [labels[i] for i in perm.tolist()]
    return acts, labels, plane, offset


@pytest.mark.parametrize("classes,d_model", [(DAYS, 64), (MONTHS, 256), (DAYS, 576)])
def test_planted_circle_recovered(classes, d_model):
    acts, labels, plane, _ = planted_circle(classes, d_model, seed=d_model)
    sub = class_mean_subspace(acts, labels, order=classes)
    assert isinstance(sub, Subspace) and sub.rank == 2 and isinstance(sub.coord_map, CircleMap)
    # the found plane is the planted plane (both principal angles ~0)
    cosines = torch.linalg.svdvals(sub.basis @ plane)
    assert cosines.min() > 0.97  # class-mean noise ~0.3/sqrt(20)*sqrt(d) limits this at d=576
    assert sub.meta["order_matches"] is True
    assert same_cyclic_order(sub.meta["cyclic_order"], classes)
    # angles increase along `order` in steps of 2 pi / n
    angles = torch.tensor([sub.coord_map.angles[c] for c in classes])
    steps = wrap(angles.roll(-1) - angles)
    assert torch.allclose(steps, torch.full_like(steps, 2 * math.pi / len(classes)), atol=0.05)
    assert sub.meta["loco_angle_error"] < 0.05
    assert sub.meta["radius_cv"] < 0.05
    assert abs(sub.coord_map.radius - 4.0) < 0.2


def test_shuffled_order_is_detected():
    acts, labels, _, _ = planted_circle(DAYS, 64)
    wrong = ["Monday", "Wednesday", "Tuesday", "Thursday", "Friday", "Saturday", "Sunday"]
    sub = class_mean_subspace(acts, labels, order=wrong)
    assert sub.meta["order_matches"] is False
    # the circle predicts held-out classes badly when the reference order is wrong
    right = class_mean_subspace(acts, labels, order=DAYS)
    assert sub.meta["loco_angle_error"] > 5 * right.meta["loco_angle_error"]


def test_no_circle_in_random_class_means():
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(140, 64, generator=g) + torch.randn(7, 64, generator=g).repeat_interleave(20, 0) * 2
    labels = [c for c in DAYS for _ in range(20)]
    sub = class_mean_subspace(acts, labels, order=DAYS)
    planted = class_mean_subspace(*planted_circle(DAYS, 64)[:2], order=DAYS)
    assert sub.meta["loco_angle_error"] > 10 * planted.meta["loco_angle_error"]


def test_to_coords_points_and_interventions_contract():
    acts, labels, _, _ = planted_circle(DAYS, 64, noise=0.0)
    sub = class_mean_subspace(acts, labels, order=DAYS)
    # to_coords(class) lands on the class mean's projection (noise-free data: exact circle)
    fri = acts[[i for i, x in enumerate(labels) if x == "Friday"]].mean(0)
    assert torch.allclose(sub.to_coords("Friday"), sub.project(fri), atol=1e-3)
    # with_coords moves a Monday activation onto Friday's point; the orthogonal part is untouched
    mon = acts[labels.index("Monday")]
    moved = sub.with_coords(mon, sub.to_coords("Friday"))
    assert torch.allclose(sub.project(moved), sub.to_coords("Friday"), atol=1e-3)
    assert torch.allclose(sub.remove(moved), sub.remove(mon), atol=1e-3)
    with pytest.raises(InputError, match="unknown class"):
        sub.to_coords("Funday")


def test_rank_three_pads_circle_coordinates(tmp_path):
    acts, labels, _, _ = planted_circle(MONTHS, 64)
    sub = class_mean_subspace(acts, labels, rank=3, order=MONTHS)
    assert sub.to_coords("Mar").shape == (3,)
    back = Subspace.load(sub.save(tmp_path / "s"))
    assert torch.equal(back.to_coords("Mar"), sub.to_coords("Mar"))
    assert back.meta["cyclic_order"] == sub.meta["cyclic_order"]


def test_table_map_without_circle():
    acts, labels, _, _ = planted_circle(DAYS, 64)
    sub = class_mean_subspace(acts, labels, rank=3, circle=False)
    assert isinstance(sub.coord_map, TableMap) and sub.coord_map.labels == list(dict.fromkeys(labels))
    assert sub.to_coords("Monday").shape == (3,)


def test_bad_inputs(unchecked):
    acts, labels, _, _ = planted_circle(DAYS, 64)
    with pytest.raises(InputError, match="labels"):
        class_mean_subspace(acts, labels[:-1])
    with pytest.raises(InputError, match="order must list every class"):
        class_mean_subspace(acts, labels, order=DAYS[:-1])
    with pytest.raises(InputError, match="rank"):
        class_mean_subspace(acts, labels, rank=7)
    with pytest.raises(InputError, match="circle needs"):
        class_mean_subspace(acts, labels, rank=1)
    with unchecked(), pytest.raises(InputError, match=r"\[n, d_model\]"):
        class_mean_subspace(acts[None], labels)


def test_lda_matches_sklearn_oracle():
    sklearn = pytest.importorskip("sklearn.discriminant_analysis")
    g = torch.Generator().manual_seed(3)
    d, k, per = 16, 4, 200
    means = torch.randn(k, d, generator=g) * 2
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)  # anisotropic within-class noise
    acts = torch.cat([means[c] + torch.randn(per, d, generator=g) @ mix for c in range(k)])
    labels = [str(c) for c in range(k) for _ in range(per)]
    sub = lda_subspace(acts, labels, shrinkage=0.0)
    ref = sklearn.LinearDiscriminantAnalysis(solver="eigen").fit(acts.numpy().astype(np.float64), labels)
    ref_basis, _ = np.linalg.qr(ref.scalings_[:, : k - 1])
    cosines = torch.linalg.svdvals(sub.basis.double() @ torch.from_numpy(ref_basis))
    assert cosines.min() > 0.999


def test_lda_projects_out_distractors():
    g = torch.Generator().manual_seed(4)
    d, per = 32, 400
    distractor = torch.zeros(d)
    distractor[0] = 1.0
    y = torch.tensor([0] * per + [1] * per)
    acts = torch.randn(2 * per, d, generator=g) * 0.5
    acts[:, 0] += 5.0 * y  # the easy, unwanted direction
    acts[:, 1] += 1.0 * y  # the one we want
    labels = [str(v) for v in y.tolist()]
    plain = lda_subspace(acts, labels)
    clean = lda_subspace(acts, labels, distractors=distractor[None])
    assert abs(plain.basis[0, 0]) > 0.5
    assert abs(clean.basis[0, 0]) < 1e-5 and abs(clean.basis[0, 1]) > 0.9  # sampling noise: ~0.95
    assert clean.meta["n_distractors"] == 1
    with pytest.raises(InputError, match="shrinkage"):
        lda_subspace(acts, labels, shrinkage=2.0)


def test_lda_rank_leaves_room_for_the_distractors():
    """8 classes in 8 dimensions with 2 distractors: 6 directions are left, not n_classes - 1 = 7 (the 7th
    came back as a row of zeros in a basis called orthonormal)."""
    g = torch.Generator().manual_seed(0)
    d, k = 8, 8
    acts = torch.cat([torch.randn(d, generator=g) * 3 + torch.randn(60, d, generator=g) for _ in range(k)])
    labels = [str(c) for c in range(k) for _ in range(60)]
    distractors = torch.randn(2, d, generator=g)
    sub = lda_subspace(acts, labels, distractors=distractors)
    assert sub.rank == 6
    assert torch.allclose(sub.basis @ sub.basis.T, torch.eye(6), atol=1e-5)
    assert (sub.basis @ torch.linalg.qr(distractors.T)[0]).abs().max() < 1e-5
    with pytest.raises(InputError, match=r"min\(7, 6\)"):
        lda_subspace(acts, labels, distractors=distractors, rank=7)
    with pytest.raises(InputError, match="do not vary within any class"):
        lda_subspace(torch.ones(40, d), ["a", "b"] * 20)
