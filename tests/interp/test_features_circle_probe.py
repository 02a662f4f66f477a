"""The circle probe (Engels et al.) on planted circles, against a least-squares reference."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from interp.edits import EditContext, Rotate
from interp.errors import InputError
from interp.features import circle_probe, class_mean_subspace
from interp.subspace import CircleMap, Subspace

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def planted_ellipse(d_model=64, per_class=12, n_templates=6, ratio=5.0, noise=0.05, seed=0):
    """Seven evenly spaced angles read through an anisotropic linear map (an ellipse with axes 3 and
    3 / ratio in a random plane), plus a per-template offset and isotropic noise. In the class-mean
    plane the days sit unevenly around a fitted round circle; a linear read-out recovers the angles."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d_model, 3, generator=g))[0].T
    offsets = torch.randn(n_templates, d_model, generator=g) * 0.05
    rows, labels, groups = [], [], []
    for k, day in enumerate(DAYS):
        a = 2 * math.pi * k / 7
        point = 3 * math.cos(a) * q[0] + 3 / ratio * math.sin(a) * q[1] + 5 * q[2]
        for i in range(per_class):
            t = i % n_templates
            rows.append(point + offsets[t] + noise * torch.randn(d_model, generator=g))
            labels.append(day)
            groups.append(f"template{t}")
    return torch.stack(rows), labels, groups, q


def test_probe_recovers_an_unevenly_spaced_circle_where_even_spacing_fails():
    x, labels, groups, q = planted_ellipse()
    even = class_mean_subspace(x, labels, order=DAYS)
    probe = circle_probe(x, labels, order=DAYS, groups=groups)
    assert even.meta["loco_angle_error"] > 0.3  # the even-spacing estimate is large here ...
    assert probe.meta["loco_angle_error"] < 0.05  # ... the probe's error is near zero (per-row LOTO: row noise)
    assert probe.meta["loto_angle_error"] < 0.15 and set(probe.meta["loto_angle_errors"]) == set(groups)
    assert probe.meta["order_matches"] is True and min(probe.meta["r2"]) > 0.95
    assert probe.meta["angle_error"] < 0.03
    # the probe's plane is the ellipse's plane; its map reads each row's angle
    assert torch.linalg.svdvals(probe.basis.double() @ q[:2].T.double()).min() > 0.95
    assert isinstance(probe.coord_map, CircleMap) and probe.coord_map.axes is not None
    target = torch.tensor([2 * math.pi * DAYS.index(v) / 7 for v in labels])
    err = torch.remainder(probe.predict(x) - target + math.pi, 2 * math.pi) - math.pi
    assert err.abs().mean() < 0.1  # per row: row noise on the short axis
    assert abs(probe.coord_map.radius - 1.0) < 0.05  # the read-out is on the unit circle


def test_probe_equals_least_squares_on_the_top_principal_components():
    x, labels, _, _ = planted_ellipse(d_model=32, seed=3)
    probe = circle_probe(x, labels, order=DAYS, n_pcs=4)
    xn = x.double().numpy()
    xc = xn - xn.mean(0)
    comps = np.linalg.svd(xc, full_matrices=False)[2][:4]
    z = np.c_[xc @ comps.T, np.ones(len(xn))]
    theta = np.array([2 * math.pi * DAYS.index(v) / 7 for v in labels])
    sol = np.linalg.lstsq(z, np.c_[np.cos(theta), np.sin(theta)], rcond=None)[0]
    read = z @ sol
    expected = np.arctan2(read[:, 1], read[:, 0])
    got = probe.predict(x).double().numpy()
    assert np.allclose(np.remainder(got - expected + np.pi, 2 * np.pi) - np.pi, 0, atol=1e-4)
    assert probe.meta["n_pcs"] == 4


def test_probe_plane_takes_a_rotation_to_a_class_and_saves():
    x, labels, _, _ = planted_ellipse(seed=1)
    probe = circle_probe(x, labels, order=DAYS)
    ctx = EditContext(torch.arange(5), torch.zeros(5, dtype=torch.long), None)
    moved = Rotate(probe, to="Thursday")(x[:5], ctx)
    got = probe.predict(moved)
    thu = probe.coord_map.angles["Thursday"]
    assert torch.allclose(torch.remainder(got - thu + math.pi, 2 * math.pi) - math.pi, torch.zeros(5), atol=1e-4)
    # in bfloat16 too (torch has no half-precision solve on CPU: the circle's axes are solved in float32)
    moved16 = Rotate(probe, to="Thursday")(x[:5].bfloat16(), ctx)
    assert moved16.dtype == torch.bfloat16
    assert torch.allclose(moved16.float(), moved, atol=0.1)
    loaded = Subspace.load(probe.save(Path(tempfile.mkdtemp()) / "probe"))
    assert torch.allclose(loaded.coord_map.axes, probe.coord_map.axes)
    assert torch.allclose(loaded.predict(x[:9]), probe.predict(x[:9]), atol=1e-6)


def test_target_angles_from_the_class_means_or_given():
    x, labels, _, _ = planted_ellipse(seed=2)
    learned = circle_probe(x, labels, order=DAYS, angles="class_mean")
    cm = class_mean_subspace(x, labels, order=DAYS).coord_map
    assert learned.meta["target_angles"] == pytest.approx({d: cm.angles[d] for d in DAYS})
    given = {d: 2 * math.pi * i / 7 for i, d in enumerate(DAYS)}
    assert circle_probe(x, labels, order=DAYS, angles=given).meta["loco_angle_error"] == pytest.approx(
        circle_probe(x, labels, order=DAYS).meta["loco_angle_error"])
    with pytest.raises(InputError, match="angles must map every class"):
        circle_probe(x, labels, order=DAYS, angles={"Monday": 0.0})
    with pytest.raises(InputError, match="angles='even'"):
        circle_probe(x, labels, order=DAYS, angles="even")
    with pytest.raises(InputError, match="at least 3 classes"):
        circle_probe(x[:24], labels[:24])
    with pytest.raises(InputError, match="one group"):
        circle_probe(x, labels, groups=["a"])


def test_rows_without_a_signal_are_refused_in_one_line():
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(0)).expand(70, 16).clone()
    with pytest.raises(InputError, match="identical"):
        circle_probe(x, [DAYS[i % 7] for i in range(70)])
    # rows that vary, but only along one direction: the read-out plane has one dimension
    line = torch.randn(70, 1, generator=torch.Generator().manual_seed(1)) * torch.ones(1, 16)
    with pytest.raises(InputError, match="degenerate"):
        circle_probe(line, [DAYS[i % 7] for i in range(70)])
