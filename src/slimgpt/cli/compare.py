"""``slimgpt compare``: put reports saved by ``slimgpt eval --json`` side by side in one Markdown table."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slimgpt._util.files import write_atomic
from slimgpt.cli import common

logger = logging.getLogger(__name__)


def register(subparsers: common.Subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="put saved evaluation reports side by side",
        description="Print a Markdown table with one column per report (put the dense model first).",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", nargs="+", type=Path, metavar="REPORT.json", help="files written by eval --json")
    parser.add_argument("--out", type=Path, default=None, metavar="report.md", help="also write the table here")
    parser.add_argument("--plots", type=Path, default=None, metavar="DIR", help="write figures (PNG) to DIR")


def run(args: argparse.Namespace) -> int:
    """Print (and optionally write) the side-by-side table of saved reports."""
    from slimgpt.evaluation.evaluate import report_plots
    from slimgpt.evaluation.report import EvalReport, compare

    if args.out is not None:
        common.check_output_file(args.out, "--out")
    reports = [EvalReport.load(path) for path in args.reports]
    table = compare(reports)
    if args.out is not None:
        write_atomic(args.out, table)
        logger.info("table written to %s", args.out)
    if args.plots is not None:
        for path in report_plots(reports, args.plots):
            logger.info("plot written to %s", path)
    print(table)
    return 0
