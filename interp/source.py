"""One activation source: the fill loop and the shuffle/resume loop that the live store and the disk
cache share.

* :func:`capture_rows` turns a stream of token windows into per-forward chunks of rows
  ``{site: [rows, d]}`` (plus the token ids, when asked): it is how both
  :class:`interp.store.ActivationStore` fills its shuffle buffer and
  :func:`interp.cache.cache_activations` fills its shards. :func:`take_rows` gathers chunks until a
  buffer (or a shard) holds enough rows.
* :class:`ActivationSource` turns a deterministic sequence of row groups (live: buffers filled from
  windows; disk: groups of shards) into shuffled ``[batch_tokens, d]`` batches per site, rows aligned
  across sites, with exact resumption through ``state_dict()`` / ``load_state_dict()``. A subclass
  says only how to produce the groups of one epoch, from a given group on.

Every row is served once per epoch, in batches of exactly ``batch_tokens`` rows: the shuffled rows of
the groups, one group after the other and one epoch after the other, form one stream cut into batches,
so a group's last rows (fewer than a batch) begin a batch that the next group ends, and an epoch's last
rows begin the first batch of the next epoch (which may then hold a row twice, once per epoch). Only
the rows after the last full batch of the last epoch (fewer than ``batch_tokens``) are never served.
A source whose epoch holds fewer rows than one batch is refused (:class:`interp.errors.InputError`).
Memory holds one group plus fewer than ``batch_tokens`` pending rows.

Determinism: the rows of group ``g`` in epoch ``e`` are permuted with a generator seeded from
``(seed, e, g)``, so the same seed gives the same batches, and a source resumed from a state continues
bit-exactly where the saved one stopped. The state (``{"epoch", "group", "row"}`` plus a subclass's
cursor) is where the next batch begins: row ``row`` of that group's shuffled order, so resuming reloads
that group (and the following ones, when the batch spans them) and needs no saved rows.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from interp.capture import capture
from interp.data import token_mask
from interp.errors import InputError

__all__ = ["ActivationSource", "capture_rows", "dataset_name", "take_rows"]

TOKENS = "tokens"
"""Key of the token ids ``[rows]`` (int32) beside the sites' rows, when a source carries them."""


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (order matters)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def dataset_name(dataset) -> str | None:
    """How a dataset is named in a manifest or a description: its name or path, else its type."""
    return dataset if isinstance(dataset, (str, type(None))) else type(dataset).__name__


def capture_rows(model: nn.Module, tokenizer, sites: Sequence[str], windows: Iterator[Int[Tensor, " seq"]], *,
                 model_batch_size: int, dtype: torch.dtype, exclude_first: bool = True,
                 exclude_special: bool = True, with_tokens: bool = False,
                 ) -> Iterator[tuple[dict[str, Float[Tensor, "rows d"]], int]]:
    """Run `model` over `windows`, `model_batch_size` at a time, and yield each forward pass's rows.

    Yields ``(rows, n_windows)``: ``rows`` maps each site to ``[rows, d]`` (aligned across sites; only
    the positions :func:`interp.data.token_mask` keeps), plus ``"tokens"`` ``[rows]`` (int32 ids) when
    `with_tokens`; ``n_windows`` is how many windows that pass consumed. Stops when `windows` ends.
    """
    while True:
        chunk = list(itertools.islice(windows, model_batch_size))
        if not chunk:
            return
        ids = torch.stack(chunk)
        keep = token_mask(ids, tokenizer, exclude_first=exclude_first, exclude_special=exclude_special)
        acts = capture(model, ids, list(sites), positions=keep, dtype=dtype)
        rows = {s: acts[s] for s in sites}
        if with_tokens:
            rows[TOKENS] = ids[keep].to(torch.int32)
        yield rows, len(chunk)


def take_rows(chunks: Iterator[tuple[dict[str, Tensor], int]], limit: int) -> tuple[dict[str, Tensor], int]:
    """Concatenate chunks from :func:`capture_rows` until they hold at least `limit` rows.

    Returns the rows (``{}`` when the stream ended before any) and the windows they used: all of the
    last chunk's rows, so possibly more than `limit` (no row is dropped). Fewer than `limit` rows means
    the stream ended.
    """
    parts: dict[str, list[Tensor]] = {}
    rows = used = 0
    while rows < limit:
        got = next(chunks, None)
        if got is None:
            break
        chunk, n_windows = got
        used += n_windows
        for k, v in chunk.items():
            parts.setdefault(k, []).append(v)
        rows += next(iter(chunk.values())).shape[0]
    if rows == 0:
        return {}, used
    return {k: torch.cat(v) for k, v in parts.items()}, used


