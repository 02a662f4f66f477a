"""Activation store (live and cached), the disk cache's robustness, and corpus loading."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from interp.cache import CachedActivations, cache_activations
from interp.data import DataWarning, load_texts, pack, token_mask
from interp.errors import CacheError, DataError, InputError, SiteError
from interp.store import ActivationStore

DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog on day {i}. " * (2 + i % 3) for i in range(40)]
SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_pack_windows_and_mask():
    tok = byte_tokenizer()
    wins = list(pack(DOCS[:3], tok, 16))
    assert all(w.shape == (16,) for w in wins)
    flat = torch.cat(wins).tolist()
    expected = []
    for d in DOCS[:3]:
        expected += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert flat == expected[: len(flat)]
    bos = list(pack(DOCS[:3], tok, 16, prepend_bos=True))
    assert all(int(w[0]) == tok.bos_token_id for w in bos)
    keep = token_mask(torch.stack(wins), tok)
    assert not keep[:, 0].any()
    assert not keep[torch.stack(wins) == tok.eos_token_id].any()


def test_pack_without_eos_warns_and_joins_by_the_given_separator():
    """A tokenizer with no EOS packs documents back to back, which is said once; an explicit separator is used."""
    class NoEos:  # the byte tokenizer without its EOS token
        eos_token_id, bos_token_id = None, byte_tokenizer().bos_token_id

        def __call__(self, text, **kw):
            return byte_tokenizer()(text, **kw)

    tok = NoEos()
    with pytest.warns(DataWarning, match="no EOS token"):
        joined = torch.cat(list(pack(DOCS[:3], tok, 16))).tolist()
    plain = [i for d in DOCS[:3] for i in tok(d, add_special_tokens=False)["input_ids"]]
    assert joined == plain[: len(joined)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        marked = torch.cat(list(pack(DOCS[:3], tok, 16, separator=tok.bos_token_id))).tolist()
        list(pack(DOCS[:3], tok, 16, separator=None))
    first = len(tok(DOCS[0], add_special_tokens=False)["input_ids"])
    assert marked[first] == tok.bos_token_id


def test_empty_and_bad_datasets():
    tok = byte_tokenizer()
    with pytest.raises(DataError, match="no text"):
        list(pack(["", ""], tok, 8))
    with pytest.raises(DataError, match="strings"):
        load_texts([1, 2])
    with pytest.raises(DataError):
        load_texts("/nonexistent/corpus-name-that-is-not-on-the-hub")


def test_local_files(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in DOCS[:5]))
    assert sorted(load_texts(tmp_path / "a.jsonl", text_column="body")) == sorted(DOCS[:5])
    with pytest.raises(DataError, match="column"):
        load_texts(tmp_path / "a.jsonl")
    (tmp_path / "b.txt").write_text("one line\nanother line\n")
    assert sorted(load_texts(tmp_path / "b.txt")) == ["another line", "one line"]


def test_live_store_batches_and_exact_resume():
    model, tok = tiny_model("llama"), byte_tokenizer()
    kw = dict(dataset=DOCS, context_size=32, batch_tokens=50, buffer_tokens=200, model_batch_size=4, seed=3)
    store = ActivationStore(model, tok, SITES, **kw)
    batches = list(store)
    assert len(batches) > 6
    assert all(set(b) == set(SITES) and b[SITES[0]].shape == (50, 32) for b in batches)
    again = ActivationStore(model, tok, SITES, **kw)
    it = iter(again)
    for _ in range(5):
        next(it)
    state = again.state_dict()
    resumed = ActivationStore(model, tok, SITES, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(batches) - 5
    for a, b in zip(rest, batches[5:]):
        assert torch.equal(a[SITES[1]], b[SITES[1]])
    # a state saved before the buffer index was named "group" resumes the same way
    legacy = {"buffer" if k == "group" else k: v for k, v in state.items()}
    older = ActivationStore(model, tok, SITES, **kw)
    older.load_state_dict(legacy)
    assert torch.equal(older.next_batch()[SITES[0]], batches[5][SITES[0]])
    assert store.d_model == 32 and store.d_models == {s: 32 for s in SITES}


def test_live_store_rows_are_real_activations():
    """Rows equal the capture of the window they came from (no padding, no position 0)."""
    model, tok = tiny_model("gpt2"), byte_tokenizer()
    store = ActivationStore(model, tok, ["blocks.1.hook_resid_post"], dataset=DOCS[:4], context_size=16,
                            batch_tokens=10, buffer_tokens=10_000, model_batch_size=2)
    rows = torch.cat([b["blocks.1.hook_resid_post"] for b in store])
    from interp import capture

    wins = torch.stack(list(pack(load_texts(DOCS[:4], shuffle_seed=0), tok, 16)))
    keep = token_mask(wins, tok)
    ref = capture(model, wins, "blocks.1.hook_resid_post", positions=keep)["blocks.1.hook_resid_post"]
    assert rows.shape[0] == (ref.shape[0] // 10) * 10
    # every yielded row is one of the reference rows
    d = torch.cdist(rows, ref)
    assert torch.all(d.min(dim=1).values < 1e-3)  # cdist rounds; distinct rows are > 0.1 apart


def test_live_store_errors():
    model, tok = tiny_model("llama"), byte_tokenizer()
    with pytest.raises(SiteError):
        ActivationStore(model, tok, ["blocks.9.hook_resid_post"], dataset=DOCS)
    with pytest.raises(InputError, match="no full window"):
        list(ActivationStore(model, tok, SITES, dataset=["tiny"], context_size=64))


def test_cache_roundtrip_shuffle_and_resume(tmp_path):
    model, tok = tiny_model("llama"), byte_tokenizer()
    out = cache_activations(model, tok, SITES, tmp_path / "c", 1000, dataset=DOCS, context_size=32,
                            shard_tokens=300, model_batch_size=4, progress=False).path
    shards = sorted(out.glob("shard-*.safetensors"))
    assert len(shards) >= 3
    reader = CachedActivations(out, batch_tokens=100, shards_in_memory=2, seed=1, with_tokens=True)
    assert reader.n_tokens >= 1000
    batches = list(reader)
    assert all(b[SITES[0]].shape == (100, 32) and b["tokens"].shape == (100,) for b in batches)
    # rows come from several shards within one batch (shuffled across shards)
    r2 = CachedActivations(out, batch_tokens=100, shards_in_memory=2, seed=1)
    it = iter(r2)
    next(it), next(it)
    r3 = CachedActivations(out, batch_tokens=100, shards_in_memory=2, seed=1)
    r3.load_state_dict(r2.state_dict())
    assert torch.equal(next(iter(r3))[SITES[0]], batches[2][SITES[0]])


def test_cache_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    model, tok = tiny_model("llama"), byte_tokenizer()
    kw = dict(dataset=DOCS, context_size=32, shard_tokens=200, model_batch_size=2, progress=False)
    cache_activations(model, tok, SITES, tmp_path / "full", 900, **kw)

    import interp.cache as cache_mod

    real_load = cache_mod.load_texts

    def killed_after_4_docs(*a, **k):
        for i, doc in enumerate(real_load(*a, **k)):
            if i == 4:
                raise KeyboardInterrupt("simulated kill")
            yield doc

    monkeypatch.setattr(cache_mod, "load_texts", killed_after_4_docs)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(model, tok, SITES, tmp_path / "part", 900, **kw)
    part = json.loads((tmp_path / "part" / "manifest.rank0.json").read_text())
    assert not part["complete"] and len(part["shards"]) >= 1
    monkeypatch.setattr(cache_mod, "load_texts", real_load)
    cache_activations(model, tok, SITES, tmp_path / "part", 900, **kw)
    a = CachedActivations(tmp_path / "full", batch_tokens=100)
    b = CachedActivations(tmp_path / "part", batch_tokens=100)
    for site in SITES:
        full_rows = torch.cat([a._load(s)[site] for s in a.shards])
        part_rows = torch.cat([b._load(s)[site] for s in b.shards])
        assert full_rows.shape == part_rows.shape
        torch.testing.assert_close(full_rows, part_rows, rtol=1e-5, atol=1e-5)


def test_truncated_shard_and_other_cache_damage(tmp_path):
    model, tok = tiny_model("llama"), byte_tokenizer()
    out = cache_activations(model, tok, SITES, tmp_path / "c", 400, dataset=DOCS, context_size=32,
                            shard_tokens=200, progress=False).path
    shard = sorted(out.glob("shard-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="truncated"):
        list(CachedActivations(out, batch_tokens=50))
    shard.write_bytes(b"\x00" * len(data))  # right size, garbage content
    with pytest.raises(CacheError, match="corrupt"):
        list(CachedActivations(out, batch_tokens=50))
    with pytest.raises(CacheError, match="not an activation cache"):
        CachedActivations(tmp_path)
    with pytest.raises(CacheError, match="other settings"):
        cache_activations(model, tok, SITES, out, 400, dataset=DOCS, context_size=16, progress=False)
    with pytest.raises(CacheError, match=r"'text_column': \('text', 'body'\)"):  # growing it from another column
        cache_activations(model, tok, SITES, out, 800, dataset=DOCS, context_size=32, text_column="body",
                          progress=False)
    with pytest.raises(CacheError, match="not in this cache"):
        CachedActivations(out, sites=["blocks.2.hook_resid_post"])


def test_cache_ranks_write_one_folder(tmp_path, monkeypatch):
    """Under torchrun each rank captures every world_size-th window into the same folder."""
    model, tok = tiny_model("llama"), byte_tokenizer()
    kw = dict(dataset=DOCS, context_size=32, shard_tokens=10_000, model_batch_size=3, progress=False)
    infos = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        infos.append(cache_activations(model, tok, ["blocks.1.hook_resid_post"], tmp_path / "c", 600, **kw))
    assert not infos[0].complete and "other ranks" in infos[0].summary()  # rank 1 has not written yet
    assert infos[1].complete and infos[1].rows >= 600
    reader = CachedActivations(tmp_path / "c", batch_tokens=10, with_tokens=True)
    assert {s["file"].split("-")[1] for s in reader.shards} == {"r0", "r1"}
    wins = list(pack(load_texts(DOCS, shuffle_seed=0), tok, 32))
    for rank in (0, 1):
        shard = next(s for s in reader.shards if s["file"].startswith(f"shard-r{rank}"))
        toks = reader._load(shard)["tokens"]
        mine = torch.stack(wins[rank::2][: len(toks) // 30 + 2])
        expected = mine[token_mask(mine, tok)].to(torch.int32)
        assert torch.equal(toks, expected[: len(toks)])


def test_cache_files_are_never_half_written(tmp_path, monkeypatch):
    """A crash inside save_file leaves no shard listed in the manifest and no shard under its final name."""
    model, tok = tiny_model("llama"), byte_tokenizer()
    import interp.cache as cache_mod

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        cache_activations(model, tok, SITES, tmp_path / "c", 400, dataset=DOCS, context_size=32,
                          shard_tokens=200, progress=False)
    assert not list((tmp_path / "c").glob("shard-*.safetensors"))
    assert not (tmp_path / "c" / "manifest.rank0.json").exists()
    with pytest.raises(CacheError, match="no finished shard"):
        CachedActivations(tmp_path / "c")
    assert sorted(os.listdir(tmp_path / "c")) == ["manifest.json"]  # the temporary file is gone too


def test_live_store_progress_bar(capsys):
    model, tok = tiny_model("llama"), byte_tokenizer()
    store = ActivationStore(model, tok, SITES[0], dataset=DOCS, context_size=32, batch_tokens=64,
                            model_batch_size=2, max_windows=6, progress=True)
    rows = sum(b[SITES[0]].shape[0] for b in store)
    err = capsys.readouterr().err
    assert rows > 0 and "capturing (epoch 0)" in err and "6/6" in err
    quiet = ActivationStore(model, tok, SITES[0], dataset=DOCS, context_size=32, batch_tokens=64,
                            model_batch_size=2, max_windows=6)
    assert sum(b[SITES[0]].shape[0] for b in quiet) == rows
    assert "capturing" not in capsys.readouterr().err


def _epoch_rows(store, epoch: int) -> list[tuple]:
    """Every row the live store's windows of `epoch` hold, captured the way the store captures them."""
    from interp.source import capture_rows

    chunks = capture_rows(store.model, store.tokenizer, store.sites, store._windows(epoch),
                          model_batch_size=store.model_batch_size, dtype=store.dtype)
    return [tuple(r.tolist()) for c, _ in chunks for r in c[store.sites[0]]]


