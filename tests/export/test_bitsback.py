"""Bits-back export of sliced checkpoints (slimgpt.export.bitsback, slimgpt.solver.haar): exact round trip,
smaller than safetensors, one-line errors, atomic outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import slimgpt
from conftest import calibration, make_model, probe
from slimgpt.cli import main
from slimgpt.cli.eval import decoded_model
from slimgpt.errors import OutputExistsError, SlimGPTError
from slimgpt.export import bitsback
from slimgpt.export.bitsback_codec import constriction_module, new_coder, pop_rotation, push_rotation
from slimgpt.export.bitsback_layout import NotSlicedError, plan_layout
from slimgpt.export.checkpoint import read_checkpoint
from slimgpt.models.families import FAMILIES
from slimgpt.solver import haar

pytest.importorskip("constriction")

# name -> (family of conftest.make_model, method, dtype of the saved weights)
CASES = {"slicegpt": ("llama", "slicegpt", torch.float32), "dynamic": ("llama-gqa", "dynamic-slicing", torch.float32),
         "slicegpt-bf16": ("opt", "slicegpt", torch.bfloat16)}


@pytest.fixture(scope="module")
def sliced(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sliced")
    folders = {}
    for name, (family, method, dtype) in CASES.items():
        model = make_model(family)
        config = slimgpt.PruneConfig(method=method, ratio=0.3, nsamples=8, seqlen=32)  # type: ignore[arg-type]
        report = slimgpt.prune_model(model, config, calibration(), progress=False)
        folders[name] = slimgpt.save_pruned(model.to(dtype), tokenizer, report, root / name)
    dense = make_model("llama")
    report = slimgpt.prune_model(dense, slimgpt.PruneConfig(ratio=0.3, nsamples=8, seqlen=32), calibration(),
                                 progress=False)
    folders["slimgpt"] = slimgpt.save_pruned(dense, tokenizer, report, root / "slimgpt")
    return folders


@pytest.fixture(scope="module")
def exported(sliced: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bitsback")
    return {name: bitsback.export_bits_back(sliced[name], root / name)[0] for name in CASES}


def _logits(folder: Path) -> torch.Tensor:
    model, _ = slimgpt.load_pruned(folder)
    with torch.no_grad():
        return model.float()(probe()).logits


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_identical(name: str, sliced: dict[str, Path], exported: dict[str, Path]) -> None:
    """Decoding gives the encoder's tensors bit for bit; unrotated ones (lm_head, final norm) are the input's."""
    saved = read_checkpoint(sliced[name])
    layout = plan_layout(saved.config, FAMILIES[saved.family], saved.tensors)
    header, _ = bitsback.read_file(exported[name] / bitsback.FILE)
    _, moved, _ = bitsback.encode(saved.tensors, layout, int(header["angle_bits"]))
    _, decoded = bitsback.load_bits_back(exported[name])
    assert set(decoded) == set(saved.tensors)
    for key, tensor in decoded.items():
        assert tensor.dtype == moved[key].dtype and torch.equal(tensor.view(torch.uint8), moved[key].view(torch.uint8))
    for key in layout.members(-1):
        assert torch.equal(decoded[key], saved.tensors[key])
    assert not torch.equal(decoded[layout.designated(0)[0][0]], saved.tensors[layout.designated(0)[0][0]])


@pytest.mark.parametrize("name", list(CASES))
def test_decoded_model_has_the_same_logits(name: str, sliced: dict[str, Path], exported: dict[str, Path],
                                           tmp_path: Path) -> None:
    first = bitsback.decode_to_folder(exported[name], tmp_path / "a")
    second = bitsback.decode_to_folder(exported[name] / bitsback.FILE, tmp_path / "b")
    logits, reference = _logits(first), _logits(sliced[name])
    assert torch.equal(logits, _logits(second))
    eps = torch.finfo(CASES[name][2]).eps
    assert (logits - reference).abs().max() <= 50 * eps * reference.abs().max()


@pytest.mark.parametrize("name", list(CASES))
def test_smaller_than_safetensors(name: str, sliced: dict[str, Path], exported: dict[str, Path]) -> None:
    summary = json.loads((exported[name] / "bits_back.json").read_text())
    size = (exported[name] / bitsback.FILE).stat().st_size
    assert summary["bitsback_bytes"] == size < summary["safetensors_bytes"] == (sliced[name] / "model.safetensors"
                                                                                 ).stat().st_size
    assert summary["rotation_bits_returned"] > summary["correction_bits"] + 8 * summary["header_bytes"] // 4
    assert "smaller" in (exported[name] / "bits_back.md").read_text()


def test_cli_export_and_eval_hook(sliced: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bb"
    assert main(["export", str(sliced["slicegpt"]), "--format", "bits-back", "--output", str(out)]) == 0
    assert "below safetensors" in capsys.readouterr().out
    assert main(["export", str(sliced["slicegpt"]), "--format", "bits-back", "--output", str(out)]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    with pytest.raises(OutputExistsError):
        bitsback.export_bits_back(sliced["slicegpt"], out)
    assert main(["export", str(sliced["slicegpt"]), "--format", "bits-back", "--output", str(out), "--overwrite",
                 "--angle-bits", "16"]) == 0
    assert json.loads((out / "bits_back.json").read_text())["angle_bits"] == 16
    with decoded_model(str(out)) as folder:
        assert torch.allclose(_logits(Path(folder)), _logits(sliced["slicegpt"]), rtol=1e-4, atol=1e-4)
    with decoded_model(str(sliced["slicegpt"])) as folder:
        assert folder == str(sliced["slicegpt"])


def test_not_a_sliced_checkpoint_is_one_line(sliced: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(sliced["slimgpt"]), "--format", "bits-back", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not a sliced checkpoint" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()
    assert main(["export", str(sliced["slicegpt"]), "--format", "bits-back"]) == 2
    assert "pass --output" in capsys.readouterr().err
    with pytest.raises(NotSlicedError, match="slice_dims"):
        bitsback.export_bits_back(sliced["slimgpt"], tmp_path / "y")
    assert not (tmp_path / "y").exists()
    with pytest.raises(bitsback.CodecError, match=r"has no model\.bitsback"):
        bitsback.load_bits_back(sliced["slicegpt"])


def test_damaged_file_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "damaged"
    folder.mkdir()
    for file in exported["slicegpt"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    data = bytearray((folder / bitsback.FILE).read_bytes())
    data[-100] ^= 0x10
    (folder / bitsback.FILE).write_bytes(bytes(data))
    with pytest.raises(bitsback.CodecError) as error:
        bitsback.load_bits_back(folder)
    assert "\n" not in str(error.value)
    (folder / bitsback.FILE).write_bytes(b"not a bits-back file")
    with pytest.raises(bitsback.CodecError, match="not a slimgpt bits-back file"):
        bitsback.load_bits_back(folder)


def test_failed_export_leaves_nothing(sliced: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(bitsback, "write_file", boom)
    with pytest.raises(RuntimeError):
        bitsback.export_bits_back(sliced["slicegpt"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_constriction_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "constriction", None)
    with pytest.raises(SlimGPTError, match=r'pip install -e "\.\[bitsback\]"'):
        constriction_module()


@pytest.mark.parametrize("bits", [6, 20])
def test_haar_symbols_round_trip(bits: int) -> None:
    """Rotations popped off random bits are orthogonal, recovered exactly, and push back to the same bits."""
    d = 9
    generator = torch.Generator().manual_seed(bits)
    words = torch.randint(1, 2**31, (64,), generator=generator).numpy().astype("uint32")
    coder = new_coder(words)
    symbols = pop_rotation(coder, d, bits)
    rotation = haar.rotation_from_symbols(symbols, d, bits)
    assert torch.allclose(rotation.T @ rotation, torch.eye(d, dtype=torch.float64), atol=1e-12)
    noisy = rotation + 1e-9 * torch.randn(d, d, generator=generator, dtype=torch.float64)
    truth, delta = haar.recover_symbols(noisy, bits, truth=symbols)
    again, _ = haar.recover_symbols(noisy, bits, corrections=delta)
    assert torch.equal(truth, symbols) and torch.equal(again, symbols)
    push_rotation(coder, symbols, d, bits)
    assert (coder.get_compressed() == words).all()


def test_haar_density_of_popped_rotations() -> None:
    """Entries of rotations decoded from random bits have the Haar moments: mean 0, variance 1/d."""
    constriction_module()
    d, generator = 6, torch.Generator().manual_seed(0)
    words = torch.randint(1, 2**31, (20000,), generator=generator).numpy().astype("uint32")
    coder = new_coder(words)
    entries = torch.stack([haar.rotation_from_symbols(pop_rotation(coder, d, 10), d, 10) for _ in range(400)])
    assert abs(float(entries.mean())) < 0.02
    assert abs(float((entries**2).mean()) * d - 1) < 1e-6  # rows are unit vectors
    assert abs(float(entries[:, 0, 0].var()) * d - 1) < 0.2


def test_canonical_frame_moves_with_the_basis() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(7, 40, generator=generator, dtype=torch.float64)
    p, _ = torch.linalg.qr(torch.randn(7, 7, generator=generator, dtype=torch.float64))
    columns = haar.pivot_columns(a)
    assert torch.equal(columns, haar.pivot_columns(p.T @ a))
    frame = haar.canonical_basis(a[:, columns])
    assert torch.allclose(haar.canonical_basis((p.T @ a)[:, columns]), p.T @ frame, atol=1e-12)


def test_large_corrections_are_escaped() -> None:
    """Corrections of any size (an ill-conditioned frame at a fine grid) code and decode exactly."""
    from slimgpt.export import bitsback_codec as codec

    corrections = [torch.tensor([0, 0, 1, -1, 300, -70000, 2**27, 0]), torch.tensor([0, 5, -400])]
    table = codec.correction_table(corrections)
    coder = new_coder()
    for delta in corrections:
        codec.push_corrections(coder, delta, table)
    back = new_coder(codec.words_of(coder))
    assert torch.equal(codec.pop_corrections(back, 3, table), corrections[1])
    assert torch.equal(codec.pop_corrections(back, 8, table), corrections[0]) and back.is_empty()
