"""``interp sae publish``: the hook saes/cli.py looks for (the parser itself is in :mod:`saes.publish`)."""

from __future__ import annotations

import argparse

from saes.publish import add_publish_parser


def register(sae_subparsers: argparse._SubParsersAction) -> None:
    """Add ``publish`` to the ``interp sae`` subcommands."""
    add_publish_parser(sae_subparsers)
