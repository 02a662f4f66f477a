"""A disk cache of activations: safetensors shards plus JSON manifests, resumable and multi-process.

Layout of a cache folder::

    manifest.json                  what was cached: model, sites, widths, context size, dtype, dataset
    manifest.rank{R}.json          shards written by rank R so far (rewritten atomically after each shard)
    shard-r{R}-{I:06d}.safetensors one tensor per site [n, d] (rows aligned) + "tokens" [n] (int32 ids)

Each shard is written to a temporary name and renamed, then listed in its rank's manifest, so a killed
run leaves no shard that a reader would trust. Re-running the same command resumes: every rank skips
the windows its listed shards already hold. Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) rank R
captures windows ``R, R + W, R + 2W, ...`` and writes its own shards into the same folder.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from interp.atomic import atomic_path
from interp.atomic import write_json as _write_json
from interp.capture import capture
from interp.data import load_texts, pack, token_mask
from interp.errors import CacheError, InputError
from interp.sites import resolve

FORMAT = "interp.activation-cache/1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"{path} is unreadable or not JSON ({e}); the cache folder is damaged. "
                         "Delete the folder and cache again.") from e


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def cache_activations(model: nn.Module, tokenizer, sites: str | Sequence[str], out_dir: str | os.PathLike,
                      n_tokens: int, *, dataset=None, context_size: int = 128, model_batch_size: int = 8,
                      shard_tokens: int = 65536, dtype: torch.dtype = torch.float32, model_name: str = "",
                      exclude_first: bool = True, exclude_special: bool = True, prepend_bos: bool = False,
                      text_column: str = "text", seed: int = 0, progress: bool = True) -> Path:
    """Capture about `n_tokens` rows (over all ranks) of `sites` into `out_dir`; resumes if interrupted."""
    sites = [sites] if isinstance(sites, str) else list(sites)
    for s in sites:
        resolve(model, s)
    if n_tokens < 1:
        raise InputError(f"n_tokens must be positive, got {n_tokens}")
    dtype_name = next((k for k, v in _DTYPES.items() if v == dtype), None)
    if dtype_name is None:
        raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = _rank_world()
    header = {"format": FORMAT, "model": model_name or getattr(getattr(model, "config", None), "_name_or_path", ""),
              "sites": sites, "context_size": context_size, "dtype": dtype_name, "n_tokens": n_tokens,
              "dataset": dataset if isinstance(dataset, (str, type(None))) else type(dataset).__name__,
              "exclude_first": exclude_first, "exclude_special": exclude_special, "prepend_bos": prepend_bos,
              "seed": seed, "world_size": world}
    mpath = out / "manifest.json"
    if mpath.exists():
        old = _read_json(mpath)
        diff = {k: (old.get(k), v) for k, v in header.items() if old.get(k) != v}
        if diff:
            raise CacheError(f"{out} already holds a cache made with other settings {diff} (old, new). "
                             "Use another output folder, or delete this one to start over.")
    else:
        _write_json(mpath, header)
    rpath = out / f"manifest.rank{rank}.json"
    mine = _read_json(rpath) if rpath.exists() else {"rank": rank, "shards": [], "windows": 0, "complete": False}
    target = -(-n_tokens // world)  # this rank's share
    done = sum(s["rows"] for s in mine["shards"])
    if mine["complete"] or done >= target:
        return out
    texts = load_texts(dataset, text_column=text_column, shuffle_seed=seed)
    windows = itertools.islice(pack(texts, tokenizer, context_size, prepend_bos=prepend_bos), rank, None, world)
    for _ in itertools.islice(windows, mine["windows"]):
        pass
    bar = tqdm(total=target, initial=done, unit="tok", unit_scale=True, desc=f"caching (rank {rank})",
               disable=not progress, smoothing=0.1)
    parts: dict[str, list[Tensor]] = {s: [] for s in sites + ["tokens"]}
    rows = 0
    windows_used = mine["windows"]
    exhausted = False
    while done < target and not exhausted:
        chunk = list(itertools.islice(windows, model_batch_size))
        exhausted = len(chunk) < model_batch_size
        if chunk:
            ids = torch.stack(chunk)
            keep = token_mask(ids, tokenizer, exclude_first=exclude_first, exclude_special=exclude_special)
            acts = capture(model, ids, sites, positions=keep, dtype=dtype)
            for s in sites:
                parts[s].append(acts[s])
            parts["tokens"].append(ids[keep].to(torch.int32))
            windows_used += len(chunk)
            rows += int(keep.sum())
        if rows and (rows >= shard_tokens or done + rows >= target or exhausted):
            shard = {k: torch.cat(v).contiguous() for k, v in parts.items()}
            name = f"shard-r{rank}-{len(mine['shards']):06d}.safetensors"
            with atomic_path(out / name) as tmp:
                save_file(shard, str(tmp), metadata={"format": FORMAT})
            mine["shards"].append({"file": name, "rows": rows, "bytes": (out / name).stat().st_size})
            mine["windows"] = windows_used
            done += rows
            bar.update(rows)
            mine["complete"] = done >= target or exhausted
            _write_json(rpath, mine)
            parts = {k: [] for k in parts}
            rows = 0
    bar.close()
    if done == 0:
        raise InputError("the dataset produced no tokens to cache: it is empty or shorter than one window "
                         f"of context_size={context_size} tokens")
    return out


class CachedActivations:
    """Read a cache folder back as shuffled batches ``{site: [batch_tokens, d]}`` (plus ``"tokens"``
    when `with_tokens`). Each epoch visits the shards in a new random order, `shards_in_memory` at a
    time, and shuffles their rows together."""

    def __init__(self, folder: str | os.PathLike, *, batch_tokens: int = 4096, seed: int = 0,
                 sites: Sequence[str] | None = None, shards_in_memory: int = 4, epochs: int | None = 1,
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu", with_tokens: bool = False):
        self.folder = Path(folder)
        if not (self.folder / "manifest.json").is_file():
            raise CacheError(f"{self.folder} is not an activation cache (no manifest.json). Write one with "
                             "interp.cache.cache_activations or `interp capture --out DIR`.")
        self.header = _read_json(self.folder / "manifest.json")
        if self.header.get("format") != FORMAT:
            raise CacheError(f"{self.folder}/manifest.json has format {self.header.get('format')!r}, expected {FORMAT!r}")
        self.shards = []
        for rp in sorted(self.folder.glob("manifest.rank*.json")):
            self.shards += _read_json(rp)["shards"]
        if not self.shards:
            raise CacheError(f"{self.folder} holds no finished shard yet (was the caching run interrupted "
                             "before its first shard?). Run the same caching command again to resume.")
        self.n_tokens = sum(s["rows"] for s in self.shards)
        self.sites = list(sites or self.header["sites"])
        unknown = set(self.sites) - set(self.header["sites"])
        if unknown:
            raise CacheError(f"sites {sorted(unknown)} are not in this cache; it holds {self.header['sites']}")
        if batch_tokens > self.n_tokens:
            raise InputError(f"batch_tokens={batch_tokens} is larger than the whole cache ({self.n_tokens} rows)")
        self.batch_tokens, self.seed, self.epochs = batch_tokens, seed, epochs
        self.shards_in_memory = max(1, shards_in_memory)
        self.dtype, self.device, self.with_tokens = dtype, torch.device(device), with_tokens
        self._pos = {"epoch": 0, "group": 0, "served": 0}


    @property
    def d_model(self) -> int:
        return self._load(self.shards[0])[self.sites[0]].shape[-1]

    def state_dict(self) -> dict[str, int]:
        return dict(self._pos)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._pos = {k: int(state[k]) for k in ("epoch", "group", "served")}

    def _load(self, shard: dict) -> dict[str, Tensor]:
        path = self.folder / shard["file"]
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
        keys = self.sites + (["tokens"] if self.with_tokens else [])
        bad = [k for k in keys if k not in data or data[k].shape[0] != shard["rows"]]
        if bad:
            raise CacheError(f"shard {path} lacks {bad} or has the wrong number of rows (expected {shard['rows']})")
        return {k: data[k] for k in keys}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        start = dict(self._pos)
        epoch = start["epoch"]
        while self.epochs is None or epoch < self.epochs:
            order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            groups = [order[i:i + self.shards_in_memory] for i in range(0, len(order), self.shards_in_memory)]
            for g, idx in enumerate(groups):
                if (epoch, g) < (start["epoch"], start["group"]):
                    continue
                loaded = [self._load(self.shards[i]) for i in idx.tolist()]
                data = {k: torch.cat([d[k] for d in loaded]) for k in loaded[0]}
                n = next(iter(data.values())).shape[0]
                perm = torch.randperm(n, generator=torch.Generator().manual_seed((self.seed * 7919 + epoch) * 104729 + g))
                skip = start["served"] if (epoch, g) == (start["epoch"], start["group"]) else 0
                for i, lo in enumerate(range(0, n - self.batch_tokens + 1, self.batch_tokens)):
                    if i < skip:
                        continue
                    self._pos = {"epoch": epoch, "group": g, "served": i + 1}
                    rows = perm[lo:lo + self.batch_tokens]
                    yield {k: (v[rows].to(self.device, self.dtype) if k != "tokens" and self.dtype else v[rows].to(self.device))
                           for k, v in data.items()}
            epoch += 1
            self._pos = {"epoch": epoch, "group": 0, "served": 0}

    def next_batch(self) -> dict[str, Tensor]:
        if getattr(self, "_it", None) is None:
            self._it = iter(self)
        return next(self._it)
