"""Faults: runs killed with SIGKILL at chosen points and resumed, and writers racing on one folder.

The runs happen in one subprocess (tests/fault_driver.py) that forks a child per run; here the
outcomes are checked and the folders compared byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interp.cache import CachedActivations
from interp.folders import TMP_PREFIX

DRIVER = Path(__file__).parent / "fault_driver.py"
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(DRIVER), str(out), "train", "cache", "race"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads(done.stdout.strip().splitlines()[-1])


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temps(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob(f"{TMP_PREFIX}*")]


def check_chain(runs: list[dict], ref: dict, kills: int) -> None:
    assert len(runs) == kills + 1
    for run in runs[:-1]:
        assert run["killed"], run  # every kill point was reached: SIGKILL, not a clean exit or an error
    assert not runs[-1]["killed"] and runs[-1]["exit"] == 0 and "error" not in runs[-1], runs[-1]
    assert ref["exit"] == 0 and "error" not in ref, ref
    assert len({tuple(r["kill_at"]) for r in runs[:-1]}) >= 8  # different points, not one point repeated


def test_training_killed_at_ten_points_resumes_bit_exact(report):
    out, rep = report
    runs, ref = rep["train"]["runs"], rep["train"]["ref"]
    check_chain(runs, ref, 10)
    assert runs[-1]["result"] == ref["result"] == {"steps": 30, "tokens": 30 * 64}
    # the kills left the debris they were meant to: half-written checkpoints and an SAE in temporary folders
    debris = [n for r in runs[:-1] for n in r["left"] if Path(n).name.startswith(TMP_PREFIX)]
    assert any(n.startswith("checkpoints/") for n in debris) and any("/" not in n for n in debris), debris
    run, ref_dir = out / "train" / "run", out / "train" / "ref"
    assert temps(run) == []
    got, want = files(run), files(ref_dir)
    assert sorted(got) == sorted(want)
    assert {"sae/sae_weights.safetensors", "train_history.json", "checkpoints/latest.json"} <= set(got)
    for name in want:
        assert got[name] == want[name], name
    history = json.loads(got["train_history.json"])
    assert [h["step"] for h in history] == [*range(3, 31, 3)] and history[-1]["tokens"] == 30 * 64


def test_caching_killed_at_ten_points_resumes_bit_exact(report):
    out, rep = report
    runs, ref = rep["cache"]["runs"], rep["cache"]["ref"]
    check_chain(runs, ref, 10)
    debris = [n for r in runs[:-1] for n in r["left"] if n.startswith(TMP_PREFIX)]
    assert any("shard" in n for n in debris) and any("manifest" in n for n in debris), debris
    run, ref_dir = out / "cache" / "run", out / "cache" / "ref"
    assert temps(run) == []
    assert runs[-1]["result"]["rows"] == ref["result"]["rows"] >= 2400 and runs[-1]["result"]["complete"]
    got, want = files(run), files(ref_dir)
    assert sorted(got) == sorted(want) and len([n for n in got if n.startswith("shard-")]) >= 10
    for name in want:
        assert got[name] == want[name], name


def test_two_writers_racing_on_one_cache_one_writes_one_refuses(report):
    out, rep = report
    race = rep["race"]
    assert all(r["exit"] == 0 for r in race["refs"].values()), race["refs"]
    refs = {name: list(CachedActivations(out / "race" / f"ref-{name}", batch_tokens=50, with_tokens=True))
            for name in race["refs"]}
    assert len(race["rounds"]) == 20
    for rnd in race["rounds"]:
        loser, winner = rnd["ended"]
        assert (loser["outcome"], winner["outcome"]) == ("refused", "wrote"), rnd
        assert "\n" not in loser["message"]
        if loser["dtype"] == winner["dtype"]:  # the same settings: only the lock can stop it
            assert f"is being written by process {winner['pid']}" in loser["message"], rnd
        else:  # the other settings: the lock, or the winner's manifest already on disk
            assert (f"process {winner['pid']}" in loser["message"] or "other settings" in loser["message"]), rnd
        folder = out / "race" / rnd["folder"]
        ref_folder = out / "race" / f"ref-{winner['dtype']}"
        got, want = files(folder), files(ref_folder)
        assert sorted(got) == sorted(want), rnd
        assert all(got[n] == want[n] for n in want), rnd  # byte-identical to a single writer's build
        back = list(CachedActivations(folder, batch_tokens=50, with_tokens=True))
        expected = refs[winner["dtype"]]
        assert len(back) == len(expected) > 5
        for a, b in zip(back, expected):
            assert all(torch.equal(a[k], b[k]) for k in b)
