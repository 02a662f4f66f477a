"""Subspace: geometry, coordinate maps, persistence and the labelled plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interp.errors import InputError
from interp.subspace import CircleMap, LinearMap, Subspace, TableMap


def random_subspace(rank=3, d=16, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return Subspace(torch.randn(rank, d, generator=g), torch.randn(d, generator=g), **kw)


@settings(max_examples=25, deadline=None)
@given(rank=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_geometry_invariants(rank, seed):
    sub = random_subspace(rank, 16, seed)
    assert torch.allclose(sub.basis @ sub.basis.T, torch.eye(rank), atol=1e-5)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(seed + 1))
    c = sub.project(x)
    # x = origin + component + remainder, the remainder orthogonal to the basis
    assert torch.allclose(sub.origin + sub.component(x) + (sub.remove(x) - sub.origin), x, atol=1e-4)
    assert torch.allclose(sub.project(sub.remove(x)), torch.zeros_like(c), atol=1e-4)
    assert torch.allclose(sub.project(sub.reconstruct(c)), c, atol=1e-4)
    target = torch.randn(5, rank)
    moved = sub.with_coords(x, target)
    assert torch.allclose(sub.project(moved), target, atol=1e-4)
    assert torch.allclose(sub.remove(moved), sub.remove(x), atol=1e-4)
    # with_coords to the current coordinates is the identity
    assert torch.allclose(sub.with_coords(x, c), x, atol=1e-5)


def test_orthonormalise_keeps_row_directions_and_dtype_device_follow_input():
    basis = torch.tensor([[2.0, 0.0, 0.0], [1.0, -3.0, 0.0]])
    sub = Subspace(basis)
    assert torch.allclose(sub.basis, torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]))
    x = torch.randn(4, 3, dtype=torch.float64)
    assert sub.project(x).dtype == torch.float64
    assert sub.project(x.bfloat16()).dtype == torch.bfloat16


def test_coordinate_maps():
    circle = CircleMap(torch.tensor([1.0, -1.0]), 2.0, {"Mon": 0.0, "Wed": math.pi / 2})
    assert torch.allclose(circle.to_coords("Wed"), torch.tensor([1.0, 1.0]), atol=1e-6)
    assert circle.from_coords(circle.to_coords(0.7)).item() == pytest.approx(0.7, abs=1e-5)
    padded = CircleMap(torch.zeros(2), 1.0, rank=4)
    assert padded.to_coords(0.0).tolist() == [1.0, 0.0, 0.0, 0.0]
    line = LinearMap(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert line.from_coords(line.to_coords(3.5)).item() == pytest.approx(3.5)
    table = TableMap(["a", "b"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert table.from_coords(torch.tensor([[0.9, 0.8], [0.1, 0.0]])).tolist() == [1, 0]
    with pytest.raises(InputError, match="unknown class"):
        table.to_coords("c")
    with pytest.raises(InputError, match="no coordinate map"):
        random_subspace().to_coords(1.0)


@pytest.mark.parametrize("cmap", [
    CircleMap(torch.tensor([0.5, 0.25]), 3.0, {"Mon": 0.1, "Tue": 1.0}, rank=3),
    LinearMap(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 0.5])),
    TableMap(["x", "y"], torch.randn(2, 3)),
    None,
])
def test_save_load_round_trip(tmp_path, cmap):
    sub = random_subspace(3, 16, coord_map=cmap, name="test", meta={"layer": 7, "scores": [0.5, 1.0]})
    back = Subspace.load(sub.save(tmp_path / "s"))
    assert torch.equal(back.basis, sub.basis) and torch.equal(back.origin, sub.origin)
    assert back.name == "test" and back.meta == {"layer": 7, "scores": [0.5, 1.0]}
    assert type(back.coord_map) is type(cmap)
    if cmap is not None:
        value = {"circle": "Tue", "linear": 2.0, "table": "y"}[cmap.kind]
        assert torch.allclose(back.to_coords(value), sub.to_coords(value))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["subspace.json", "subspace.safetensors"]


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="not a readable subspace"):
        Subspace.load(tmp_path)
    path = random_subspace().save(tmp_path / "s")
    info = json.loads((path / "subspace.json").read_text())
    info["format"] = "other/9"
    (path / "subspace.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match="unknown format"):
        Subspace.load(path)


def test_bad_shapes(unchecked):
    with pytest.raises(InputError, match="rank, d_model"):
        Subspace(torch.randn(5, 3))
    with unchecked(), pytest.raises(InputError, match="origin"):
        Subspace(torch.randn(2, 8), torch.randn(7))
    with pytest.raises(InputError, match="d_model=16"):
        random_subspace().project(torch.randn(4, 15))


def test_labelled_plot(tmp_path):
    sub = Subspace(torch.eye(2, 8), coord_map=CircleMap(torch.zeros(2), 1.0, {"a": 0.0}))
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(30, 8, generator=g)
    labels = ["a", "b", "c"] * 10
    ax = sub.plot(acts, labels, order=["a", "b", "c"], path=tmp_path / "p.png", title="t")
    assert (tmp_path / "p.png").stat().st_size > 1000
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["a", "b", "c"]
    assert ax.get_title() == "t"
    # class means are drawn where the projected means are
    means = [c.get_offsets() for c in ax.collections if len(c.get_offsets()) == 1]
    expected = sub.project(acts[[i for i, v in enumerate(labels) if v == "a"]]).mean(0)
    assert torch.allclose(torch.tensor(means[0][0], dtype=torch.float32), expected, atol=1e-5)
    with pytest.raises(InputError, match="labels"):
        sub.plot(acts, labels[:-1])


def test_a_basis_that_is_not_a_basis_is_refused():
    v = torch.randn(8, generator=torch.Generator().manual_seed(0))
    # dependent rows: QR would turn round-off into a spurious second direction
    for rows in ([v, v], [v, 2 * v], [torch.zeros(8), v], [v, v + 1e-7 * torch.ones(8)]):
        with pytest.raises(InputError, match="linearly dependent"):
            Subspace(torch.stack(rows))
    with pytest.raises(InputError, match="NaN or inf"):
        Subspace(torch.stack([v, torch.full((8,), float("nan"))]))
    with pytest.raises(InputError, match="origin holds NaN"):
        Subspace(v[None], torch.full((8,), float("inf")))
    # a basis said to be orthonormal is checked, not trusted
    with pytest.raises(InputError, match="not orthonormal"):
        Subspace(torch.stack([v, v]), orthonormalize=False)
    with pytest.raises(InputError, match="not orthonormal"):
        Subspace((2 * v / v.norm())[None], orthonormalize=False)
    ok = Subspace(torch.stack([v, torch.randn(8, generator=torch.Generator().manual_seed(1))]))
    assert Subspace(ok.basis, orthonormalize=False).rank == 2
