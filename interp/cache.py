"""A disk cache of activations: safetensors shards plus JSON manifests, resumable, growable, multi-process.

Layout of a cache folder::

    manifest.json                  what was cached: model (and its dtype), sites, widths, dtypes, context size,
                                   dataset (and its text column)
    manifest.rank{R}.json          shards written by rank R so far (rewritten atomically after each shard)
    shard-r{R}-{I:06d}.safetensors one tensor per site [n, d] (rows aligned) + "tokens" [n] (int32 ids)

Each shard is written to a temporary name and renamed, then listed in its rank's manifest, so a killed
run leaves no shard that a reader would trust. Re-running the same command resumes: every rank skips
the windows its listed shards already hold. Asking a finished cache for more rows (a larger
``n_tokens``, same settings otherwise) appends shards, continuing the window stream where it stopped,
so rows never repeat. Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) rank R captures windows
``R, R + W, R + 2W, ...`` and writes its own shards into the same folder.

Shards are filled by :func:`interp.source.capture_rows` and read back through
:class:`interp.source.ActivationSource`, the same code as the live :class:`interp.store.ActivationStore`.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from interp.atomic import atomic_path, save_file
from interp.atomic import write_json as _write_json
from interp.capture import site_widths
from interp.data import load_texts, pack
from interp.errors import CacheError, InputError
from interp.folders import folder_lock, inside, remove_temps
from interp.provenance import model_label
from interp.sites import resolve
from interp.source import (
    TOKENS,
    ActivationSource,
    capture_rows,
    dataset_name,
    take_rows,
)

__all__ = ["FORMAT", "CacheInfo", "CachedActivations", "cache_activations"]

FORMAT = "interp.activation-cache/1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GROWS = ("n_tokens", "widths", "dtypes")  # header keys that are not settings a re-run must match


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"{path} is unreadable or not JSON ({e}); the cache folder is damaged. "
                         "Delete the folder and cache again.") from e


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True, kw_only=True)
class CacheInfo:
    """What :func:`cache_activations` left in its folder. It is path-like (``os.fspath(info)`` is the
    folder), so it can be passed wherever a path is expected, e.g. to :class:`CachedActivations`."""

    path: Path
    """The cache folder."""
    rows: int
    """Rows the folder holds now, over the finished shards of every rank."""
    rows_added: int
    """Rows this call wrote (0: the cache already held what was asked)."""
    requested: int
    """The ``n_tokens`` asked for."""
    complete: bool
    """Every rank's share of `requested` is written, or its part of the dataset ran out."""
    exhausted: bool
    """The dataset ran out before `requested` rows: the cache is complete with fewer rows."""

    def __fspath__(self) -> str:
        return str(self.path)

    def summary(self) -> str:
        """One line for a person: what the folder holds and what this call did."""
        held = f"the cache at {self.path} {'already ' if not self.rows_added else ''}holds {self.rows} rows"
        if self.exhausted:
            held += f", all the dataset gives (asked for {self.requested})"
        else:
            held += f" (asked for {self.requested})"
        if not self.rows_added:
            return f"{held}: nothing to do"
        tail = "" if self.complete else "; other ranks are still writing theirs"
        return f"wrote {self.rows_added} rows; {held}{tail}"


