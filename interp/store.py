"""Activation stores: shuffled ``[batch_tokens, d_model]`` batches for SAE training and probing.

Two sources, one interface (iterate dicts ``{site: Float[Tensor, "batch_tokens d"]}`` whose rows are
aligned across sites; ``state_dict()``/``load_state_dict()`` for exact resumption):

* :class:`ActivationStore` runs the model live: windows of text -> capture -> a shuffle buffer of
  ``buffer_tokens`` rows -> batches. Memory is bounded by the buffer whatever the dataset size.
* :class:`CachedActivations` reads a disk cache written by :func:`interp.cache.cache_activations`,
  shuffling across shards, holding ``shards_in_memory`` shards at a time.

Which positions feed the store: position 0 of every window is excluded by default (it is an attention
sink with outlier norms on models trained without BOS, such as SmolLM2), and so are special tokens
(the EOS separators between documents). Windows are packed documents, so there is no padding.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from interp.cache import CachedActivations, cache_activations
from interp.capture import capture
from interp.data import load_texts, pack, token_mask
from interp.errors import InputError
from interp.sites import resolve


__all__ = ["ActivationStore", "CachedActivations", "cache_activations"]


def _generator(*keys: int) -> torch.Generator:
    g = torch.Generator()
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return g.manual_seed(seed)


class ActivationStore:
    """Live activations from `model` over a text corpus.

    Args:
        model, tokenizer: from :func:`interp.load_model` or any HF pair.
        sites: site names (see :mod:`interp.sites`), captured from the same forward pass.
        dataset: anything :func:`interp.data.load_texts` takes (None: the offline default corpus).
        context_size: tokens per window.
        batch_tokens: rows per yielded batch.
        buffer_tokens: rows held and shuffled together (default ``32 * batch_tokens``).
        model_batch_size: windows per forward pass.
        epochs: passes over the dataset (None: forever).
        dtype, device: of the yielded tensors.
        exclude_first, exclude_special, prepend_bos: which positions feed the store (see module doc).
        max_windows: stop after this many windows (useful for small runs).
        progress: show a progress bar of the windows captured (out of ``max_windows`` when set).
    """

    def __init__(self, model: nn.Module, tokenizer, sites: str | Sequence[str], *, dataset=None,
                 context_size: int = 128, batch_tokens: int = 4096, buffer_tokens: int | None = None,
                 model_batch_size: int = 8, epochs: int | None = 1, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 exclude_first: bool = True, exclude_special: bool = True, prepend_bos: bool = False,
                 text_column: str = "text", max_windows: int | None = None, progress: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.sites = [sites] if isinstance(sites, str) else list(sites)
        if not self.sites:
            raise InputError("sites is empty: name at least one site, e.g. 'blocks.6.hook_resid_post'")
        for s in self.sites:
            resolve(model, s)  # fail now, not after the first forward pass
        if batch_tokens < 1 or context_size < 2 or model_batch_size < 1:
            raise InputError(f"need batch_tokens >= 1, context_size >= 2, model_batch_size >= 1; got "
                             f"{batch_tokens}, {context_size}, {model_batch_size}")
        self.dataset, self.text_column = dataset, text_column
        self.context_size, self.batch_tokens = context_size, batch_tokens
        self.buffer_tokens = max(buffer_tokens or 32 * batch_tokens, batch_tokens)
        self.model_batch_size, self.epochs, self.seed = model_batch_size, epochs, seed
        self.dtype, self.device = dtype, torch.device(device)
        self.exclude_first, self.exclude_special, self.prepend_bos = exclude_first, exclude_special, prepend_bos
        self.max_windows, self.progress = max_windows, progress
        self._pos = {"epoch": 0, "window": 0, "buffer": 0, "served": 0}
        self._d_model: dict[str, int] = {}

    @property
    def d_model(self) -> int:
        """Width of the first site (see :attr:`d_models` for each)."""
        return self.d_models[self.sites[0]]

    @property
    def d_models(self) -> dict[str, int]:
        if not self._d_model:
            ids = torch.full((1, 4), self.tokenizer.eos_token_id or 0, dtype=torch.long)
            acts = capture(self.model, ids, self.sites)
            self._d_model = {k: v.shape[-1] for k, v in acts.items()}
        return self._d_model

    def state_dict(self) -> dict[str, int]:
        """Position in the data: enough to resume exactly where the last yielded batch left off."""
        return dict(self._pos)

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = {"epoch", "window", "buffer", "served"} - set(state)
        if missing:
            raise InputError(f"store state lacks {sorted(missing)}; expected a dict from state_dict()")
        self._pos = {k: int(state[k]) for k in ("epoch", "window", "buffer", "served")}

    def _windows(self, epoch: int) -> Iterator[Tensor]:
        texts = load_texts(self.dataset, text_column=self.text_column, shuffle_seed=self.seed + epoch)
        windows = pack(texts, self.tokenizer, self.context_size, prepend_bos=self.prepend_bos)
        return itertools.islice(windows, self.max_windows) if self.max_windows else windows

    def _fill(self, windows: Iterator[Tensor]) -> tuple[dict[str, Tensor], int]:
        """Capture windows until the buffer holds `buffer_tokens` rows; returns rows and windows used."""
        parts: dict[str, list[Tensor]] = {s: [] for s in self.sites}
        rows = used = 0
        while rows < self.buffer_tokens:
            chunk = list(itertools.islice(windows, self.model_batch_size))
            if not chunk:
                break
            used += len(chunk)
            ids = torch.stack(chunk)
            keep = token_mask(ids, self.tokenizer, exclude_first=self.exclude_first,
                              exclude_special=self.exclude_special)
            acts = capture(self.model, ids, self.sites, positions=keep, dtype=self.dtype)
            for s in self.sites:
                parts[s].append(acts[s])
            rows += int(keep.sum())
        if rows == 0:
            return {}, used
        return {s: torch.cat(v) for s, v in parts.items()}, used

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        resume = dict(self._pos)
        epoch = resume["epoch"]
        while self.epochs is None or epoch < self.epochs:
            windows = self._windows(epoch)
            start = resume["window"] if epoch == resume["epoch"] else 0
            for _ in itertools.islice(windows, start):
                pass  # skip what earlier buffers consumed (tokenizing only, no forward pass)
            window, buffer = start, resume["buffer"] if epoch == resume["epoch"] else 0
            produced = False
            bar = tqdm(total=self.max_windows, initial=start, unit="win", desc=f"capturing (epoch {epoch})",
                       disable=not self.progress, smoothing=0.1)
            while True:
                buf, used = self._fill(windows)
                bar.update(used)
                if not buf:
                    break
                produced = True
                n = next(iter(buf.values())).shape[0]
                perm = torch.randperm(n, generator=_generator(self.seed, epoch, buffer))
                skip = resume["served"] if (epoch, buffer) == (resume["epoch"], resume["buffer"]) else 0
                for i, lo in enumerate(range(0, n - self.batch_tokens + 1, self.batch_tokens)):
                    if i < skip:
                        continue
                    self._pos = {"epoch": epoch, "window": window, "buffer": buffer, "served": i + 1}
                    idx = perm[lo:lo + self.batch_tokens]
                    yield {s: t[idx].to(self.device) for s, t in buf.items()}
                window += used
                buffer += 1
            bar.close()
            if not produced and start == 0:
                raise InputError("the dataset produced no full window of tokens: it is empty or shorter than "
                                 f"context_size={self.context_size} tokens")
            epoch += 1
            self._pos = {"epoch": epoch, "window": 0, "buffer": 0, "served": 0}

    def next_batch(self) -> dict[str, Tensor]:
        """One batch (keeps an iterator between calls)."""
        if getattr(self, "_it", None) is None:
            self._it = iter(self)
        return next(self._it)