class ActivationSource(ABC):
    """Shuffled batches ``{site: Float[Tensor, "batch_tokens d"]}`` from a sequence of row groups.

    The shared interface of the live store and the disk cache: iterate (or call :meth:`next_batch`),
    read ``sites``, ``d_models`` (``{site: width}``), ``d_model`` (the one width), ``batch_tokens``,
    ``n_tokens`` (rows available; None when unbounded), :meth:`describe`, and save/restore the position
    with :meth:`state_dict` / :meth:`load_state_dict`. Each epoch serves every row once (see the module
    doc: batches may span groups and epochs, so every batch holds ``batch_tokens`` rows).

    A subclass implements :meth:`_groups`, ``d_models`` and :meth:`describe`; it may name extra state
    keys in ``_cursor`` (what it needs to restart at a group, such as the windows already consumed).
    """

    _cursor: tuple[str, ...] = ()
    n_tokens: int | None = None

    def __init__(self, *, sites: Sequence[str], batch_tokens: int, seed: int, epochs: int | None,
                 dtype: torch.dtype | None, device: str | torch.device):
        self.sites = list(sites)
        if not self.sites:
            raise InputError("sites is empty: name at least one site, e.g. 'blocks.6.hook_resid_post'")
        if batch_tokens < 1:
            raise InputError(f"batch_tokens must be >= 1, got {batch_tokens}")
        if epochs is not None and epochs < 1:
            raise InputError(f"epochs must be >= 1 or None (forever), got {epochs}")
        self.batch_tokens, self.seed, self.epochs = batch_tokens, seed, epochs
        self.dtype, self.device = dtype, torch.device(device)
        self._pos = self._start(0)
        self._it: Iterator[dict[str, Tensor]] | None = None

    # -- what a subclass provides -------------------------------------------------------------------
    @abstractmethod
    def _groups(self, epoch: int, start: dict[str, int]) -> Iterator[tuple[dict[str, int], dict[str, Tensor]]]:
        """Yield ``(cursor, rows)`` for the groups of `epoch` from group ``start["group"]`` on (`start`
        also holds this source's ``_cursor`` keys for that group); ``cursor`` is what to record to
        restart at the yielded group."""

    @property
    @abstractmethod
    def d_models(self) -> dict[str, int]:
        """Width of each site: ``{site: d}``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What this source reads (model, sites, widths, dataset, context size, rows), JSON-ready."""

    # -- the shared interface -----------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        """The width of every site; a source whose sites differ in width raises (use ``d_models``)."""
        widths = self.d_models
        if len(set(widths.values())) > 1:
            raise InputError(f"this source holds sites of different widths {widths}, so it has no single "
                             "d_model; read d_models[site] for each site")
        return next(iter(widths.values()))

    def _start(self, epoch: int) -> dict[str, int]:
        return {"epoch": epoch, "group": 0, "row": 0, **{k: 0 for k in self._cursor}}

    def state_dict(self) -> dict[str, int]:
        """Position in the data: enough to resume exactly after the last yielded batch."""
        return dict(self._pos)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from a :meth:`state_dict` (the next batch is the one after the saved position).

        A state saved before ``"row"`` existed counts ``"served"`` whole batches of its group instead:
        it resumes at row ``served * batch_tokens`` of that group, the batch it would have served next.
        """
        if "row" not in state and "served" in state:
            state = {**state, "row": int(state["served"]) * self.batch_tokens}
        keys = tuple(self._start(0))
        missing = [k for k in keys if k not in state]
        if missing:
            raise InputError(f"{type(self).__name__} state lacks {missing} (got keys {sorted(state)}); "
                             f"expected a dict from {type(self).__name__}.state_dict()")
        self._pos = {k: int(state[k]) for k in keys}
        self._it = None

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        # The shuffled rows of the groups, one group after the other and one epoch after the other, form
        # one stream cut into batches of batch_tokens rows: a group's last rows begin the next batch, which
        # ends in the next group (or the next epoch). The state is where the next batch begins, so a resume
        # reloads the groups from there on; the rows held are one group plus fewer than batch_tokens pending.
        resume = dict(self._pos)
        epoch = resume["epoch"]
        pending: list[dict[str, Tensor]] = []
        held = 0  # rows in pending
        while self.epochs is None or epoch < self.epochs:
            start = resume if epoch == resume["epoch"] else self._start(epoch)
            whole, g, seen = start == self._start(epoch), start["group"], 0
            for cursor, rows in self._groups(epoch, start):
                n = next(iter(rows.values())).shape[0]
                seen += n
                perm = torch.randperm(n, generator=generator(self.seed, epoch, g))
                lo = start["row"] if g == start["group"] else 0
                while lo < n:
                    take = min(n - lo, self.batch_tokens - held)
                    idx = perm[lo:lo + take]
                    pending.append({k: v[idx] for k, v in rows.items()})
                    held, lo = held + take, lo + take
                    if held == self.batch_tokens:
                        self._pos = {"epoch": epoch, "group": g, "row": lo, **cursor}
                        batch = pending[0] if len(pending) == 1 else {k: torch.cat([p[k] for p in pending])
                                                                       for k in pending[0]}
                        pending, held = [], 0
                        yield {k: self._to_output(k, v) for k, v in batch.items()}
                g += 1
            if whole and seen < self.batch_tokens:
                raise InputError(f"{type(self).__name__}: epoch {epoch} holds only {seen} rows, fewer than "
                                 f"batch_tokens={self.batch_tokens}, so no batch can be filled without repeating "
                                 f"rows; pass batch_tokens <= {seen} or give it more data")
            epoch += 1
            if not held:  # else the next batch begins among the pending rows, where self._pos already points
                self._pos = self._start(epoch)

    def _to_output(self, key: str, rows: Tensor) -> Tensor:
        if key == TOKENS or self.dtype is None:
            return rows.to(self.device)
        return rows.to(self.device, self.dtype)

    def next_batch(self) -> dict[str, Tensor]:
        """One batch (keeps an iterator between calls; raises StopIteration when the epochs are done)."""
        if self._it is None:
            self._it = iter(self)
        return next(self._it)
