"""Every finder returns a Subspace that the intervention API accepts unchanged (tiny random model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from interp.capture import capture
from interp.edits import ProjectOut, Rotate, SetCoords
from interp.features import class_mean_subspace, find_multidim_features, lda_subspace, pls_subspace
from interp.intervene import intervene
from interp.subspace import Subspace

sys.path.insert(0, str(Path(__file__).parent.parent))
from conftest import tiny_model  # noqa: E402

SITE = "blocks.1.hook_resid_post"
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


@pytest.fixture(scope="module")
def model_and_acts():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (70, 6), generator=g)
    acts = capture(model, ids, [SITE], positions="last")[SITE]
    return model, ids, acts


@pytest.fixture(scope="module")
def found(model_and_acts):
    return finders(model_and_acts[2])


def finders(acts):
    labels = [DAYS[i % 7] for i in range(len(acts))]
    values = acts[:, 0] * 2 + acts[:, 1]
    w_dec = torch.cat([acts[:20] - acts.mean(0),
                       torch.randn(10, acts.shape[1], generator=torch.Generator().manual_seed(1))])
    clusters = [list(range(0, 20)), list(range(20, 30))]
    multi = find_multidim_features(w_dec, acts, encode=lambda x: torch.relu(x @ w_dec.T), clusters=clusters,
                                   labels=labels, order=DAYS)
    return {
        "class_mean": (class_mean_subspace(acts, labels, order=DAYS), "Friday"),
        "lda": (lda_subspace(acts, labels, shrinkage=0.5), "Friday"),
        "pls": (pls_subspace(acts, values, max_components=3), 1.5),
        "sae_cluster": (multi[0].subspace, None),
    }


@pytest.mark.parametrize("name", ["class_mean", "lda", "pls", "sae_cluster"])
def test_finder_subspaces_drive_interventions(model_and_acts, found, tmp_path, name):
    model, ids, acts = model_and_acts
    sub, value = found[name]
    assert isinstance(sub, Subspace) and sub.d_model == acts.shape[1]
    sub = Subspace.load(sub.save(tmp_path / name))  # what a user would hand to the intervention issue
    target = sub.to_coords(value) if value is not None else torch.full((sub.rank,), 0.5)
    with intervene(model, {SITE: SetCoords(sub, target)}, positions="last"):
        moved = capture(model, ids, [SITE], positions="last")[SITE]
    assert torch.allclose(sub.project(moved), target.expand(len(ids), -1), atol=1e-4)
    assert torch.allclose(sub.remove(moved), sub.remove(acts), atol=1e-4)
    with intervene(model, {SITE: ProjectOut(sub)}, positions="last"):
        removed = capture(model, ids, [SITE], positions="last")[SITE]
    assert torch.allclose(sub.project(removed), torch.zeros(len(ids), sub.rank), atol=1e-4)


def test_circle_rotation_by_class_name(model_and_acts, found):
    model, ids, acts = model_and_acts
    sub, _ = found["class_mean"]
    with intervene(model, {SITE: Rotate(sub, to="Friday")}, positions="last"):
        moved = capture(model, ids, [SITE], positions="last")[SITE]
    angles = sub.from_coords(sub.project(moved))
    fri = torch.tensor(sub.coord_map.angles["Friday"])
    assert torch.allclose(torch.remainder(angles - fri + torch.pi, 2 * torch.pi) - torch.pi,
                          torch.zeros(len(ids)), atol=1e-3)
