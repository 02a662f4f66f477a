"""One activation source: sites of different widths, cache growth, and the shuffle code shared by the live
store and the disk cache."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

import interp.cache as cache_mod
from interp.cache import CachedActivations, CacheInfo, cache_activations
from interp.capture import capture
from interp.data import load_texts, pack, token_mask
from interp.errors import InputError
from interp.store import ActivationStore

DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog on day {i}. " * (2 + i % 3) for i in range(40)]
RESID, MLP = "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"  # widths 32 and 64 on the tiny llama
WIDE = [RESID, MLP]
KW = dict(dataset=DOCS, context_size=32, model_batch_size=4, progress=False)


def _rows(folder, keys) -> dict[str, torch.Tensor]:
    """Every row of a cache in shard order (not shuffled)."""
    reader = CachedActivations(folder, batch_tokens=1, with_tokens=True)
    loaded = [reader._load(s) for s in reader.shards]
    return {k: torch.cat([d[k] for d in loaded]) for k in keys}


def _files(folder) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_two_sites_of_different_widths_read_back_aligned(tmp_path):
    model, tok = tiny_model("llama"), byte_tokenizer()
    info = cache_activations(model, tok, WIDE, tmp_path / "c", 500, shard_tokens=200, **KW)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["widths"] == {RESID: 32, MLP: 64}
    assert manifest["dtypes"] == {RESID: "float32", MLP: "float32", "tokens": "int32"}
    reader = CachedActivations(info, batch_tokens=50, shards_in_memory=2, seed=4)  # a CacheInfo is path-like
    live = ActivationStore(model, tok, WIDE, dataset=DOCS, context_size=32, batch_tokens=50)
    assert reader.d_models == live.d_models == {RESID: 32, MLP: 64}
    for source in (reader, live):
        with pytest.raises(InputError, match="d_models"):
            _ = source.d_model
    assert CachedActivations(info, batch_tokens=50, sites=[MLP]).d_model == 64

    # stored rows are the model's activations at the kept positions (against a plain capture)
    stored = _rows(info.path, WIDE + ["tokens"])
    wins = torch.stack(list(pack(load_texts(DOCS, shuffle_seed=0), tok, 32)))[: len(stored["tokens"]) // 20 + 8]
    keep = token_mask(wins, tok)
    ref = capture(model, wins, WIDE, positions=keep)
    n = stored[RESID].shape[0]
    assert torch.equal(stored["tokens"], wins[keep][:n].to(torch.int32))
    for site, width in ((RESID, 32), (MLP, 64)):
        assert stored[site].shape == (n, width)
        torch.testing.assert_close(stored[site], ref[site][:n], rtol=1e-5, atol=1e-5)

    # every shuffled batch keeps the two sites' rows aligned (same position in both)
    index = {tuple(r.tolist()): i for i, r in enumerate(stored[RESID])}
    batches = list(reader)
    assert len(batches) == n // 50  # a group's last rows begin a batch the next group ends: none is dropped
    assert all(b[MLP].shape == (50, 64) and b[RESID].shape == (50, 32) for b in batches)
    for b in batches:
        rows = torch.tensor([index[tuple(r.tolist())] for r in b[RESID]])
        assert torch.equal(b[MLP], stored[MLP][rows])


def test_old_caches_read_widths_from_the_shard_header(tmp_path, monkeypatch):
    model, tok = tiny_model("llama"), byte_tokenizer()
    folder = cache_activations(model, tok, WIDE, tmp_path / "c", 200, **KW).path
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["widths"], manifest["dtypes"]
    (folder / "manifest.json").write_text(json.dumps(manifest))

    def no_tensor_reads(*a, **k):
        raise AssertionError("d_models must not load tensors")

    monkeypatch.setattr(cache_mod, "load_file", no_tensor_reads)
    assert CachedActivations(folder, batch_tokens=10).d_models == {RESID: 32, MLP: 64}


def test_cache_growth_appends_what_one_larger_run_writes(tmp_path):
    model, tok = tiny_model("llama"), byte_tokenizer()
    one = cache_activations(model, tok, WIDE, tmp_path / "one", 1000, shard_tokens=300, **KW)
    small = cache_activations(model, tok, WIDE, tmp_path / "grown", 400, shard_tokens=300, **KW)
    grown = cache_activations(model, tok, WIDE, tmp_path / "grown", 1000, shard_tokens=300, **KW)
    assert small.rows >= 400 and small.rows_added == small.rows and not small.exhausted
    assert grown.rows == one.rows >= 1000 and grown.rows_added == one.rows - small.rows > 0
    assert grown.complete and "wrote" in grown.summary()
    a, b = _rows(one.path, WIDE + ["tokens"]), _rows(grown.path, WIDE + ["tokens"])
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-exact: the window stream continued, no row repeated
    assert json.loads((grown.path / "manifest.json").read_text())["n_tokens"] == 1000


def test_rerunning_a_complete_cache_touches_nothing(tmp_path, monkeypatch):
    model, tok = tiny_model("llama"), byte_tokenizer()
    first = cache_activations(model, tok, WIDE, tmp_path / "c", 600, shard_tokens=250, **KW)
    before = _files(first.path)

    def no_forward(*a, **k):
        raise AssertionError("a complete cache must return before any forward pass")

    monkeypatch.setattr(cache_mod, "capture_rows", no_forward)
    monkeypatch.setattr(cache_mod, "site_widths", no_forward)
    for asked in (600, 100):
        again = cache_activations(model, tok, WIDE, first.path, asked, shard_tokens=250, **KW)
        assert _files(first.path) == before
        assert again == CacheInfo(path=first.path, rows=first.rows, rows_added=0, requested=asked, complete=True,
                                  exhausted=False)
        assert again.summary() == (f"the cache at {first.path} already holds {first.rows} rows (asked for {asked}): "
                                   "nothing to do")
        assert os.fspath(again) == str(first.path)


def test_a_short_dataset_completes_with_fewer_rows(tmp_path):
    model, tok = tiny_model("llama"), byte_tokenizer()
    info = cache_activations(model, tok, WIDE, tmp_path / "c", 100_000, shard_tokens=400, **KW)
    wins = list(pack(load_texts(DOCS, shuffle_seed=0), tok, 32))
    assert info.exhausted and info.complete and info.rows == int(token_mask(torch.stack(wins), tok).sum())
    assert "all the dataset gives (asked for 100000)" in info.summary()
    rank = json.loads((info.path / "manifest.rank0.json").read_text())
    assert rank["complete"] and rank["exhausted"] and rank["windows"] == len(wins)
    before = _files(info.path)
    more = cache_activations(model, tok, WIDE, info.path, 200_000, shard_tokens=400, **KW)
    assert _files(info.path) == before and more.rows_added == 0 and more.exhausted
    assert more.summary().endswith("nothing to do")


def test_live_and_cached_sources_share_the_shuffle(tmp_path):
    """One buffer holding the whole dataset and one shard holding it yield the very same batches."""
    model, tok = tiny_model("llama"), byte_tokenizer()
    kw = dict(KW, dataset=DOCS[:15])
    folder = cache_activations(model, tok, WIDE, tmp_path / "c", 100_000, shard_tokens=100_000, seed=5, **kw).path
    cached = CachedActivations(folder, batch_tokens=64, seed=5)
    live = ActivationStore(model, tok, WIDE, dataset=DOCS[:15], context_size=32, batch_tokens=64,
                           buffer_tokens=100_000, model_batch_size=4, seed=5)
    a, b = list(cached), list(live)
    assert len(a) == len(b) == cached.n_tokens // 64 > 10 and live.n_tokens is None
    for x, y in zip(a, b):
        assert set(x) == set(y) == set(WIDE)
        for site in WIDE:
            assert torch.equal(x[site], y[site])
    da, db = cached.describe(), live.describe()
    assert json.loads(json.dumps(da)) == da and json.loads(json.dumps(db)) == db
    assert {"source", "model", "sites", "widths", "dataset", "context_size", "rows"} <= set(da) & set(db)
    assert da["widths"] == db["widths"] == {RESID: 32, MLP: 64}
    assert (da["rows"], db["rows"]) == (cached.n_tokens, None)
    assert da["context_size"] == db["context_size"] == 32 and da["sites"] == db["sites"] == WIDE


def test_cached_exact_resume_across_groups_and_epochs(tmp_path):
    model, tok = tiny_model("llama"), byte_tokenizer()
    folder = cache_activations(model, tok, WIDE, tmp_path / "c", 900, shard_tokens=200, **KW).path
    kw = dict(batch_tokens=60, shards_in_memory=2, seed=2, epochs=2, with_tokens=True)
    full = list(CachedActivations(folder, **kw))
    assert len(full) > 20
    assert not torch.equal(full[0][RESID], full[len(full) // 2][RESID])  # epochs are shuffled differently
    for cut in (1, 3, 6, len(full) // 2, len(full) // 2 + 1, len(full) - 1):
        src = CachedActivations(folder, **kw)
        for _ in range(cut):
            src.next_batch()
        resumed = CachedActivations(folder, **kw)
        resumed.load_state_dict(json.loads(json.dumps(src.state_dict())))
        rest = list(resumed)
        assert len(rest) == len(full) - cut
        for x, y in zip(rest, full[cut:]):
            assert all(torch.equal(x[k], y[k]) for k in (*WIDE, "tokens"))
    with pytest.raises(InputError, match="lacks"):
        CachedActivations(folder, **kw).load_state_dict({"epoch": 0})


# -- every row once per epoch, fixed batch sizes, exact resume with a batch that spans groups ----------------


def _tagged_cache(folder, sizes, *, width=3):
    """A cache folder whose row ``i`` (over the shards in order) holds the value ``i`` in every column, so a
    served row names itself. Written by hand: the reader sees an ordinary cache."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    shards, first = [], 0
    for i, n in enumerate(sizes):
        name = f"shard-r0-{i:06d}.safetensors"
        ids = torch.arange(first, first + n)
        save_file({RESID: ids[:, None].expand(n, width).float().contiguous(), "tokens": ids.to(torch.int32)},
                  str(folder / name))
        shards.append({"file": name, "rows": n, "bytes": (folder / name).stat().st_size})
        first += n
    (folder / "manifest.json").write_text(json.dumps({"format": cache_mod.FORMAT, "sites": [RESID],
                                                      "widths": {RESID: width}, "context_size": 32}))
    (folder / "manifest.rank0.json").write_text(json.dumps({"rank": 0, "shards": shards, "windows": 0,
                                                            "complete": True}))
    return folder


