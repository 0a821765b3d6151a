"""Layer 7: the ``slimgpt`` command line, the only importer of argparse. One module per subcommand
(prune, demo, eval, compare, finetune, export), each with ``register(subparsers)`` and a handler ``run``;
common.py holds the shared flags, logging set-up and the one-line error report. They only parse arguments
into configs and call the library.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from slimgpt.cli import common, compare, demo, export, finetune, prune
from slimgpt.cli import eval as evaluate

SUBCOMMANDS = (prune, demo, evaluate, compare, finetune, export)  # in the order ``slimgpt --help`` lists them

__all__ = ["add_subcommands", "build_parser", "main"]


def add_subcommands(subparsers: common.Subparsers) -> None:
    """Add every subcommand; each sets ``func`` to its handler."""
    for module in SUBCOMMANDS:
        module.register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimgpt", description="SlimGPT structured pruning for causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.verbose, args.quiet)
    return common.run_handler(args.func, args)
