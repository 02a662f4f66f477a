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
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t = torch.empty(MB << 18).fill_(1.0)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
out = {"pages": (MB << 20) // 4096, "outside": faults(4)}
with malloc.reuse_freed_memory() as on:
    out["on"] = on
    faults(2)
    out["inside"] = faults(4)
    with malloc.reuse_freed_memory():
        faults(1)
    out["after_inner"] = faults(4)
out["after"] = faults(4)
print(json.dumps(out))
"""


@needs_glibc
def test_freed_blocks_are_reused_inside_and_unmapped_outside():
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    pages = got["pages"]
    assert got["on"] is True
    assert got["outside"] > 3.5 * pages  # each round maps fresh pages
    assert got["inside"] < 0.5 * pages  # the pages of the first rounds are reused
    assert got["after_inner"] < 0.5 * pages  # a nested block's end keeps the outer block's setting
    assert got["after"] > 3.5 * pages  # back to glibc's handling once the last block ends


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