def _ids(batch) -> list[int]:
    return batch[RESID][:, 0].long().tolist()


@pytest.mark.parametrize("sizes, batch_tokens, in_memory, epochs", [
    ([617] * 5, 400, 1, 3),  # the audit's cache: batches do not divide a shard
    ([617] * 5, 600, 4, 2),  # groups of 4 shards and 1 shard
    ([617] * 5, 700, 1, 2),  # every group smaller than a batch: batches span groups
    ([37, 41, 5, 60, 23, 1, 40], 25, 2, 3),  # uneven shards
    ([37, 41, 5, 60, 23, 1, 40], 207, 3, 2),  # one batch = the whole cache
])
def test_cached_reader_serves_every_row_once_per_epoch(tmp_path, sizes, batch_tokens, in_memory, epochs):
    folder = _tagged_cache(tmp_path / "c", sizes)
    reader = CachedActivations(folder, batch_tokens=batch_tokens, shards_in_memory=in_memory, seed=7,
                               epochs=epochs, with_tokens=True)
    n = reader.n_tokens
    assert n == sum(sizes) == reader.describe()["rows"]
    batches = list(reader)
    assert all(b[RESID].shape == (batch_tokens, 3) for b in batches)  # every batch is whole
    served = [i for b in batches for i in _ids(b)]
    assert all(torch.equal(b["tokens"].long(), b[RESID][:, 0].long()) for b in batches)  # keys stay aligned
    assert len(served) == epochs * n // batch_tokens * batch_tokens  # only the last epoch's tail is not served
    for e in range(epochs):  # the stream holds each epoch's rows one after the other
        part = served[e * n:(e + 1) * n]
        assert len(set(part)) == len(part) and set(part) <= set(range(n))
        if len(part) == n:
            assert sorted(part) == list(range(n)), f"epoch {e} does not serve every row once"
    assert served[:n] != served[n:2 * n]  # epochs are shuffled differently


