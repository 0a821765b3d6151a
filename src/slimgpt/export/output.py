"""Copying support files into an export; the atomic writers live in slimgpt._util.files."""

from __future__ import annotations

import shutil
from pathlib import Path

from slimgpt._util.files import check_file_output, replace_text, write_atomic_file

__all__ = ["check_file_output", "copy_files", "replace_text", "write_atomic_file"]


def copy_files(files: list[Path], directory: Path) -> None:
    for file in files:
        shutil.copy2(file, directory / file.name)
