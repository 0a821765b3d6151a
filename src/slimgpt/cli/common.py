"""What the subcommands share: the flags several of them take, argument types, logging set-up, and the
one-line error report (exit code 2) around a subcommand's handler.

Every subcommand module has ``register(subparsers)`` (add its parser, its arguments and ``func``) and a
handler ``run(args) -> int`` that raises ``SlimGPTError`` subclasses for user errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slimgpt.errors import ConfigError, SlimGPTError

Subparsers = argparse._SubParsersAction
Handler = Callable[[argparse.Namespace], Any]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class LineHelpFormatter(argparse.HelpFormatter):
    """Wraps each line of a help text on its own: a help with newlines keeps one item per line."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        lines: list[str] = []
        for line in text.splitlines():
            lines += super()._split_lines(line, width)
        return lines


# ------------------------------------------------------------------------------------------- shared flags


def add_saving(parser: argparse.ArgumentParser, resume_help: str) -> None:
    """What a command that saves a model takes: ``--output/-o``, ``--overwrite``, ``--resume``, ``--checkpoint-dir``."""
    add_output(parser, required=True)
    add_overwrite(parser)
    add_resume(parser, resume_help)


def add_output(parser: argparse.ArgumentParser, *, required: bool, help: str | None = None) -> None:
    parser.add_argument("--output", "-o", required=required, default=None, help=help)


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def add_resume(parser: argparse.ArgumentParser, resume_help: str) -> None:
    """``--resume`` and ``--checkpoint-dir`` (the checkpoint defaults to OUTPUT.checkpoint)."""
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--checkpoint-dir", default=None, help="default: OUTPUT.checkpoint")


def add_dtype(parser: argparse.ArgumentParser, choices: Sequence[str], default: str | None,
              help: str | None = None) -> None:
    parser.add_argument("--dtype", default=default, choices=list(choices), help=help)


def add_device(parser: argparse.ArgumentParser, default: str | None, help: str | None = None) -> None:
    parser.add_argument("--device", default=default, help=help)


def add_trust_remote_code(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true")


def add_json(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--json", default=None, help=help)


# ------------------------------------------------------------------------------------------ argument types


def names(text: str) -> list[str]:
    """A non-empty comma-separated list."""
    items = [name.strip() for name in text.split(",") if name.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def csv(text: str) -> tuple[str, ...]:
    """A comma-separated list, possibly empty."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def check_output_file(path: Path, flag: str) -> None:
    """A file to be written must not name an existing folder."""
    if path.exists() and path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file name")


# ----------------------------------------------------------------------------------------- running a command


def finish_saved(report: Any, output: Path, checkpoint: Path, json_path: str | None, lock: Any) -> None:
    """After a model was saved: drop the checkpoint (only a folder slimgpt marked as its own), release the
    output's lock, write the report JSON if asked, print the report."""
    from slimgpt.saving import remove_checkpoint

    remove_checkpoint(checkpoint)
    lock.release()
    if json_path:
        Path(json_path).write_text(report.to_json())
    print(report.to_markdown())
    print(f"\nsaved to {output}")


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_handler(func: Handler, args: argparse.Namespace) -> int:
    """Call a subcommand's handler; a user error is one line on stderr and exit code 2."""
    try:
        result = func(args)
    except SlimGPTError as error:
        print(f"slimgpt: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("slimgpt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(result or 0)