@pytest.mark.parametrize("batch_tokens, buffer_tokens", [(100, 300), (100, 100), (64, 250), (37, 90)])
def test_live_store_serves_every_row_once_per_epoch(batch_tokens, buffer_tokens):
    """Buffers whose size the batch does not divide: their last rows begin a batch the next buffer ends."""
    from collections import Counter

    model, tok = tiny_model("llama"), byte_tokenizer()
    store = ActivationStore(model, tok, SITES[1], dataset=DOCS[:12], context_size=32, batch_tokens=batch_tokens,
                            buffer_tokens=buffer_tokens, model_batch_size=3, epochs=2, seed=1)
    batches = list(store)
    assert all(b[SITES[1]].shape == (batch_tokens, 32) for b in batches)
    served = [tuple(r.tolist()) for b in batches for r in b[SITES[1]]]
    ref0, ref1 = _epoch_rows(store, 0), _epoch_rows(store, 1)
    assert len(served) == (len(ref0) + len(ref1)) // batch_tokens * batch_tokens  # only the last tail is left
    assert Counter(served[:len(ref0)]) == Counter(ref0)  # epoch 0: every row once
    assert not Counter(served[len(ref0):]) - Counter(ref1)  # epoch 1 (cut at its end): no row twice


def test_live_store_exact_resume_with_rows_carried_across_buffers():
    model, tok = tiny_model("llama"), byte_tokenizer()
    kw = dict(dataset=DOCS[:10], context_size=32, batch_tokens=70, buffer_tokens=150, model_batch_size=3, seed=2,
              epochs=2)
    store = ActivationStore(model, tok, SITES, **kw)
    full, states = [], []
    for b in store:
        full.append(b[SITES[0]])
        states.append(store.state_dict())
    assert set(states[0]) == {"epoch", "group", "row", "window"}
    # cuts after which the next batch spans buffers (it ends at row < batch_tokens of a later buffer)
    carried = [c for c in range(1, len(full)) if states[c]["row"] < 70]
    across_epochs = [c for c in carried if states[c]["epoch"] != states[c - 1]["epoch"]]
    assert len(carried) > 3 and across_epochs
    for cut in (carried[0], carried[len(carried) // 2], across_epochs[0]):
        resumed = ActivationStore(model, tok, SITES, **kw)
        resumed.load_state_dict(json.loads(json.dumps(states[cut - 1])))
        rest = [b[SITES[0]] for b in resumed]
        assert len(rest) == len(full) - cut
        assert all(torch.equal(a, b) for a, b in zip(rest, full[cut:])), f"resume after batch {cut}"


def test_live_store_smaller_than_one_batch_is_refused_in_one_line():
    model, tok = tiny_model("llama"), byte_tokenizer()
    for epochs in (1, None):  # None used to spin forever, running the model over empty epochs
        store = ActivationStore(model, tok, SITES, dataset=DOCS[:2], context_size=32, batch_tokens=5000,
                                epochs=epochs)
        with pytest.raises(InputError, match=r"epoch 0 holds only \d+ rows, fewer than batch_tokens=5000") as e:
            store.next_batch()
        assert "\n" not in str(e.value) and "pass batch_tokens <=" in str(e.value)
