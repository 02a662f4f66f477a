"""The weekday-circle intervention experiment, reduced, on the embedded model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_weekday_experiment_reduced_run_writes_results(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import weekday_circle_intervention as exp

    rc = exp.main(["--out", str(tmp_path), "--layers", "10", "8,10", "--positions", "day", "--scales", "1,2",
                   "--select-layers", "8,10", "--select-groups", "8,9,10", "--group-scales", "1",
                   "--fit-templates", "3", "--eval-templates", "1", "--random-seeds", "1", "--max-rows", "12"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "success_by_layer.png").stat().st_size > 0
    assert res["n_rows"] == 12
    # rows are prompts the model copies correctly and targets differ from the source: no edit never succeeds
    assert res["control_none"]["success"] == 0.0 and res["control_none"]["source_kept"] == 1.0
    edits = {(r["edit"], r["position"]) for r in res["results"]}
    assert edits == {("circle", "day"), ("random", "day"), ("replace", "day"), ("day_subspace", "day"),
                     ("random_rank6", "day"), ("random_day_span", "day")}  # a random plane inside the day span too
    assert res["circles"]["10/day"]["order_matches"] is True
    # the held-out sweep: a single layer at every --scales multiplier, a group at every --group-scales radius
    swept = {(tuple(r["layers"]), r["edit"], r["mode"], r["scale"]) for r in res["results"] if r["edit"] != "replace"}
    assert {((10,), "circle", "scale", 1.0), ((10,), "circle", "scale", 2.0), ((8, 10), "circle", "radius", 1.0),
            ((8, 10), "random", "radius", 1.0)} <= swept
    # the selection saw only fit templates: 2 layers x 2 scales, one score per left-out fit template
    sel = res["selection"]
    # (single layers x scales, plus the layer group with an absolute radius)
    got = {(tuple(c["layers"]), c["mode"], c["scale"]) for c in sel["candidates"]}
    assert got == {((8,), "scale", 1.0), ((8,), "scale", 2.0), ((10,), "scale", 1.0), ((10,), "scale", 2.0),
                   ((8, 9, 10), "radius", 1.0)}
    assert all(len(c["per_fold"]) == 3 for c in sel["candidates"])
    best = max(c["success"] for c in sel["candidates"])
    assert sel["chosen_fit_success"] == best
    head, ch = res["headline"], sel["chosen"]
    assert ((head["circle"]["layers"], head["circle"]["mode"], head["circle"]["scale"])
            == (ch["layers"], ch["mode"], ch["scale"]))
    assert head["random"]["scale"] == ch["scale"] and head["random"]["mode"] == ch["mode"]
    assert head["replace"]["edit"] == "replace" and head["replace"]["layers"] == ch["layers"]
    assert res["n_rows_eval"] == 12 and all(res[f"n_rows_{p}"] == 0 for p in ("confirm", "confirm2", "confirm3"))
    # the rank-6 span of the day means, set to the target's coordinates, at the chosen layers
    full = head["day_subspace_rank6"]
    assert full["edit"] == "day_subspace" and full["layers"] == ch["layers"] and full["mode"] == "set"
    assert head["random_rank6"]["edit"] == "random_rank6" and head["random_rank6"]["layers"] == ch["layers"]
    ci = head["ci95_by_prompt_bootstrap"]["circle"]["all"]  # a 95 % interval around the circle's success
    assert ci[0] <= head["circle"]["success"] <= ci[1]
    for r in res["results"]:  # the target is neither the source nor one of its own two neighbours
        assert 0.0 <= r["success"] <= 1.0 and r["success"] + r["source_kept"] <= 1.0 + 1e-6
        assert r["success"] + r["next_to_target"] <= 1.0 + 1e-6
    sys.modules.pop("weekday_circle_intervention", None)


@pytest.mark.slow
def test_weekday_experiment_compares_das_planes_on_fit_templates(tmp_path, monkeypatch):
    """The DAS path, reduced: planes trained per fold of fit templates (one step), chosen per plane and
    overall by the fit-template scores, each measured held out with its controls."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import weekday_circle_intervention as exp

    rc = exp.main(["--out", str(tmp_path), "--planes", "class_mean,das", "--select-layers", "", "--select-groups",
                   "8,10", "--group-scales", "3,4", "--das-scales", "3", "--das-within", "class_means,full",
                   "--das-steps", "1", "--das-batch", "4", "--fit-templates", "3", "--eval-templates", "1",
                   "--random-seeds", "1", "--max-rows", "12", "--targets-per-prompt", "2", "--no-plot"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    sel, head = res["selection"], res["headline"]
    das = [c for c in sel["candidates"] if c["plane"] == "das"]
    assert {(tuple(c["layers"]), c["scale"], c["das_scale"], c["das_within"]) for c in das} == {
        ((8, 10), s, 3.0, w) for s in (3.0, 4.0) for w in ("class_means", "full")}
    assert all(len(c["per_fold"]) == 3 for c in sel["candidates"])
    assert len(sel["das_losses"]) == 6 and all(len(v) == 1 for v in sel["das_losses"].values())  # 2 spans x 3 folds
    for plane in ("class_mean", "das"):  # each plane's own choice is its best fit-template score
        mine = [c for c in sel["candidates"] if c["plane"] == plane]
        assert sel["chosen_per_plane"][plane]["fit_success"] == max(c["success"] for c in mine)
        row = head["per_plane"][plane]
        assert row["circle"]["plane"] == plane and row["random"]["plane"] == plane
        assert row["random_day_span"]["edit"] == "random_day_span"
        assert row["circle"]["layers"] == sel["chosen_per_plane"][plane]["layers"] == [8, 10]
        ci = row["ci95_by_prompt_bootstrap"]["circle"]["all"]
        assert ci[0] <= row["circle"]["success"] <= ci[1]
    assert head["circle"] == head["per_plane"][sel["chosen"]["plane"]]["circle"]
    # the class-mean plane is its own plane and lies in the day means' span: the diagnostics say so
    for where in head["per_plane"]["class_mean"]["planes"].values():
        assert min(where["cos_with_class_mean_plane"]) > 0.999 and where["share_in_day_span"] > 0.999
    das_row = head["per_plane"]["das"]
    assert len(das_row["das_fit"]["losses"]) == 1 and set(das_row["planes"]) == {"8", "10"}
    other = "full" if sel["chosen_per_plane"]["das"]["das_within"] == "class_means" else "class_means"
    assert list(head["das_other_spans"]) == [other]
    assert head["das_other_spans"][other]["circle"]["plane"] == f"das_{other}"
    if other == "full":  # a plane trained inside the day means' span stays there
        assert all(w["share_in_day_span"] > 0.999 for w in das_row["planes"].values())
    from interp import Rotate, Subspace

    saved = Subspace.load(tmp_path / f"das_planes_{other}" / "blocks.8.hook_resid_post")
    assert saved.meta["finder"] == "das_circle" and saved.rank == 2
    Rotate(saved, to="Thursday")  # a saved DAS plane is a circle edit like any other
    sys.modules.pop("weekday_circle_intervention", None)


def test_probe_plane_recovers_a_planted_weekday_circle(monkeypatch):
    """The circle-probe plane of ``weekday_circle_probe_plane.py`` on synthetic activations: seven days
    evenly spaced on a circle in a random plane of a 64-d space, plus a random day-specific code off
    the circle and noise. Reading the top five class-mean directions the probe must find the circle's
    plane and put the days in Monday..Sunday order with increasing angles."""
    import math

    import torch

    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import weekday_circle_probe_plane as pp

    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(64, 5, generator=g))[0].T  # 2 circle directions + 3 off-circle ones
    labels = [d for _ in range(30) for d in pp.W.DAYS]
    k = torch.tensor([pp.W.DAYS.index(d) for d in labels], dtype=torch.float32)
    theta = 2 * math.pi * k / 7
    other = torch.randn(7, 3, generator=g)  # a non-circular day code elsewhere
    x = (torch.stack([theta.cos(), theta.sin()], 1) * 2.0) @ q[:2] + other[k.long()] @ q[2:]
    x = x + 0.1 * torch.randn(len(labels), 64, generator=g) + 5.0
    sub = pp.probe_circle(x, labels, k=5)
    # the fitted plane is the planted circle's plane: both principal cosines are ~1
    assert torch.linalg.svdvals(sub.basis.double() @ q[:2].T.double()).min() > 0.99
    # read from two directions only, it cannot hold the whole circle
    assert torch.linalg.svdvals(pp.probe_circle(x, labels, k=2).basis.double() @ q[:2].T.double()).min() < 0.9
    angles = torch.tensor([sub.coord_map.angles[d] for d in pp.W.DAYS])
    steps = torch.remainder(angles.roll(-1) - angles, 2 * math.pi)
    assert torch.allclose(steps, torch.full((7,), 2 * math.pi / 7), atol=0.1)
    assert abs(sub.coord_map.radius - 2.0) < 0.2
    sys.modules.pop("weekday_circle_probe_plane", None)
    sys.modules.pop("weekday_circle_intervention", None)


@pytest.mark.slow
def test_probe_plane_reduced_run_writes_results(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import weekday_circle_probe_plane as pp

    assert pp.main(["--out", str(tmp_path), "--fit-templates", "4", "--folds", "2", "--max-candidates", "2"]) == 0
    res = json.loads((tmp_path / "probe_plane_fit_cv_k5.json").read_text())
    assert res["k"] == 5 and res["folds"] == 2 and res["fit_templates"] == 4 and len(res["candidates"]) == 2
    assert res["rows"] > 0  # prompts the model copies, times six targets, pooled over both folds
    for c in res["candidates"]:
        assert 0.0 <= c["pca_success"] <= 1.0 and 0.0 <= c["probe_success"] <= 1.0
    assert res["best"]["pca"] == max(c["pca_success"] for c in res["candidates"])
    sys.modules.pop("weekday_circle_probe_plane", None)
    sys.modules.pop("weekday_circle_intervention", None)
