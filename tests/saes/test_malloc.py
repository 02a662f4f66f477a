"""Freed memory kept while SAEs train on CPU: a weight-sized tensor allocated again after being freed
reuses its pages inside :func:`saes.malloc.reuse_freed_memory` and faults every page in outside it; the
setting ends with the last user, and user settings of malloc are left alone."""

from __future__ import annotations

import resource

import pytest
import torch

from saes import malloc

needs_glibc = pytest.mark.skipif(malloc.glibc() is None, reason="glibc's malloc (Linux) not in use here")
MB = 64  # over glibc's largest dynamic mmap threshold (32 MiB): outside the block every allocation is a new mapping
PAGES = (MB << 20) // 4096


def faults(n: int) -> int:
    """Minor page faults of ``n`` allocate-touch-free rounds of a ``MB`` tensor."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t = torch.empty(MB << 18).fill_(1.0)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@needs_glibc
def test_freed_blocks_are_reused_inside_and_unmapped_outside():
    assert faults(4) > 3.5 * PAGES  # each round maps fresh pages
    with malloc.reuse_freed_memory() as on:
        assert on
        faults(2)  # the first rounds map the pages (a free block left by earlier code may be taken first)
        assert faults(4) < 1.5 * PAGES  # against 4 x PAGES outside
    assert faults(4) > 3.5 * PAGES  # back to glibc's handling once the block ends


@needs_glibc
def test_nested_blocks_keep_the_setting_until_the_outer_one_ends():
    with malloc.reuse_freed_memory():
        with malloc.reuse_freed_memory():
            faults(2)
        assert faults(4) < 1.5 * PAGES
    assert faults(3) > 2.5 * PAGES


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
