"""Random controls: the same edit in a random subspace, moved as much as the real one."""

from __future__ import annotations

import math

import pytest
import torch

from interp import random_control, random_like, random_subspace
from interp.edits import EditContext, ProjectOut, Rotate, SetCoords, Steer
from interp.errors import InputError
from interp.subspace import CircleMap, Subspace, TableMap

D = 32
DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def _ctx(n):
    return EditContext(torch.arange(n), torch.zeros(n, dtype=torch.long), None)


def _circle(seed=0):
    g = torch.Generator().manual_seed(seed)
    cm = CircleMap(torch.tensor([0.3, -0.1]), 2.0, {d: 2 * math.pi * i / 7 for i, d in enumerate(DAYS)})
    return Subspace(torch.randn(2, D, generator=g), torch.randn(D, generator=g), cm)


def test_random_subspace_is_orthonormal_seeded_and_inside_the_span_asked_for():
    within = torch.randn(6, D, generator=torch.Generator().manual_seed(1))
    sub = random_subspace(2, D, within=within, seed=3)
    assert torch.allclose(sub.basis @ sub.basis.T, torch.eye(2), atol=1e-5)
    q = torch.linalg.qr(within.T)[0]  # [D, 6]
    assert torch.allclose(sub.basis @ q @ q.T, sub.basis, atol=1e-5)  # inside span(within)
    assert torch.equal(sub.basis, random_subspace(2, D, within=within, seed=3).basis)
    assert not torch.allclose(sub.basis, random_subspace(2, D, within=within, seed=4).basis)
    circle = _circle()
    like = random_like(circle, seed=0)
    assert like.rank == 2 and torch.equal(like.origin, circle.origin) and like.coord_map is None
    with pytest.raises(InputError, match="does not fit in span"):
        random_subspace(7, D, within=within)


def test_control_of_a_rotation_turns_a_random_plane_by_the_same_angles():
    circle = _circle()
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(2)) + circle.origin
    to = ["Fri", "Mon", "Sun", "Wed", "Thu"]
    edit = Rotate(circle, to=to)  # defaults: onto 3 x the circle radius
    control = random_control(edit, seed=7)
    rand = control.random
    y = control(x, _ctx(5))
    # the real edit's turn per row, and the random plane's turn
    want = torch.tensor([circle.coord_map.angles[d] for d in to]) - circle.predict(x)
    before, after = rand.project(x), rand.project(y)
    got = torch.atan2(after[:, 1], after[:, 0]) - torch.atan2(before[:, 1], before[:, 0])
    assert torch.allclose(torch.remainder(got - want + math.pi, 2 * math.pi) - math.pi, torch.zeros(5), atol=1e-4)
    # same distance rule: the random plane's point lands as far out as the real one, scale x radius = 4 x 2
    assert torch.allclose(after.norm(dim=-1), torch.full((5,), 8.0), atol=1e-4)
    assert torch.allclose(rand.remove(y), rand.remove(x), atol=1e-4)  # nothing moves outside the random plane
    # a pure rotation's control keeps the random plane's radius
    pure = random_control(Rotate(circle, angle=0.9), seed=1)(x, _ctx(5))
    r1 = random_control(Rotate(circle, angle=0.9), seed=1).random
    assert torch.allclose(r1.project(pure).norm(dim=-1), r1.project(x).norm(dim=-1), atol=1e-4)


@pytest.mark.parametrize("make", [
    lambda sub: SetCoords(sub, value=["Tue", "Sat", "Mon", "Tue"]),
    lambda sub: ProjectOut(sub),
])
def test_control_of_a_subspace_edit_moves_as_far_in_a_random_subspace(make):
    g = torch.Generator().manual_seed(5)
    basis = torch.randn(4, D, generator=g)
    sub = Subspace(basis, torch.randn(D, generator=g), TableMap(DAYS, torch.randn(7, 4, generator=g) * 3))
    x = torch.randn(4, D, generator=g)
    edit = make(sub)
    control = random_control(edit, seed=2)
    moved_real = (edit(x, _ctx(4)) - x).norm(dim=-1)
    y = control(x, _ctx(4))
    assert torch.allclose((y - x).norm(dim=-1), moved_real, atol=1e-4)
    assert torch.allclose(control.random.remove(y), control.random.remove(x), atol=1e-4)
    assert control.random.rank == 4


def test_control_of_a_steering_vector_moves_by_the_same_norm():
    v = torch.randn(D, generator=torch.Generator().manual_seed(9))
    x = torch.randn(3, D)
    control = random_control(Steer(v, alpha=2.5), seed=0)
    y = control(x, _ctx(3))
    assert torch.allclose((y - x).norm(dim=-1), torch.full((3,), 2.5 * float(v.norm())), atol=1e-4)
    assert abs(float((y - x)[0] @ v) / float((y - x)[0].norm() * v.norm())) < 0.9  # not the steering direction
