"""Activation stores: shuffled ``[batch_tokens, d]`` batches for SAE training and probing.

Two sources, one interface (:class:`interp.source.ActivationSource`: iterate dicts
``{site: Float[Tensor, "batch_tokens d"]}`` whose rows are aligned across sites; ``d_models``,
``describe()``, and ``state_dict()``/``load_state_dict()`` for exact resumption):

* :class:`ActivationStore` runs the model live: windows of text -> capture -> a shuffle buffer of
  ``buffer_tokens`` rows -> batches. Memory is bounded by the buffer whatever the dataset size.
* :class:`CachedActivations` reads a disk cache written by :func:`interp.cache.cache_activations`,
  shuffling across shards, holding ``shards_in_memory`` shards at a time.

Both fill and shuffle with the same code (:mod:`interp.source`), so a buffer and a shard group holding
the same rows yield the same batches.

Which positions feed the store: position 0 of every window is excluded by default (it is an attention
sink with outlier norms on models trained without BOS, such as SmolLM2), and so are special tokens
(the EOS separators between documents). Windows are packed documents, so there is no padding.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from interp.cache import CachedActivations, CacheInfo, cache_activations
from interp.capture import site_widths
from interp.data import load_texts, pack
from interp.errors import InputError
from interp.provenance import model_label
from interp.sites import resolve
from interp.source import (
    ActivationSource,
    capture_rows,
    dataset_name,
    take_rows,
)

__all__ = ["ActivationSource", "ActivationStore", "CacheInfo", "CachedActivations", "cache_activations"]


class ActivationStore(ActivationSource):
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
        seed: shuffles the documents (``seed + epoch``) and the rows of each buffer.
        dtype, device: of the yielded tensors.
        exclude_first, exclude_special, prepend_bos: which positions feed the store (see module doc).
        max_windows: stop after this many windows (useful for small runs).
        progress: show a progress bar of the windows captured (out of ``max_windows`` when set).

    Every row of an epoch is served once: a buffer's rows that do not fill a whole batch begin a batch
    that the next buffer (or the next epoch) ends, so every batch holds `batch_tokens` rows.

    The state (``state_dict()``) is ``{"epoch", "group", "row", "window"}``: the buffer where the next
    batch begins, the rows of it (in its shuffled order) already served and the windows consumed before it.
    """

    _cursor = ("window",)

    def __init__(self, model: nn.Module, tokenizer, sites: str | Sequence[str], *, dataset=None,
                 context_size: int = 128, batch_tokens: int = 4096, buffer_tokens: int | None = None,
                 model_batch_size: int = 8, epochs: int | None = 1, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 exclude_first: bool = True, exclude_special: bool = True, prepend_bos: bool = False,
                 text_column: str = "text", max_windows: int | None = None, progress: bool = False):
        super().__init__(sites=[sites] if isinstance(sites, str) else sites, batch_tokens=batch_tokens,
                         seed=seed, epochs=epochs, dtype=dtype, device=device)
        for s in self.sites:
            resolve(model, s)  # fail now, not after the first forward pass
        if context_size < 2 or model_batch_size < 1:
            raise InputError(f"need context_size >= 2 and model_batch_size >= 1; got {context_size}, "
                             f"{model_batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.dataset, self.text_column = dataset, text_column
        self.context_size, self.model_batch_size = context_size, model_batch_size
        self.buffer_tokens = max(buffer_tokens or 32 * batch_tokens, batch_tokens)
        self.exclude_first, self.exclude_special, self.prepend_bos = exclude_first, exclude_special, prepend_bos
        self.max_windows, self.progress = max_windows, progress
        self._widths: dict[str, int] = {}

    @property
    def d_models(self) -> dict[str, int]:
        """Width of each site (one short forward pass the first time)."""
        if not self._widths:
            self._widths = site_widths(self.model, self.sites)
        return dict(self._widths)

    def describe(self) -> dict[str, Any]:
        """What this store reads, JSON-ready (``rows`` is None: a live store has no fixed size)."""
        return {"source": "live", "model": model_label(self.model),
                "sites": list(self.sites), "widths": self.d_models, "dataset": dataset_name(self.dataset),
                "context_size": self.context_size, "rows": None, "dtype": str(self.dtype).removeprefix("torch."),
                "exclude_first": self.exclude_first, "exclude_special": self.exclude_special,
                "prepend_bos": self.prepend_bos, "max_windows": self.max_windows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "group" not in state and "buffer" in state:  # the name this store used before "group"
            state = {**state, "group": state["buffer"]}
        super().load_state_dict(state)

    def _windows(self, epoch: int) -> Iterator[Tensor]:
        texts = load_texts(self.dataset, text_column=self.text_column, shuffle_seed=self.seed + epoch)
        windows = pack(texts, self.tokenizer, self.context_size, prepend_bos=self.prepend_bos)
        return itertools.islice(windows, self.max_windows) if self.max_windows else windows

    def _groups(self, epoch: int, start: dict[str, int]) -> Iterator[tuple[dict[str, int], dict[str, Tensor]]]:
        """Buffers of `epoch`: skip the windows earlier buffers consumed (tokenizing only), then fill."""
        window = first = start["window"]
        windows = itertools.islice(self._windows(epoch), first, None)
        chunks = capture_rows(self.model, self.tokenizer, self.sites, windows, model_batch_size=self.model_batch_size,
                              dtype=self.dtype, exclude_first=self.exclude_first,
                              exclude_special=self.exclude_special)
        produced = False
        with tqdm(total=self.max_windows, initial=first, unit="win", desc=f"capturing (epoch {epoch})",
                  disable=not self.progress, smoothing=0.1) as bar:
            while True:
                rows, used = take_rows(chunks, self.buffer_tokens)
                bar.update(used)
                if not rows:
                    break
                produced = True
                yield {"window": window}, rows
                window += used
        if not produced and first == 0:
            raise InputError("the dataset produced no full window of tokens: it is empty or shorter than "
                             f"context_size={self.context_size} tokens")
