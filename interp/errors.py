"""The project's exceptions: one base class, a subclass per kind of mistake.

Every message says what was expected, what arrived and what to try.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InterpError(Exception):
    """Base class of every error this project raises on purpose."""


class SiteError(InterpError, KeyError):
    """A site name that does not exist on this model, or cannot be read or written as asked."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InputError(InterpError, TypeError, ValueError):
    """Inputs of the wrong type, shape or content."""


class DataError(InterpError, ValueError):
    """A dataset or corpus that cannot be read, or that holds no usable text."""


class CacheError(InterpError, ValueError):
    """An activation cache on disk that is missing, incomplete, corrupt or from another run."""


class ModelLoadError(InterpError, OSError):
    """A model that cannot be found or loaded."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The `n` candidates most similar to `name` (for 'did you mean' messages)."""
    cands = list(candidates)
    hits = difflib.get_close_matches(name, cands, n=n, cutoff=0.4)
    if len(hits) < n:  # fall back to shared prefixes so there is always something useful
        prefix = name.split(".hook")[0]
        hits += [c for c in cands if c.startswith(prefix) and c not in hits][: n - len(hits)]
    return hits
