"""Freed memory kept while SAEs train on CPU: a weight-sized tensor allocated again after being freed
reuses its pages inside :func:`saes.malloc.reuse_freed_memory` and faults every page in outside it; the
setting ends with the last user, and user settings of malloc are left alone.

The page counts run in a fresh interpreter: glibc may have moved a long-lived process's main thread to
another arena (after lock contention with other threads), and there blocks over 64 MiB are always fresh
mappings, whatever the thresholds (the setting then changes nothing, which the module docstring says)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from saes import malloc

needs_glibc = pytest.mark.skipif(malloc.glibc() is None, reason="glibc's malloc (Linux) not in use here")

CHILD = r"""
import json, resource, torch
from saes import malloc
MB = 48  # over glibc's largest dynamic mmap threshold (32 MiB): outside the block every allocation is a new mapping
def faults(n):
    out = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(MB << 18).fill_(1.0)
        del t
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out
out = {"pages": (MB << 20) // 4096, "outside": faults(4)}
with malloc.reuse_freed_memory() as on:
    out["on"] = on
    faults(2)
    out["inside"] = faults(8)
    with malloc.reuse_freed_memory():
        faults(1)
    out["after_inner"] = faults(8)
out["after"] = faults(1)
print(json.dumps(out))
"""


@needs_glibc
def test_freed_blocks_are_reused_inside_and_unmapped_outside():
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    pages = got["pages"]
    assert got["on"] is True
    assert min(got["outside"]) > 0.9 * pages  # each round maps fresh pages
    # Inside, rounds reuse the pages of earlier ones. A round may still fault once in a while: when a small
    # object lands next to the freed block, the next (aligned, slightly larger) request no longer fits
    # in it and the heap grows once (seen with one OpenMP thread); the steady state is no faults.
    for key in ("inside", "after_inner"):  # a nested block's end keeps the outer block's setting
        assert sorted(got[key])[len(got[key]) // 2] < 0.01 * pages, (key, got[key])
        assert sum(got[key]) < 2.5 * pages, (key, got[key])
    # Leaving the last block hands the freed memory back (malloc_trim): the next round faults its pages in.
    assert got["after"][0] > 0.9 * pages


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "65536"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}])
def test_user_malloc_settings_are_left_alone(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert malloc.glibc() is None
    with malloc.reuse_freed_memory() as on:
        assert not on


def test_disabled_block_changes_nothing():
    with malloc.reuse_freed_memory(enabled=False) as on:
        assert not on
