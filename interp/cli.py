"""The ``interp`` command line.

Subcommands of this package are listed in ``_BUILTIN``; packages that ``interp`` must not import
(``saes``, ``probes``) contribute theirs through the ``interp.commands`` entry-point group. Each
provider has ``register(subparsers)``, which adds a subparser with ``set_defaults(func=...)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from interp.errors import InterpError

_BUILTIN = ("interp.capture_cli", "interp.features.cli", "interp.intervene_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="interp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _BUILTIN:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the module exists but something it imports does not
                raise
            continue
        module.register(sub)
    for ep in sorted(entry_points(group="interp.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except ModuleNotFoundError as e:
            print(f"interp: the '{ep.name}' commands are unavailable ({e})", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InterpError as e:
        print(f"interp {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interp {args.command}: interrupted (finished work is kept; run again to resume where supported)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
