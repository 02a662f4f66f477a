"""The dashboard data pass: one streaming pass over a corpus, resumable, bounded in memory.

:func:`collect` packs the corpus into windows (as ``interp capture`` does: same corpus, same
shuffle seed, same windows), captures the site, runs the units' encoder on the positions an
activation store keeps (not position 0, no special tokens) and feeds a
:class:`~interp.dashboard.stats.Tracker` (only the kept positions' codes: an encoder that returns a
sparse COO tensor, as ``saes`` checkpoints' ``encoder(sparse=True)`` does, never builds dense codes).
When ``save_seconds`` have passed since the last save, the tracker's state is written after the batch
to ``state.safetensors`` + ``state.json`` (atomically, ``state.json`` last, under the folder's lock);
calling :func:`collect` again with the same settings resumes after the last saved batch and gives
the same data as an uninterrupted run. At the end it writes the data files and removes the state:

``data.safetensors``: the tracker's tensors (``top_val [U, k]`` (largest first; -inf: empty slot),
``top_win``, ``top_pos``, ``top_tok [U, k, L]`` (token ids, -1 outside the window), ``top_act [U, k, L]``,
``hist [U, n_bins]``,
``count [U]``, ``sum [U]``, ``smp_* [U * n_bins, samples_per_bin, ...]``), plus, when the units have
directions, ``logit_up_ids``/``logit_up_values``/``logit_down_ids``/``logit_down_values``
``[U, n_logits]`` and ``neighbor_ids``/``neighbor_cos`` ``[U, n_neighbors]``.

``data.json``: ``format``, ``model``, ``site``, ``kind``, ``names``, ``ids`` (each unit's number in
its source), ``settings`` (the :class:`DashboardConfig`), ``n_tokens`` (positions read),
``n_windows``, ``bin_edges`` (every histogram bin's edges; null: unbounded), ``vocab`` (``{token id: text}`` of every
token the pages show), ``extra`` (what the caller adds, e.g. class means of a subspace).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from interp.atomic import atomic_path, save_file, write_json
from interp.capture import capture
from interp.dashboard.stats import Tracker
from interp.dashboard.units import Units, logit_effect, nearest_units
from interp.data import DEFAULT_CONTEXT_SIZE, load_texts, pack, token_mask
from interp.errors import InputError
from interp.folders import folder_lock, remove_temps
from interp.provenance import model_label
from interp.sites import resolve

__all__ = ["FORMAT", "DashboardConfig", "collect"]

FORMAT = "interp.dashboard/1"


@dataclass(frozen=True, kw_only=True)
class DashboardConfig:
    """Settings of the data pass (all but ``save_seconds`` must match to resume)."""

    tokens: int = 100_000
    """Token positions to read (the pass stops at the first batch that reaches it)."""
    dataset: str | None = None
    """Text to read: a local file or folder, or a Hugging Face dataset name (omit: the offline corpus)."""
    context_size: int = DEFAULT_CONTEXT_SIZE
    """Tokens per window."""
    batch_windows: int = 8
    """Windows per forward pass."""
    seed: int = 0
    """Shuffle seed of the corpus (as 'interp capture --seed') and seed of the bin samples."""
    top_k: int = 16
    """Top-activating contexts kept per unit."""
    left: int = 12
    """Tokens shown before the activating token."""
    right: int = 4
    """Tokens shown after the activating token."""
    n_bins: int = 30
    """Log-spaced histogram bins per sign."""
    bin_lo: float = 1e-3
    """Upper edge of the first histogram bin."""
    bin_hi: float = 1e3
    """Lower edge of the last histogram bin."""
    samples_per_bin: int = 1
    """Contexts sampled per histogram bin (shown grouped into quantiles)."""
    n_quantiles: int = 5
    """Quantile groups of the histogram bins on the pages."""
    n_logits: int = 10
    """Top promoted and suppressed tokens per unit."""
    n_neighbors: int = 8
    """Nearest units by cosine of their directions."""
    save_seconds: float = 60.0
    """Seconds between two saved states (resume points; an interrupted pass redoes at most this much
    work); 0: after every batch. It does not change the data."""

    def __post_init__(self):
        for name in ("tokens", "context_size", "batch_windows", "top_k", "n_quantiles"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.save_seconds < math.inf:
            raise InputError(f"save_seconds must be a finite number >= 0, got {self.save_seconds}")
        for name in ("left", "right", "samples_per_bin", "n_logits", "n_neighbors"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_bins < 2 or not 0 < self.bin_lo < self.bin_hi:
            raise InputError(f"need n_bins >= 2 and 0 < bin_lo < bin_hi; got n_bins={self.n_bins}, "
                             f"bin_lo={self.bin_lo}, bin_hi={self.bin_hi}")


def _settings(cfg: DashboardConfig, units: Units, site: str, model_name: str) -> dict[str, Any]:
    return {"format": FORMAT, "model": model_name, "site": site, "kind": units.kind, "names": list(units.names),
            "ids": units.unit_ids(), "signed": units.signed, "settings": dataclasses.asdict(cfg),
            "directions_sha256": _fingerprint(units)}


def _fingerprint(units: Units) -> str | None:
    """A digest of the units' write directions (an SAE's decoder rows, a subspace's basis): two SAEs with the same
    latent names are told apart, so a folder made from one is never resumed or reused for the other."""
    if units.directions is None:
        return None
    d = units.directions.detach().float().cpu().contiguous()
    return hashlib.sha256(d.numpy().tobytes()).hexdigest()


_LATER_KEYS = ("directions_sha256",)
"""Settings that folders written before they existed do not record: not compared there."""


def _tracker(cfg: DashboardConfig, units: Units, device) -> Tracker:
    return Tracker(units.n_units, top_k=cfg.top_k, left=cfg.left, right=cfg.right, n_bins=cfg.n_bins,
                   bin_range=(cfg.bin_lo, cfg.bin_hi), samples_per_bin=cfg.samples_per_bin, signed=units.signed,
                   seed=cfg.seed, device=device)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is unreadable or not JSON ({e}); delete the folder and run again") from e


_CADENCE = ("save_seconds", "save_every")
"""Settings of how often the state is saved (``save_every``: batches, in folders written before
``save_seconds``): they do not change the data, so they need not match."""


def _comparable(d: dict) -> dict:
    settings = d.get("settings")
    if not isinstance(settings, dict):
        return d
    return {**d, "settings": {k: v for k, v in settings.items() if k not in _CADENCE}}


def _check_same(path: Path, old: dict, new: dict) -> None:
    old, new = _comparable(old), _comparable(new)
    diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v and not (k in _LATER_KEYS and k not in old)}
    if diff:
        raise InputError(f"{path.parent} holds a dashboard made with other settings {diff} (old, new); use another "
                         "--out folder, or delete this one to start over")


def collect(model: nn.Module, tokenizer, site: str, units: Units, out: str | os.PathLike,
            config: DashboardConfig | None = None, *, model_name: str = "", device: str | torch.device | None = None,
            extra: dict[str, Any] | None = None, progress: bool = True,
            timings: dict[str, float] | None = None) -> Path:
    """Run the data pass of `units` at `site` and write ``data.safetensors`` + ``data.json`` into `out`.

    Resumes from a saved state with the same settings; returns at once when `out` already holds the
    finished data of the same settings. Returns `out`. With a `timings` dict, adds the seconds spent in
    each phase to it: ``read`` (windows and their kept positions), ``capture`` (the forward passes),
    ``encode`` (the units' encoder), ``track`` (:meth:`Tracker.update_rows`), ``save`` (resume states),
    ``logits`` (:func:`logit_effect`), ``neighbors`` (:func:`nearest_units`), ``write`` (ordering, token
    texts, data files); on CUDA each phase synchronizes the device.
    """
    cfg = config or DashboardConfig()
    resolve(model, site)
    out = Path(out)
    model_name = model_name or model_label(model)
    want = _settings(cfg, units, site, model_name)
    if (out / "data.json").is_file():
        done = _read_json(out / "data.json")
        _check_same(out / "data.json", {k: done[k] for k in want if k in done}, want)
        return out
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    with folder_lock(out, ".interp-lock", f"the dashboard folder {out}"):
        remove_temps(out)
        tr = _tracker(cfg, units, dev)
        windows_done = 0
        if (out / "state.json").is_file():
            st = _read_json(out / "state.json")
            _check_same(out / "state.json", {k: st[k] for k in want if k in st}, want)
            windows_done = _load_state(out, tr, st)
        clock = _Clock(timings, dev)
        windows = _run(model, tokenizer, site, units, tr, cfg, out, want, windows_done, dev, progress, clock)
        _finish(model, tokenizer, units, tr, cfg, out, want, windows, extra or {}, clock)
        (out / "state.json").unlink(missing_ok=True)
        (out / "state.safetensors").unlink(missing_ok=True)
    return out


def _run(model, tokenizer, site, units: Units, tr: Tracker, cfg: DashboardConfig, out: Path, want: dict,
         windows_done: int, dev, progress: bool, clock: _Clock) -> int:
    texts = load_texts(cfg.dataset, shuffle_seed=cfg.seed)
    stream = itertools.islice(pack(texts, tokenizer, cfg.context_size), windows_done, None)
    last_save = time.monotonic()
    with tqdm(total=cfg.tokens, initial=tr.n_tokens, unit="tok", unit_scale=True, desc="dashboard",
              disable=not progress, smoothing=0.1) as bar:
        while tr.n_tokens < cfg.tokens:
            with clock("read"):
                chunk = list(itertools.islice(stream, cfg.batch_windows))
                if not chunk:
                    break
                ids = torch.stack(chunk)
                keep = token_mask(ids, tokenizer)
            with clock("capture"):
                acts = capture(model, ids, [site], dtype=torch.float32, device=dev)[site]
            with clock("encode"):
                x = acts[keep.to(dev)]  # the kept positions only, in order
                rows = units.encode(x)
            if tuple(rows.shape) != (x.shape[0], units.n_units):
                raise InputError(f"the units' encoder returned shape {tuple(rows.shape)} for {x.shape[0]} rows; "
                                 f"expected [{x.shape[0]}, n_units={units.n_units}] (one column per unit name)")
            before = tr.n_tokens
            with clock("track"):
                tr.update_rows(ids, keep, rows, windows_done)
            windows_done += len(chunk)
            bar.update(tr.n_tokens - before)
            if tr.n_tokens < cfg.tokens and time.monotonic() - last_save >= cfg.save_seconds:
                with clock("save"):
                    _save_state(out, tr, want, windows_done)
                last_save = time.monotonic()
    if tr.n_tokens == 0:
        raise InputError(f"the dataset gave no window of context_size={cfg.context_size} tokens; give a longer "
                         "dataset or a smaller --context-size")
    return windows_done


class _Clock:
    """``with clock("phase"):`` adds the phase's seconds to ``timings[phase]`` (nothing when timings is None)."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device):
        self.timings = timings
        self.cuda = device.type == "cuda"

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.timings is None:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t0


def _save_state(out: Path, tr: Tracker, want: dict, windows: int) -> None:
    # the tensors carry their own position, so a crash between the two writes cannot pair them with an older one
    position = {"windows": windows, "batches": tr.batches, "n_tokens": tr.n_tokens}
    with atomic_path(out / "state.safetensors") as tmp:
        save_file(tr.state_dict(), str(tmp), metadata={k: str(v) for k, v in position.items()})
    write_json(out / "state.json", {**want, **position})


def _load_state(out: Path, tr: Tracker, st: dict) -> int:
    """Load the saved tracker; returns the windows it has read. The position is the tensors' own (written with
    them); a state file of an older version without it must agree with ``state.json``, else it is refused."""
    path = out / "state.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tr.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    if "windows" in meta:
        if int(meta["n_tokens"]) != tr.n_tokens or int(meta["batches"]) != tr.batches:
            raise InputError(f"{path} does not match its own position ({meta}); delete the folder and run again")
        return int(meta["windows"])
    if int(st.get("n_tokens", -1)) != tr.n_tokens or int(st.get("batches", -1)) != tr.batches:
        raise InputError(f"{path} holds {tr.n_tokens} tokens in {tr.batches} batches but {out / 'state.json'} says "
                         f"{st.get('n_tokens')} in {st.get('batches')} (a save was interrupted between the two); "
                         "delete the folder and run again")
    return int(st["windows"])


def _decode(tokenizer, ids: list[Tensor]) -> dict[str, str]:
    """The text of every token id (>= 0) in `ids`."""
    flat = torch.cat([t.flatten().long().cpu() for t in ids])
    flat = flat[flat >= 0]
    seen = torch.bincount(flat).nonzero().flatten().tolist() if flat.numel() else []  # sorted, each once
    return {str(i): tokenizer.decode([i]) for i in seen}


def _finish(model, tokenizer, units: Units, tr: Tracker, cfg: DashboardConfig, out: Path, want: dict,
            windows: int, extra: dict, clock: _Clock) -> None:
    with clock("write"):
        tensors = tr.state_dict(ordered=True)
        shown = [tensors["top_tok"], tensors["smp_tok"]]
    if units.directions is not None:
        if cfg.n_logits and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
            with clock("logits"):
                up_i, up_v, dn_i, dn_v = logit_effect(model, units.directions, cfg.n_logits)
            tensors.update(logit_up_ids=up_i, logit_up_values=up_v, logit_down_ids=dn_i, logit_down_values=dn_v)
            shown += [up_i, dn_i]
        if cfg.n_neighbors and units.n_units > 1:
            with clock("neighbors"):
                n_i, n_c = nearest_units(units.directions, cfg.n_neighbors)
            tensors.update(neighbor_ids=n_i, neighbor_cos=n_c)
    with clock("write"):
        with atomic_path(out / "data.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        edges = [e if math.isfinite(e) else None for e in tr.edges.tolist()]
        write_json(out / "data.json", {**want, "n_tokens": tr.n_tokens, "n_windows": windows, "bin_edges": edges,
                                       "vocab": _decode(tokenizer, shown), "extra": extra})