def test_cached_reader_mixes_the_shards_of_a_group(tmp_path):
    folder = _tagged_cache(tmp_path / "c", [100] * 8)
    first = next(iter(CachedActivations(folder, batch_tokens=64, shards_in_memory=4, seed=1)))
    assert len({i // 100 for i in _ids(first)}) == 4  # one batch draws from every shard in memory


def test_cached_exact_resume_with_a_batch_spanning_groups_and_epochs(tmp_path):
    folder = _tagged_cache(tmp_path / "c", [37, 41, 5, 60, 23, 1, 40])
    kw = dict(batch_tokens=25, shards_in_memory=2, seed=3, epochs=3)
    src = CachedActivations(folder, **kw)
    full, states = [], []
    for b in src:
        full.append(_ids(b))
        states.append(src.state_dict())
    assert set(states[0]) == {"epoch", "group", "row"}
    assert {s["epoch"] for s in states} == {0, 1, 2}
    for cut in range(1, len(full)):
        resumed = CachedActivations(folder, **kw)
        resumed.load_state_dict(json.loads(json.dumps(states[cut - 1])))
        assert [_ids(b) for b in resumed] == full[cut:], f"resume after batch {cut}"
    # a batch that ends at row < batch_tokens of its group began in a group before (rows carried over)
    carried = [cut for cut in range(1, len(full)) if states[cut]["row"] < 25]
    assert len(carried) > 5 and any(states[c]["epoch"] != states[c - 1]["epoch"] for c in carried)
    # a state saved before "row" existed counts whole batches of its group ("served")
    old = CachedActivations(folder, **kw)
    old.load_state_dict({"epoch": 0, "group": 0, "served": 2})
    new = CachedActivations(folder, **kw)
    new.load_state_dict({"epoch": 0, "group": 0, "row": 50})
    assert old.state_dict() == new.state_dict() and _ids(old.next_batch()) == _ids(new.next_batch())


def test_a_batch_larger_than_a_group_is_served_and_epochs_none_does_not_spin(tmp_path):
    folder = _tagged_cache(tmp_path / "c", [617] * 5)
    forever = CachedActivations(folder, batch_tokens=700, shards_in_memory=1, epochs=None)
    served = [i for _ in range(9) for i in _ids(forever.next_batch())]  # 6,300 rows: two epochs and a bit
    assert sorted(served[:3085]) == sorted(served[3085:6170]) == list(range(3085))


def test_a_cache_smaller_than_one_batch_is_refused_in_one_line(tmp_path):
    folder = _tagged_cache(tmp_path / "c", [617] * 5)
    with pytest.raises(InputError, match=r"batch_tokens=3086 is larger than the whole cache \(3085 rows\)") as e:
        CachedActivations(folder, batch_tokens=3086, epochs=None)
    assert "\n" not in str(e.value) and "smaller batch_tokens" in str(e.value)
    assert len(list(CachedActivations(folder, batch_tokens=3085, epochs=2))) == 2
