"""Probing datasets: activations of labelled tokens or labelled sequences, captured with ``interp.capture``.

>>> ds = token_dataset(model, tok, texts, ["blocks.5.mlp.hook_post"],
...                    label_fn=lambda toks, i: toks[i].strip() in DAYS)   # one example per token
>>> ds = sequence_dataset(model, tok, texts, labels, sites, aggregate="mean")  # one per text
>>> sweep(ds.acts, ds.labels, groups=ds.groups)                       # split by document

Position 0 is skipped by default (``skip_first=True``): the embedded model's tokenizer adds no BOS,
so the first token of every text carries outlier activations (an attention sink). Any ``[n, d]``
activations work downstream, so SAE latents are probed by encoding first: ``ds.map_acts(sae.encode)``.
``ProbeDataset.features`` and ``map_features`` are the deprecated names of ``acts`` and ``map_acts``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.capture import capture, tokenize
from interp.deprecation import renamed_fields, renamed_function
from interp.errors import DataError, InputError


@renamed_fields({"features": "acts"})
@dataclass
class ProbeDataset:
    """Activations per site, with one label and one group (document) per example."""

    acts: dict[str, Tensor]
    """``{site: [n, d]}`` activations, one row per example."""
    labels: list
    """One label per example."""
    groups: Tensor
    """Document (or entity) id of each example, for group splits."""
    tokens: list[str] = field(default_factory=list)
    """Token text of each example (token-level datasets), or the last token (sequence-level)."""
    positions: Tensor | None = None
    """Position of each example's token in its document (token-level datasets)."""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Sequence[int] | Tensor) -> ProbeDataset:
        """The examples at `idx`."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        ids = idx.tolist()
        return ProbeDataset({site: v[idx] for site, v in self.acts.items()}, [self.labels[i] for i in ids],
                            self.groups[idx], [self.tokens[i] for i in ids] if self.tokens else [],
                            None if self.positions is None else self.positions[idx])

    def map_acts(self, fn: Callable[[Tensor], Tensor]) -> ProbeDataset:
        """A copy with ``fn`` applied to every site's ``[n, d]`` activations (e.g. an SAE's ``encode``)."""
        with torch.no_grad():
            acts = {site: fn(v) for site, v in self.acts.items()}
        return ProbeDataset(acts, self.labels, self.groups, self.tokens, self.positions)

    map_features = renamed_function("map_features", map_acts, owner="ProbeDataset")


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise InputError("texts must be a non-empty list of strings")
    return tokenize(tokenizer, list(texts), truncation=True, max_length=max_length)


def _token_texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def token_dataset(
    model,
    tokenizer,
    texts: Sequence[str],
    sites: str | Sequence[str],
    *,
    label_fn: Callable[[list[str], int], Any] | None = None,
    doc_labels: Sequence | None = None,
    skip_first: bool = True,
    max_length: int = 128,
    max_per_doc: int | None = None,
    batch_size: int = 8,
    dtype: torch.dtype | None = torch.float32,
    seed: int = 0,
    progress: bool = True,
) -> ProbeDataset:
    """One example per selected token of every text.

    Args:
        texts: documents; each is one group (``ds.groups``) so splits never share a document.
        sites: sites to read (e.g. ``blocks.5.mlp.hook_post``), all in one forward pass.
        label_fn: ``label_fn(tokens, i)`` gets the document's token texts and a position and returns
            that token's label, or None to leave the token out.
        doc_labels: instead of ``label_fn``, one label per document given to all its tokens.
        skip_first: leave out position 0 (the attention sink of a model without BOS).
        max_length: truncate documents to this many tokens.
        max_per_doc: keep at most this many labelled tokens per document (chosen at random by `seed`).
        dtype: dtype of the stored activations (float16 halves memory for big sweeps).
    """
    if (label_fn is None) == (doc_labels is None):
        raise InputError("pass exactly one of label_fn= (a label per token) or doc_labels= (a label per text)")
    if doc_labels is not None and len(doc_labels) != len(texts):
        raise InputError(f"doc_labels has {len(doc_labels)} labels for {len(texts)} texts; they must match")
    enc = _encode(tokenizer, texts, max_length)
    mask = torch.zeros_like(enc["attention_mask"], dtype=torch.bool)
    labels, tokens, groups, positions = [], [], [], []
    rng = random.Random(seed)
    for d, (ids, am) in enumerate(zip(enc["input_ids"], enc["attention_mask"])):
        cols = torch.nonzero(am)[:, 0].tolist()
        toks = _token_texts(tokenizer, ids[cols].tolist())
        chosen = []
        for i in range(int(skip_first), len(cols)):
            lab = label_fn(toks, i) if label_fn is not None else doc_labels[d]
            if lab is not None:
                chosen.append((i, lab))
        if max_per_doc is not None and len(chosen) > max_per_doc:
            chosen = sorted(rng.sample(chosen, max_per_doc), key=lambda c: c[0])
        for i, lab in chosen:  # the boolean mask selects in row-major order, as this loop does
            mask[d, cols[i]] = True
            labels.append(lab)
            tokens.append(toks[i])
            groups.append(d)
            positions.append(i)
    if not labels:
        raise DataError("no token was labelled: label_fn returned None everywhere (or the texts are empty)")
    acts = capture(model, enc, sites, positions=mask, dtype=dtype, tokenizer=tokenizer,
                   batch_size=batch_size, progress=progress)
    return ProbeDataset(dict(acts), labels, torch.tensor(groups), tokens, torch.tensor(positions))


def sequence_dataset(
    model,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence,
    sites: str | Sequence[str],
    *,
    aggregate: str = "mean",
    groups: Sequence | None = None,
    skip_first: bool = True,
    max_length: int = 128,
    batch_size: int = 8,
    dtype: torch.dtype | None = torch.float32,
    progress: bool = True,
) -> ProbeDataset:
    """One example per text: the last real token's activations, or their mean over real tokens.

    Args:
        labels: one label per text.
        aggregate: ``"last"`` (last real token) or ``"mean"`` (mean over real tokens, position 0
            left out when ``skip_first`` and the text has more than one token).
        groups: one group id per text (an entity); default: each text its own group.
    """
    if aggregate not in ("last", "mean"):
        raise InputError(f"aggregate={aggregate!r}: expected 'last' or 'mean'")
    if len(labels) != len(texts):
        raise InputError(f"got {len(labels)} labels for {len(texts)} texts; they must match")
    names = [sites] if isinstance(sites, str) else list(sites)
    enc = _encode(tokenizer, texts, max_length)
    out: dict[str, list[Tensor]] = {s: [] for s in names}
    n = len(texts)
    for start in tqdm(range(0, n, batch_size), desc="capture", unit="batch", disable=not progress or n <= batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in enc.items()}
        am = chunk["attention_mask"]
        if aggregate == "last":
            acts = capture(model, chunk, names, positions="last", dtype=dtype, progress=False)
            for s in names:
                out[s].append(acts[s])
            continue
        acts = capture(model, chunk, names, dtype=torch.float32, progress=False)
        for s in names:
            out[s].append(aggregate_tokens(acts[s], am, "mean", skip_first).to(dtype or acts[s].dtype))
    last = [tokenizer.decode([int(ids[torch.nonzero(m)[-1, 0]])]) for ids, m in
            zip(enc["input_ids"], enc["attention_mask"])]
    g = torch.arange(n) if groups is None else torch.as_tensor(
        np.unique(list(groups), return_inverse=True)[1].reshape(-1))
    if g.shape[0] != n:
        raise InputError(f"groups has {g.shape[0]} ids for {n} texts; they must match")
    return ProbeDataset({s: torch.cat(v) for s, v in out.items()}, list(labels), g, last, None)


def aggregate_tokens(
    x: Float[Tensor, "batch seq d"], attention_mask: Tensor, how: str = "mean", skip_first: bool = True
) -> Float[Tensor, "batch d"]:
    """Pool captured ``[batch, seq, d]`` activations per row: ``"last"`` real token or ``"mean"`` of real tokens."""
    am = attention_mask.to(x.device)
    if how == "last":
        idx = torch.where(am.bool(), torch.arange(am.shape[1], device=x.device), -1).max(1).values
        return x[torch.arange(x.shape[0], device=x.device), idx]
    if how != "mean":
        raise InputError(f"how={how!r}: expected 'last' or 'mean'")
    keep = am.clone().to(x.dtype)
    if skip_first:
        first = am.float().argmax(1)
        rows = (am.sum(1) > 1).nonzero()[:, 0]
        keep[rows, first[rows]] = 0
    return (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