def cache_activations(model: nn.Module, tokenizer, sites: str | Sequence[str], out_dir: str | os.PathLike,
                      n_tokens: int, *, dataset=None, context_size: int = 128, model_batch_size: int = 8,
                      shard_tokens: int = 65536, dtype: torch.dtype = torch.float32, model_name: str = "",
                      exclude_first: bool = True, exclude_special: bool = True, prepend_bos: bool = False,
                      text_column: str = "text", seed: int = 0, progress: bool = True) -> CacheInfo:
    """Capture about `n_tokens` rows (over all ranks) of `sites` into `out_dir`.

    Resumes an interrupted run, grows a finished cache when `n_tokens` is larger than what it holds,
    and returns at once, writing nothing, when it already holds `n_tokens` rows (see :class:`CacheInfo`).
    The dataset is opened (:func:`interp.data.load_texts`) before ``manifest.json`` is written, so one
    that cannot be read fails without leaving a header (or a new empty folder) behind.
    """
    sites = [sites] if isinstance(sites, str) else list(sites)
    for s in sites:
        resolve(model, s)
    if n_tokens < 1 or shard_tokens < 1 or model_batch_size < 1:
        raise InputError(f"need n_tokens, shard_tokens and model_batch_size >= 1; got {n_tokens}, "
                         f"{shard_tokens}, {model_batch_size}")
    dtype_name = next((k for k, v in _DTYPES.items() if v == dtype), None)
    if dtype_name is None:
        raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
    out = Path(out_dir)
    rank, world = _rank_world()
    header = {"format": FORMAT, "model": model_name or model_label(model),
              "sites": sites, "context_size": context_size, "dtype": dtype_name, "n_tokens": n_tokens,
              "dataset": dataset_name(dataset), "exclude_first": exclude_first, "exclude_special": exclude_special,
              "prepend_bos": prepend_bos, "seed": seed, "world_size": world,
              # a cache made before these keys were written has none: they are then not compared
              "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "text_column": text_column}
    mpath, rpath = out / "manifest.json", out / f"manifest.rank{rank}.json"
    _, mine = _read_manifests(out, mpath, rpath, header, rank)
    target = -(-n_tokens // world)  # this rank's share
    if mine.get("exhausted") or sum(s["rows"] for s in mine["shards"]) >= target:
        return _info(out, n_tokens, world, added=0)  # nothing to capture: touch no file
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(out, f".interp-lock.rank{rank}", f"the activation cache at {out} (rank {rank})",
                         error=CacheError):
            remove_temps(out, f"shard-r{rank}-*")
            remove_temps(out, f"manifest.rank{rank}.json")
            if rank == 0:
                remove_temps(out, "manifest.json")
            old, mine = _read_manifests(out, mpath, rpath, header, rank)  # again: another writer may have finished
            if mine.get("exhausted") or sum(s["rows"] for s in mine["shards"]) >= target:
                return _info(out, n_tokens, world, added=0)
            widths = site_widths(model, sites)
            if old is not None and old.get("widths", widths) != widths:
                raise CacheError(f"{out} holds sites of widths {old['widths']}, but this model gives {widths}: it "
                                 "was cached from another model. Use another output folder.")
            # open the corpus before the header is written: a dataset that cannot be read leaves no manifest
            # behind that would refuse the corrected command as "other settings"
            texts = load_texts(dataset, text_column=text_column, shuffle_seed=seed)
            new = {**(old or {}), **header, "n_tokens": max(n_tokens, (old or {}).get("n_tokens", 0)),
                   "widths": widths, "dtypes": {**{s: dtype_name for s in sites}, TOKENS: "int32"}}
            if new != old and rank == 0:  # rank 0 owns the header; the other ranks only check it
                _write_json(mpath, new)
            added = _capture(model, tokenizer, sites, out, rank, world, mine, rpath, target, texts=texts,
                             context_size=context_size, model_batch_size=model_batch_size, shard_tokens=shard_tokens,
                             dtype=dtype, exclude_first=exclude_first, exclude_special=exclude_special,
                             prepend_bos=prepend_bos, progress=progress)
    except BaseException:
        if created:  # a call that failed before writing anything leaves no empty folder behind
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    return _info(out, n_tokens, world, added=added)


def _read_manifests(out: Path, mpath: Path, rpath: Path, header: dict, rank: int) -> tuple[dict | None, dict]:
    """The folder's header (None when new), checked against this call's settings, and this rank's manifest."""
    old = _read_json(mpath) if mpath.exists() else None
    if old is not None:
        if old.get("format") != FORMAT:
            raise CacheError(f"{mpath} has format {old.get('format')!r}, expected {FORMAT!r}: it is not an "
                             "activation cache. Use another output folder.")
        diff = {k: (old[k], v) for k, v in header.items() if k in old and k not in _GROWS and old[k] != v}
        if diff:
            raise CacheError(f"{out} already holds a cache made with other settings {diff} (old, new). "
                             "Use another output folder, or delete this one to start over.")
    mine = _read_json(rpath) if rpath.exists() else {"rank": rank, "shards": [], "windows": 0, "complete": False}
    return old, mine


def _capture(model, tokenizer, sites, out: Path, rank: int, world: int, mine: dict, rpath: Path, target: int, *,
             texts, context_size, model_batch_size, shard_tokens, dtype, exclude_first, exclude_special,
             prepend_bos, progress) -> int:
    """Capture this rank's windows of the documents `texts` into shards until it holds `target` rows (or the
    data ends); returns the rows added. Each shard is renamed into place, then listed in the rank's manifest."""
    done = sum(s["rows"] for s in mine["shards"])
    windows = itertools.islice(pack(texts, tokenizer, context_size, prepend_bos=prepend_bos), rank, None, world)
    chunks = capture_rows(model, tokenizer, sites, itertools.islice(windows, mine["windows"], None),
                          model_batch_size=model_batch_size, dtype=dtype, exclude_first=exclude_first,
                          exclude_special=exclude_special, with_tokens=True)
    added = 0
    with tqdm(total=target, initial=done, unit="tok", unit_scale=True, desc=f"caching (rank {rank})",
              disable=not progress, smoothing=0.1) as bar:
        while done < target and not mine.get("exhausted"):
            limit = min(shard_tokens, target - done)
            shard, used = take_rows(chunks, limit)
            rows = next(iter(shard.values())).shape[0] if shard else 0
            if rows == 0 and done == 0:
                raise InputError("the dataset produced no tokens to cache: it is empty or shorter than one "
                                 f"window of context_size={context_size} tokens")
            if rows:
                name = f"shard-r{rank}-{len(mine['shards']):06d}.safetensors"
                with atomic_path(out / name) as tmp:
                    save_file({k: v.contiguous() for k, v in shard.items()}, str(tmp), metadata={"format": FORMAT})
                mine["shards"].append({"file": name, "rows": rows, "bytes": (out / name).stat().st_size})
            done, added = done + rows, added + rows
            bar.update(rows)
            mine["windows"] += used
            mine["exhausted"] = rows < limit
            mine["complete"] = done >= target or mine["exhausted"]
            _write_json(rpath, mine)
    return added


def _info(out: Path, n_tokens: int, world: int, *, added: int) -> CacheInfo:
    """Sum up every rank's manifest in `out` after a call that asked for `n_tokens` rows."""
    ranks = [_read_json(p) for p in sorted(out.glob("manifest.rank*.json"))]
    held = {m["rank"]: sum(s["rows"] for s in m["shards"]) for m in ranks}
    share = -(-n_tokens // world)
    finished = [m for m in ranks if m.get("exhausted") or held[m["rank"]] >= share]
    return CacheInfo(path=out, rows=sum(held.values()), rows_added=added, requested=n_tokens,
                     complete=len(finished) >= world, exhausted=any(m.get("exhausted") for m in ranks))


def _shard_entries(folder: Path, rp: Path) -> list[dict]:
    """The shards a rank manifest lists, each a file inside `folder` with integer rows and bytes."""
    shards = _read_json(rp).get("shards")
    if not isinstance(shards, list):
        raise CacheError(f"{rp} lists no 'shards'; the cache folder is damaged. Delete the folder and cache again.")
    for s in shards:
        if not isinstance(s, dict) or not all(isinstance(s.get(k), int) for k in ("rows", "bytes")):
            raise CacheError(f"{rp}: shard entry {s!r} needs 'file', 'rows' and 'bytes'; the cache folder is damaged")
        inside(folder, s.get("file"), str(rp), error=CacheError)
    return shards


class CachedActivations(ActivationSource):
    """Read a cache folder back as shuffled batches ``{site: [batch_tokens, d]}`` (plus ``"tokens"``
    when `with_tokens`). Each epoch visits the shards in a new random order, `shards_in_memory` at a
    time, and shuffles their rows together. Every row is served once per epoch: a group's rows that do
    not fill a whole batch begin a batch that the next group (or the next epoch's first group) ends, so
    every batch holds `batch_tokens` rows and only the last epoch's final partial batch is not served.

    The state (``state_dict()``) is ``{"epoch", "group", "row"}``: the shard group where the next batch
    begins and the rows of it (in its shuffled order) already served.
    """

    def __init__(self, folder: str | os.PathLike, *, batch_tokens: int = 4096, seed: int = 0,
                 sites: Sequence[str] | None = None, shards_in_memory: int = 4, epochs: int | None = 1,
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu", with_tokens: bool = False):
        self.folder = Path(folder)
        if not (self.folder / "manifest.json").is_file():
            raise CacheError(f"{self.folder} is not an activation cache (no manifest.json). Write one with "
                             "interp.cache.cache_activations or `interp capture --out DIR`.")
        self.header = _read_json(self.folder / "manifest.json")
        if self.header.get("format") != FORMAT:
            raise CacheError(f"{self.folder}/manifest.json has format {self.header.get('format')!r}, "
                             f"expected {FORMAT!r}")
        self.shards = []
        for rp in sorted(self.folder.glob("manifest.rank*.json")):
            self.shards += _shard_entries(self.folder, rp)
        if not self.shards:
            raise CacheError(f"{self.folder} holds no finished shard yet (was the caching run interrupted "
                             "before its first shard?). Run the same caching command again to resume.")
        unknown = sorted(set(sites or []) - set(self.header["sites"]))
        if unknown:
            raise CacheError(f"sites {unknown} are not in this cache; it holds {self.header['sites']}")
        super().__init__(sites=list(sites or self.header["sites"]), batch_tokens=batch_tokens, seed=seed,
                         epochs=epochs, dtype=dtype, device=device)
        self.n_tokens = sum(s["rows"] for s in self.shards)
        if batch_tokens > self.n_tokens:
            raise InputError(f"batch_tokens={batch_tokens} is larger than the whole cache ({self.n_tokens} rows); "
                             "pass a smaller batch_tokens or cache more rows")
        self.shards_in_memory = max(1, shards_in_memory)
        self.with_tokens = with_tokens

    @property
    def d_models(self) -> dict[str, int]:
        """Width of each site, from the manifest (or, for caches that predate it, the first shard's header)."""
        widths = self.header.get("widths") or self._shard_widths(self.shards[0])
        return {s: int(widths[s]) for s in self.sites}

    def _shard_widths(self, shard: dict) -> dict[str, int]:
        path = inside(self.folder, shard["file"], "manifest", error=CacheError)
        try:
            with safe_open(str(path), framework="pt") as f:  # reads the header only, no tensor
                return {s: f.get_slice(s).get_shape()[-1] for s in self.sites}
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CacheError(f"shard {path} is missing, corrupt or lacks sites {self.sites} ({e}); "
                             "cache again into a fresh folder") from e

    def describe(self) -> dict[str, Any]:
        """What this cache holds, JSON-ready (``rows``: every row of every finished shard)."""
        h = self.header
        return {"source": "cache", "path": str(self.folder), "model": h.get("model", ""), "sites": list(self.sites),
                "widths": self.d_models, "dataset": h.get("dataset"), "context_size": h.get("context_size"),
                "rows": self.n_tokens, "dtype": h.get("dtype"), "exclude_first": h.get("exclude_first"),
                "exclude_special": h.get("exclude_special"), "prepend_bos": h.get("prepend_bos"),
                "seed": self.seed}

    def _load(self, shard: dict) -> dict[str, Tensor]:
        path = inside(self.folder, shard["file"], "manifest", error=CacheError)  # checked again: links may change
        try:
            size = path.stat().st_size
        except OSError as e:
            raise CacheError(f"shard {path} listed in the manifest is missing ({e})") from e
        if size != shard["bytes"]:
            raise CacheError(f"shard {path} has {size} bytes but the manifest recorded {shard['bytes']}: it is "
                             "truncated or was overwritten. Delete it and its manifest entry, or cache again.")
        try:
            data = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CacheError(f"shard {path} is corrupt ({e}); cache again into a fresh folder") from e
        keys = self.sites + ([TOKENS] if self.with_tokens else [])
        bad = [k for k in keys if k not in data or data[k].shape[0] != shard["rows"]]
        if bad:
            raise CacheError(f"shard {path} lacks {bad} or has the wrong number of rows (expected {shard['rows']})")
        return {k: data[k] for k in keys}

    def _groups(self, epoch: int, start: dict[str, int]) -> Iterator[tuple[dict[str, int], dict[str, Tensor]]]:
        """Shard groups of `epoch`: a random order of the shards, cut into `shards_in_memory` at a time."""
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        groups = [order[i:i + self.shards_in_memory].tolist() for i in range(0, len(order), self.shards_in_memory)]
        for idx in groups[start["group"]:]:
            loaded = [self._load(self.shards[i]) for i in idx]
            yield {}, {k: torch.cat([d[k] for d in loaded]) for k in loaded[0]}
