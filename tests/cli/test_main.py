"""The command line as a package: argparse only under slimgpt/cli, --method's help from the registry,
``python -m slimgpt``."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import slimgpt.cli as cli
import slimgpt.config as config
from slimgpt.cli import build_parser, main
from slimgpt.methods import METHODS

PACKAGE = Path(cli.__file__).resolve().parents[1]  # src/slimgpt


def imported_modules(path: Path) -> set[str]:
    """Every module an import in ``path`` names, function-level imports included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_argparse_is_imported_only_under_slimgpt_cli() -> None:
    cli_dir = PACKAGE / "cli"
    importers = [path.relative_to(PACKAGE).as_posix() for path in sorted(PACKAGE.rglob("*.py"))
                 if any(name.split(".")[0] == "argparse" for name in imported_modules(path))]
    assert importers, "the CLI itself imports argparse: the walk found nothing, so it looked in the wrong place"
    assert [name for name in importers if not (PACKAGE / name).is_relative_to(cli_dir)] == []


def test_every_registered_method_is_listed_in_prune_help_with_its_help_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--help"])
    assert exit_info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())  # the help wraps long lines
    for name, method in METHODS.items():
        assert method.help and "\n" not in method.help, f"{name}: help must be one line"
        assert f"{name}: {' '.join(method.help.split())}" in printed


def test_method_choices_are_the_configs_methods_in_the_same_order() -> None:
    prune = build_parser()._subparsers._group_actions[0].choices["prune"]  # type: ignore[union-attr]
    (method,) = [action for action in prune._actions if action.dest == "method"]
    assert set(METHODS) == set(config.METHODS)
    assert list(method.choices) == list(config.METHODS)
    assert method.default == config.PruneConfig().method


def test_subcommands_in_help_order() -> None:
    subparsers = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    assert list(subparsers.choices) == ["prune", "demo", "eval", "compare", "finetune", "export"]


def test_python_dash_m_slimgpt_runs_the_cli() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "slimgpt", "prune", "--output"], capture_output=True, text=True,
                            env=env, timeout=300, check=False)
    assert result.returncode == 2  # argparse's usage error: the same exit code as the `slimgpt` entry point
    assert result.stderr.startswith("usage: slimgpt prune")
    assert "argument --output/-o: expected one argument" in result.stderr
