"""Command-line flags derived from the library's config dataclasses and function signatures.

A default lives in one place: the dataclass field (or the function's keyword default). This module
turns fields into ``argparse`` flags whose help text is the field's docstring with the default
shown, reads ``--config FILE.json`` (keys are the flags' names with underscores; a flag on the
command line wins over the file), and reports which options the user actually gave, so that a
command can refuse an option that does not apply instead of dropping it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from interp.errors import InputError


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (what was wrong and where to look) and whose
    description is shown without RST markup."""

    def __init__(self, *args: Any, **kwargs: Any):
        if kwargs.get("description"):
            kwargs["description"] = plain_block(kwargs["description"])
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        old = [f for f in RENAMED_FLAGS if re.search(rf"(?:^|\s){re.escape(f)}(?:[\s=]|$)", message)]
        if old and message.startswith("unrecognized arguments"):
            message += " (renamed: " + ", ".join(f"{f} is now {RENAMED_FLAGS[f]}" for f in old) + ")"
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


RENAMED_FLAGS = {"--ks": "--n-neurons", "--top-k": "--n-neighbors", "--acts": "--cache"}
"""Flags renamed in an earlier release: the old ones are refused, and the error names the new one."""


def plain_block(text: str) -> str:
    """A docstring without RST markup (roles, double backticks), line breaks kept."""
    text = re.sub(r":(?:class|func|meth|mod|attr|data|obj):`~?([^`]+)`", r"\1", text)
    text = re.sub(r"``(\"[^`]*\")``", r"\1", text)
    return text.replace("``", "'")


def plain(text: str) -> str:
    """A docstring as one line of plain text for argparse help: no RST markup, '%' escaped."""
    return re.sub(r"\s+", " ", plain_block(text)).strip().replace("%", "%%")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass and its bases (the string literal under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = plain(nxt.value.value)
    return docs


@dataclasses.dataclass(frozen=True)
class Option:
    """One flag: its destination name, type, default (``MISSING`` when required) and help text."""

    name: str
    hint: Any
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


MISSING = dataclasses.MISSING


def dataclass_options(cls: type, *, exclude: Iterable[str] = (), rename: dict[str, str] | None = None) -> list[Option]:
    """The init fields of a dataclass as :class:`Option`s (``rename`` maps field -> flag name)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rename = rename or {}
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude:
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        out.append(Option(rename.get(f.name, f.name), hints[f.name], default, docs.get(f.name, "")))
    return out


def signature_options(fn: Callable, names: dict[str, str]) -> list[Option]:
    """Keyword arguments of ``fn`` as options; ``names`` maps each argument to its help text."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    out = []
    for name, help_ in names.items():
        p = sig.parameters[name]
        out.append(Option(name, hints.get(name, str), MISSING if p.default is p.empty else p.default, help_))
    return out


def _strip_none(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return hint, False


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return str(value)


def add_options(parser: argparse._ActionsContainer, options: Iterable[Option], *, required: Iterable[str] = (),
                note: dict[str, str] | None = None) -> list[str]:
    """Add one flag per option; every flag's argparse default is None ("not given"). Returns the names."""
    required, note = set(required), note or {}
    names = []
    for o in options:
        hint, _optional = _strip_none(o.hint)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        kw: dict[str, Any] = {"dest": o.name, "default": None}
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kw["choices"] = list(args)
        elif origin in (tuple, list) or hint in (tuple, list):
            inner = [a for a in args if a is not Ellipsis] or [str]
            kw["type"] = inner[0] if inner[0] in (int, float, str) else str
            kw["nargs"] = len(args) if origin is tuple and Ellipsis not in args and args else "+"
        elif hint in (int, float):
            kw["type"] = hint
        shown = note.get(o.name)
        if shown is None and o.default is MISSING or o.name in required:
            shown = "required"
        elif shown is None and o.default not in (None, (), []):
            shown = f"default: {_show(o.default)}"
        text = o.help.rstrip(".") + (f" ({shown})" if shown else "")
        parser.add_argument(o.flag, help=text, **kw)
        names.append(o.name)
    return names


def read_config(path: str | None, valid: Iterable[str]) -> dict[str, Any]:
    """The JSON object in ``--config FILE`` (keys: option names with underscores), checked for typos."""
    if not path:
        return {}
    p = Path(path)
    try:
        values = json.loads(p.read_text())
    except OSError as e:
        raise InputError(f"--config {path}: cannot read it ({e.strerror}); give a JSON file of options") from None
    except ValueError as e:
        raise InputError(f"--config {path}: not valid JSON ({e}); give a JSON object of options") from None
    if not isinstance(values, dict):
        raise InputError(f"--config {path}: holds a JSON {type(values).__name__}; expected an object "
                         "{\"option_name\": value, ...}")
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise InputError(f"--config {path}: unknown keys {unknown}; valid keys are {sorted(valid)}")
    return values


def given(args: argparse.Namespace, names: Iterable[str], from_file: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options the user set (flag, else config file), without defaults."""
    from_file = from_file or {}
    out = {}
    for n in names:
        v = getattr(args, n, None)
        if v is None and n in from_file:
            v = from_file[n]
        if v is not None:
            out[n] = tuple(v) if isinstance(v, list) else v
    return out


def defaults(options: Iterable[Option]) -> dict[str, Any]:
    return {o.name: o.default for o in options if o.default is not MISSING}


def parse_layers(spec: str, n_layers: int | None = None) -> list[int]:
    """``"all"``, ``"5"``, ``"0,3,7"``, ``"2-10"`` (inclusive) or ``"0-29:3"`` to layer indices, checked
    against the model's ``n_layers`` when given ("all" needs it)."""
    if spec == "all":
        if n_layers is None:
            raise InputError("--layers all needs the model's layer count; give layers such as '4-20'")
        return list(range(n_layers))
    out: list[int] = []
    try:
        for part in spec.split(","):
            rng, _, step = part.partition(":")
            lo, _, hi = rng.partition("-")
            out += list(range(int(lo), int(hi) + 1, int(step or 1))) if hi else [int(lo)]
    except ValueError:
        raise InputError(f"--layers {spec!r}: expected 'all', '5', '0,3,7', '2-10' or '0-29:3'") from None
    bad = [layer for layer in out if layer < 0 or (n_layers is not None and layer >= n_layers)]
    if bad:
        have = f"the model has layers 0..{n_layers - 1}" if n_layers is not None else "layers start at 0"
        raise InputError(f"--layers {spec!r}: layers {bad} do not exist; {have}")
    return list(dict.fromkeys(out))
