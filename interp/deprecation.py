"""Renamed keywords, fields, keys and functions: the old name keeps working for one release.

One mechanism for every package. Using an old name emits a :class:`DeprecationWarning` that names
the new one and gives the same result; passing an old and a new name together is an error (one of
them silently winning would hide a mistake).

* :func:`renamed_keywords` wraps a function or method whose parameter was renamed;
* :func:`renamed_fields` wraps a dataclass whose field was renamed: its ``__init__`` takes the old
  keyword, the old attribute reads (and, where the class allows, writes) the new one, and the map
  is kept on the class as ``_renamed`` for readers of saved configs;
* :class:`RenamedKeys` is a dict whose old keys can still be read (``d["k"]``), while iteration,
  ``in``, ``.get`` and JSON see only the new keys;
* :func:`renamed_function` is the old name of a function or method, and
  :func:`renamed_module_attributes` serves the old names of module constants.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from interp.errors import InputError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def _is_wrapper(filename: str) -> bool:
    """Frames added by a runtime type checker's wrappers (beartype, jaxtyping), which are not the caller."""
    return filename.startswith("<@beartype") or "/jaxtyping/" in filename or "/beartype/" in filename


def warn_renamed(owner: str, old: str, new: str, *, stacklevel: int = 2) -> None:
    """Warn that ``owner``'s ``old`` is now called ``new`` (``stacklevel`` counts from the caller, not
    counting the frames of a runtime type checker's wrappers)."""
    frame, level, real = sys._getframe(1), 1, 1
    while frame is not None and _is_wrapper(frame.f_code.co_filename):  # this function's own wrapper
        frame, level = frame.f_back, level + 1
    while frame is not None and real < stacklevel:
        frame, level = frame.f_back, level + 1
        if frame is not None and not _is_wrapper(frame.f_code.co_filename):
            real += 1
    while frame is not None and (_is_wrapper(frame.f_code.co_filename) or frame.f_code.co_filename == __file__):
        frame, level = frame.f_back, level + 1  # never point inside the alias machinery itself
    warnings.warn(f"{owner}: {old!r} is deprecated, use {new!r} instead (same meaning); {old!r} will be "
                  "removed in the next release", DeprecationWarning, stacklevel=level + 1)


def translate(kwargs: Mapping[str, Any], renamed: Mapping[str, str], owner: str, *,
              error: type[Exception] = InputError, given: tuple[str, ...] = (), stacklevel: int = 2) -> dict[str, Any]:
    """``kwargs`` with every old name of ``renamed`` (old -> new) replaced by its new name.

    ``given`` lists names already passed another way (positionally); an old name whose new name is
    in ``kwargs`` or ``given`` raises ``error``. ``stacklevel`` counts from the caller, as in
    :func:`warnings.warn`.
    """
    out = dict(kwargs)
    for old, new in renamed.items():
        if old not in out:
            continue
        if new in out or new in given:
            raise error(f"{owner} got both {old}= and {new}=; {old!r} is the old name of {new!r}: pass only {new}=")
        warn_renamed(owner, old, new, stacklevel=stacklevel + 1)
        out[new] = out.pop(old)
    return out


def _owner(fn: Callable) -> str:
    name = fn.__qualname__.removesuffix(".__init__")
    return name if name != fn.__qualname__ else f"{name}()"


def renamed_keywords(renamed: Mapping[str, str], *, error: type[Exception] = InputError) -> Callable[[F], F]:
    """Decorator: the wrapped function also takes each old keyword of ``renamed`` (old -> new)."""
    renamed = dict(renamed)

    def deco(fn: F) -> F:
        params = inspect.signature(fn).parameters.values()
        positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        owner = _owner(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if any(old in kwargs for old in renamed):
                kwargs = translate(kwargs, renamed, owner, error=error, given=positional[:len(args)], stacklevel=2)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco


class _OldAttribute:
    """The old name of a field: reads and writes go to the new field, with a warning."""

    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def __get__(self, obj: Any, cls: type | None = None) -> Any:
        if obj is None:
            return self
        warn_renamed(type(obj).__name__, self.old, self.new)
        return getattr(obj, self.new)

    def __set__(self, obj: Any, value: Any) -> None:
        warn_renamed(type(obj).__name__, self.old, self.new)
        setattr(obj, self.new, value)


def renamed_fields(renamed: Mapping[str, str], *, error: type[Exception] = InputError) -> Callable[[type[T]], type[T]]:
    """Class decorator for a class whose fields (constructor keywords stored as attributes of the
    same name) were renamed; on a dataclass it goes above ``@dataclass``.

    The constructor takes each old keyword, the old attribute reads the new field, and
    ``cls._renamed`` holds every rename of the class and its bases (old -> new), for code that
    builds the class from saved dicts.
    """
    renamed = dict(renamed)

    def deco(cls: type[T]) -> type[T]:
        cls._renamed = {**getattr(cls, "_renamed", {}), **renamed}  # type: ignore[attr-defined]
        cls.__init__ = renamed_keywords(renamed, error=error)(cls.__init__)  # type: ignore[misc]
        for old, new in renamed.items():
            setattr(cls, old, _OldAttribute(old, new))
        return cls

    return deco


class RenamedKeys(dict):
    """A dict whose old keys (``_renamed``: old -> new) can still be read with ``d[old]``, with a warning.

    Only ``d[old]`` is redirected: iteration, ``in``, ``.get``, ``len`` and JSON see the new keys,
    so nothing is stored twice. Subclasses set ``_renamed`` and ``_owner`` (named in the warning).
    """

    _renamed: ClassVar[dict[str, str]] = {}
    _owner: ClassVar[str] = "this dict"

    def __missing__(self, key: Any) -> Any:
        new = self._renamed.get(key) if isinstance(key, str) else None
        if new is None or new not in self:
            raise KeyError(key)
        warn_renamed(self._owner, key, new)
        return self[new]


def renamed_function(old: str, fn: F, *, owner: str | None = None) -> F:
    """``fn`` under its old name ``old``: same result, with a warning naming ``fn``. ``owner`` (the
    module, or the class of a method) is named in the warning; default: ``fn``'s module."""
    where = owner or fn.__module__

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warn_renamed(where, old, fn.__name__)
        return fn(*args, **kwargs)

    wrapper.__name__ = old
    wrapper.__qualname__ = fn.__qualname__.rsplit(".", 1)[0] + "." + old if "." in fn.__qualname__ else old
    wrapper.__doc__ = f"Deprecated name of ``{fn.__name__}`` (removed in the next release)."
    return wrapper  # type: ignore[return-value]


def renamed_module_attributes(module: str, renamed: Mapping[str, str],
                              namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving each old name of ``renamed`` (old -> new) from ``namespace``
    (the module's ``globals()``), with a warning:
    ``__getattr__ = renamed_module_attributes(__name__, {"OLD": "NEW"}, globals())``."""
    renamed = dict(renamed)

    def __getattr__(name: str) -> Any:
        if name in renamed:
            warn_renamed(module, name, renamed[name])
            return namespace[renamed[name]]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
