"""The command layer: every ``interp ...`` command, registered in one list.

This package is the one place that joins the three libraries (``interp``, ``saes``, ``probes``):
library modules never import it, and only its command modules import ``saes`` or ``probes``, inside
the command functions, so ``interp --help`` stays fast. Each command module has
``register(subparsers)``, which adds its parser with ``set_defaults(func=...)``; its flags come from
the library's config dataclasses (:mod:`interp.cli.options`).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from importlib import import_module

from interp.cli.options import Parser
from interp.errors import InterpError

#: Command modules, in the order ``interp --help`` lists them.
COMMANDS = ("demo", "capture", "sae", "probe", "features", "intervene", "patch", "dashboard")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("interp-toolkit")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="interp", description="Capture, sparse autoencoders, probes, feature finders and "
                    "interventions for Hugging Face transformers.")
    parser.add_argument("--version", action="version", version=f"interp {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        import_module(f"interp.cli.{name}").register(sub)
    return parser


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    name = " ".join(["interp", args.command] + [v for k, v in sorted(vars(args).items())
                                                  if k.endswith("_command") and isinstance(v, str)])
    show = warnings.showwarning
    warnings.showwarning = _warning_line
    try:
        return int(args.func(args) or 0)
    except InterpError as e:
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permission denied, a missing file: the user's to fix
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"{name}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted (finished work is kept; run the same command again to resume where "
              "supported)", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = show


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
