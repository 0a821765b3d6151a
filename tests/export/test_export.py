"""Exports for runtimes without slimgpt: remote code, zero-padded stock configs, GGUF for llama.cpp."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import slimgpt
from conftest import calibration, make_model, probe
from slimgpt.cli import main
from slimgpt.errors import OutputExistsError, SlimGPTError, UnsupportedModelError
from slimgpt.export import export_gguf, export_padded, export_remote_code
from slimgpt.export.gguf import rope_interleave
from slimgpt.export.padded import place_heads
from slimgpt.models.adapters import LayerSizes

# name -> (family of conftest.make_model, PruneConfig overrides)
CASES = {
    "llama": ("llama", {}),
    "llama-gqa": ("llama-gqa", {"gqa_policy": "kv-group"}),
    "mistral": ("mistral", {"gqa_policy": "query-heads"}),
    "qwen2": ("qwen2", {"gqa_policy": "query-heads"}),
    "opt": ("opt", {}),
    "qwen2-flap": ("qwen2", {"method": "flap"}),  # output biases, which stock Qwen2 cannot hold
}
LLAMA_LIKE = [name for name in CASES if name != "opt"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> dict[str, Path]:
    """One pruned folder per case (ratio 0.5), saved by slimgpt.save_pruned."""
    root = tmp_path_factory.mktemp("pruned")
    folders = {}
    for name, (family, overrides) in CASES.items():
        model = make_model(family)
        config = slimgpt.PruneConfig(ratio=0.5, nsamples=8, seqlen=32, **overrides)  # type: ignore[arg-type]
        report = slimgpt.prune_model(model, config, calibration(), progress=False)
        folders[name] = slimgpt.save_pruned(model, tokenizer, report, root / name)
    return folders


def _pruned_logits(folder: Path) -> torch.Tensor:
    model, _ = slimgpt.load_pruned(folder)
    with torch.no_grad():
        return model(probe()).logits


def _widths(folder: Path) -> list[LayerSizes]:
    config = json.loads((folder / "config.json").read_text())
    return [LayerSizes(h, k, f) for h, k, f in zip(config["layer_num_attention_heads"],
                                                   config["layer_num_key_value_heads"],
                                                   config["layer_intermediate_sizes"], strict=True)]


# --- remote code ----------------------------------------------------------------------------------

# Runs in a fresh interpreter in which `import slimgpt` fails: only torch and transformers are usable.
BLOCKED_LOADER = textwrap.dedent("""
    import json, sys
    class BlockSlimgpt:
        def find_spec(self, name, path=None, target=None):
            if name == "slimgpt" or name.startswith("slimgpt."):
                raise ImportError("slimgpt is not installed here")
    sys.meta_path.insert(0, BlockSlimgpt())
    try:
        import slimgpt
    except ImportError:
        pass
    else:
        raise SystemExit("slimgpt was importable")
    import torch
    from transformers import AutoModelForCausalLM
    folders, tokens, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
    results = {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            cache = model(tokens, use_cache=True).past_key_values
            results[name] = {"logits": model(tokens).logits, "class": type(model).__name__,
                             "kv": [layer.keys.shape[1] for layer in cache.layers]}
    assert not [m for m in sys.modules if m.split(".")[0] == "slimgpt"]
    torch.save(results, out)
""")


def test_remote_code_loads_without_slimgpt(pruned: dict[str, Path], tmp_path: Path) -> None:
    exported = {name: str(export_remote_code(folder, tmp_path / name)) for name, folder in pruned.items()}
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = tmp_path / "logits.pt"
    # -I: isolated mode (no PYTHONPATH, no user site, script dir not on sys.path); the blocker does the rest.
    result = subprocess.run([sys.executable, "-I", "-c", BLOCKED_LOADER, json.dumps(exported),
                             json.dumps(probe().tolist()), str(out)],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    results = torch.load(out)
    for name, folder in pruned.items():
        assert results[name]["class"].startswith("Slim")
        assert torch.allclose(results[name]["logits"], _pruned_logits(folder), atol=1e-5), name
        if name != "opt":  # the KV cache has each layer's own KV-head count
            assert results[name]["kv"] == [w.n_kv_heads for w in _widths(folder)]
        # The exported copy still loads with slimgpt (which ignores the auto_map) and gives the same logits.
        assert torch.allclose(_pruned_logits(Path(exported[name])), results[name]["logits"], atol=1e-5)


def test_remote_code_in_place_keeps_slimgpt_loading(pruned: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(pruned["llama-gqa"], tmp_path / "inplace"))
    before = _pruned_logits(folder)
    assert export_remote_code(folder) == folder
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_slimgpt.SlimLlamaConfig",
                                  "AutoModelForCausalLM": "modeling_slimgpt.SlimLlamaForCausalLM"}
    assert config["model_type"] == "slimgpt_llama"
    for name in ("configuration_slimgpt.py", "modeling_slimgpt.py"):
        source = (folder / name).read_text()
        assert "slimgpt." not in source.replace("configuration_slimgpt", "").replace("modeling_slimgpt", "")
    assert "trust_remote_code=True" in (folder / "README.md").read_text()
    assert torch.equal(_pruned_logits(folder), before)
    export_remote_code(folder)  # idempotent
    assert (folder / "README.md").read_text().count("Loading without slimgpt") == 1


def test_remote_code_refusals(pruned: dict[str, Path], tmp_path: Path) -> None:
    dense = tmp_path / "dense"
    cast(Any, make_model("llama")).save_pretrained(dense)
    with pytest.raises(SlimGPTError, match="stock transformers type"):
        export_remote_code(dense)
    no_heads = _drop_heads(pruned["llama-gqa"], tmp_path / "no-heads", layer=1)
    with pytest.raises(SlimGPTError, match="layer 1 has 0 heads"):
        export_remote_code(no_heads, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(OutputExistsError):
        export_remote_code(pruned["llama"], no_heads)


# --- zero padding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_padded_is_stock_and_exact(pruned: dict[str, Path], name: str, tmp_path: Path) -> None:
    folder = pruned[name]
    out = export_padded(folder, tmp_path / "padded")
    config = json.loads((out / "config.json").read_text())
    assert not set(config) & {"layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes",
                              "layer_output_bias", "auto_map"}
    family = CASES[name][0].removesuffix("-gqa")
    expected_type = "llama" if name == "qwen2-flap" else family
    assert config["model_type"] == expected_type
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__module__.startswith("transformers.models.")
    dense = make_model(CASES[name][0])
    assert sum(p.numel() for p in model.parameters()) >= sum(p.numel() for p in dense.parameters())
    if name != "qwen2-flap":  # same widths as the dense model of the same family
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in dense.parameters())
    with torch.no_grad():
        assert torch.allclose(model(probe()).logits, _pruned_logits(folder), atol=1e-5)
    assert (out / "tokenizer.json").exists()
    assert "as large and as slow as the dense" in (out / "README.md").read_text()


def _check_placement(sizes: LayerSizes, n_heads: int, n_kv_heads: int) -> None:
    placement = place_heads(sizes, n_heads, n_kv_heads)
    assert placement is not None
    assert len(placement.kv_sources) == n_kv_heads
    if sizes.n_heads == 0:
        assert placement.query_slots == [] and set(placement.kv_sources) == {-1}
        return
    group, g = n_heads // n_kv_heads, sizes.n_heads // sizes.n_kv_heads
    assert len(set(placement.query_slots)) == sizes.n_heads  # distinct slots
    for head, slot in enumerate(placement.query_slots):
        assert placement.kv_sources[slot // group] == head // g  # reads its own KV head


@pytest.mark.parametrize(("sizes", "stock"), [
    (LayerSizes(4, 1, 8), (8, 2)),  # kv-group pruning: whole groups kept
    (LayerSizes(6, 2, 8), (8, 2)),  # query-heads pruning: every group shrinks alike
    (LayerSizes(3, 3, 8), (4, 4)),  # MHA
    (LayerSizes(8, 2, 8), (8, 4)),  # more query heads per KV head than the stock group: KV copies
    (LayerSizes(0, 0, 8), (8, 2)),  # no heads
])
def test_head_placement(sizes: LayerSizes, stock: tuple[int, int]) -> None:
    _check_placement(sizes, *stock)


def test_head_placement_that_cannot_fit() -> None:
    assert place_heads(LayerSizes(10, 2, 8), 12, 3) is None  # 2 KV heads x 2 copies > 3 slots
    _check_placement(LayerSizes(10, 2, 8), 12, 12)  # the fallback: one KV slot per query head


def test_padded_copies_kv_heads_when_groups_grow(tmp_path: Path) -> None:
    """A layer with more query heads per KV head than the stock group: exact with copied KV heads."""
    dense: Any = make_model("llama-gqa")  # 8 heads, 2 KV heads, every layer
    dense.save_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    # Declare a stock config of 8 heads / 4 KV heads (group 2) whose layers all have 8 / 2 (group 4).
    config.update(model_type="slimgpt_llama", num_key_value_heads=4, layer_num_attention_heads=[8] * 3,
                  layer_num_key_value_heads=[2] * 3, layer_intermediate_sizes=[96] * 3)
    (tmp_path / "dense" / "config.json").write_text(json.dumps(config))
    out = export_padded(tmp_path / "dense", tmp_path / "padded")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_key_value_heads == 4
    with torch.no_grad():
        assert torch.allclose(model(probe()).logits, dense(probe()).logits, atol=1e-5)


# --- layers that lost every head or every channel -------------------------------------------------

def _edit(source: Path, target: Path, layer: int, edit_tensors: Callable[[dict[str, torch.Tensor], str], None],
          widths: dict[str, int]) -> Path:
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    edit_tensors(tensors, f"model.layers.{layer}.")
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    for key, value in widths.items():
        config[key][layer] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


def _drop_heads(source: Path, target: Path, layer: int) -> Path:
    def edit(tensors: dict[str, torch.Tensor], prefix: str) -> None:
        for role in ("q", "k", "v"):
            for kind in ("weight", "bias"):
                name = f"{prefix}self_attn.{role}_proj.{kind}"
                if name in tensors:
                    tensors[name] = tensors[name][:0].clone()
        tensors[f"{prefix}self_attn.o_proj.weight"] = tensors[f"{prefix}self_attn.o_proj.weight"][:, :0].clone()

    return _edit(source, target, layer, edit, {"layer_num_attention_heads": 0, "layer_num_key_value_heads": 0})


def _drop_channels(source: Path, target: Path, layer: int) -> Path:
    def edit(tensors: dict[str, torch.Tensor], prefix: str) -> None:
        for role in ("gate", "up"):
            tensors[f"{prefix}mlp.{role}_proj.weight"] = tensors[f"{prefix}mlp.{role}_proj.weight"][:0].clone()
        tensors[f"{prefix}mlp.down_proj.weight"] = tensors[f"{prefix}mlp.down_proj.weight"][:, :0].clone()

    return _edit(source, target, layer, edit, {"layer_intermediate_sizes": 0})


def _reference_logits(folder: Path, no_heads: Sequence[int] = (), no_channels: Sequence[int] = ()) -> torch.Tensor:
    """The pruned model with those layers' attention / FFN outputs zeroed: what removing them all computes."""
    model, _ = slimgpt.load_pruned(folder)
    layers = model.model.layers
    with torch.no_grad():
        for index in no_heads:
            layers[index].self_attn.o_proj.weight.zero_()
        for index in no_channels:
            layers[index].mlp.down_proj.weight.zero_()
        return model(probe()).logits


@pytest.fixture(scope="module")
def emptied(pruned: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """qwen2 folders where layer 0 / layer 1 lost every head, and layer 2 every FFN channel."""
    root = tmp_path_factory.mktemp("emptied")
    first = _drop_heads(pruned["qwen2"], root / "no-heads-0", layer=0)
    middle = _drop_heads(pruned["qwen2"], root / "no-heads-1", layer=1)
    return {"no-heads-0": first, "no-heads-1": middle,
            "no-channels-2": _drop_channels(middle, root / "no-channels-2", layer=2)}


EMPTIED = {"no-heads-0": ([0], []), "no-heads-1": ([1], []), "no-channels-2": ([1], [2])}


@pytest.mark.parametrize("name", list(EMPTIED))
def test_padded_handles_empty_layers(pruned: dict[str, Path], emptied: dict[str, Path], name: str,
                                     tmp_path: Path) -> None:
    no_heads, no_channels = EMPTIED[name]
    model = AutoModelForCausalLM.from_pretrained(export_padded(emptied[name], tmp_path / "padded")).eval()
    with torch.no_grad():
        logits = model(probe()).logits
    assert torch.allclose(logits, _reference_logits(pruned["qwen2"], no_heads, no_channels), atol=1e-5)


# --- GGUF -----------------------------------------------------------------------------------------

def _field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def _tensors(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


def _as_torch(tensor: gguf.ReaderTensor) -> torch.Tensor:
    # GGUF lists dims fastest-first; the data is in row-major HF order ([out, in]).
    return torch.from_numpy(np.array(tensor.data, dtype=np.float32)).reshape(list(reversed(tensor.shape.tolist())))


@pytest.mark.parametrize("name", LLAMA_LIKE)
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_gguf_metadata_and_tensors(pruned: dict[str, Path], name: str, outtype: str, tmp_path: Path) -> None:
    folder = pruned[name]
    result = export_gguf(folder, tmp_path / "model.gguf", outtype=outtype)
    reader = gguf.GGUFReader(result.path)
    config = json.loads((folder / "config.json").read_text())
    widths = _widths(folder)
    hd = config["head_dim"]
    assert _field(reader, "general.architecture") == "deci"
    assert _field(reader, "deci.block_count") == len(widths)
    assert _field(reader, "deci.attention.head_count") == [w.n_heads for w in widths]
    assert _field(reader, "deci.attention.head_count_kv") == [w.n_kv_heads for w in widths]
    assert _field(reader, "deci.feed_forward_length") == [w.ffn_dim for w in widths]
    assert _field(reader, "deci.attention.key_length") == _field(reader, "deci.rope.dimension_count") == hd
    assert _field(reader, "deci.embedding_length") == config["hidden_size"]
    assert _field(reader, "deci.vocab_size") == config["vocab_size"]
    assert _field(reader, "general.file_type") == (1 if outtype == "f16" else 0)
    if name == "mistral":  # its 64-token window is shorter than its context; deci has no sliding window
        assert len(result.notes) == 1 and "sliding window of 64 tokens" in result.notes[0]
    else:
        assert result.notes == []
    tensors = _tensors(reader)
    source = load_file(folder / "model.safetensors")
    for i, w in enumerate(widths):
        assert tensors[f"blk.{i}.attn_q.weight"].shape.tolist() == [config["hidden_size"], w.n_heads * hd]
        assert tensors[f"blk.{i}.attn_k.weight"].shape.tolist() == [config["hidden_size"], w.n_kv_heads * hd]
        assert tensors[f"blk.{i}.attn_output.weight"].shape.tolist() == [w.n_heads * hd, config["hidden_size"]]
        assert tensors[f"blk.{i}.ffn_down.weight"].shape.tolist() == [w.ffn_dim, config["hidden_size"]]
        expected_type = gguf.GGMLQuantizationType.F16 if outtype == "f16" else gguf.GGMLQuantizationType.F32
        assert tensors[f"blk.{i}.ffn_up.weight"].tensor_type == expected_type
        assert tensors[f"blk.{i}.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        # q / k rows are RoPE-interleaved; undoing that gives the saved weights back.
        q = _as_torch(tensors[f"blk.{i}.attn_q.weight"])
        unpermuted = q.reshape(w.n_heads, hd // 2, 2, -1).transpose(1, 2).reshape(q.shape)
        tol = 1e-3 if outtype == "f16" else 0.0
        assert torch.allclose(unpermuted, source[f"model.layers.{i}.self_attn.q_proj.weight"], atol=tol, rtol=tol)
        assert torch.allclose(_as_torch(tensors[f"blk.{i}.ffn_gate.weight"]),
                              source[f"model.layers.{i}.mlp.gate_proj.weight"], atol=tol, rtol=tol)
    has_bias = name.startswith("qwen2")
    assert ("blk.0.attn_q.bias" in tensors) == has_bias
    assert ("blk.0.attn_output.bias" in tensors) == (name == "qwen2-flap")
    assert ("blk.0.ffn_down.bias" in tensors) == (name == "qwen2-flap")
    assert ("output.weight" in tensors) == ("lm_head.weight" in source)


def test_gguf_tokenizer(pruned: dict[str, Path], tmp_path: Path) -> None:
    folder = pruned["llama"]
    reader = gguf.GGUFReader(export_gguf(folder, tmp_path / "m.gguf", outtype="f32").path)
    spec = json.loads((folder / "tokenizer.json").read_text())
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == json.loads((folder / "config.json").read_text())["vocab_size"]
    for token, index in spec["model"]["vocab"].items():
        assert tokens[index] == token
    merges = _field(reader, "tokenizer.ggml.merges")
    assert merges == [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    assert tokens[eos] == "<eos>"
    assert _field(reader, "tokenizer.ggml.token_type")[eos] == gguf.TokenType.CONTROL
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False  # the HF tokenizer adds none


def test_gguf_empty_layers(emptied: dict[str, Path], tmp_path: Path) -> None:
    # Layer 1 without heads: attention-free (no attention tensors at all).
    middle = export_gguf(emptied["no-heads-1"], tmp_path / "a.gguf", outtype="f32")
    reader = gguf.GGUFReader(middle.path)
    assert _field(reader, "deci.attention.head_count")[1] == 0
    assert _field(reader, "deci.attention.head_count_kv")[1] == 0
    assert not [n for n in _tensors(reader) if n.startswith("blk.1.attn")]
    assert any("layer 1 has no heads" in note for note in middle.notes)
    # Layer 0 without heads: llama.cpp reads the head size from layer 0, so it gets one zero head.
    first = export_gguf(emptied["no-heads-0"], tmp_path / "b.gguf", outtype="f32")
    reader = gguf.GGUFReader(first.path)
    assert _field(reader, "deci.attention.head_count")[0] == 1
    tensors = _tensors(reader)
    assert not _as_torch(tensors["blk.0.attn_output.weight"]).any()
    assert first.layers[0].pad_heads == 1
    # Layer 2 without FFN channels but with heads: one zero channel (llama.cpp would skip the layer).
    last = export_gguf(emptied["no-channels-2"], tmp_path / "c.gguf", outtype="f32")
    reader = gguf.GGUFReader(last.path)
    assert _field(reader, "deci.feed_forward_length")[2] == 1
    assert not _as_torch(_tensors(reader)["blk.2.ffn_down.weight"]).any()


def test_gguf_refusals(pruned: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="OPT"):
        export_gguf(pruned["opt"], tmp_path / "opt.gguf")
    (tmp_path / "exists.gguf").write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        export_gguf(pruned["llama"], tmp_path / "exists.gguf")
    assert (tmp_path / "exists.gguf").read_bytes() == b"x"
    assert not list(tmp_path.glob(".*partial*"))


def test_rope_interleave_pairs_rotated_features() -> None:
    rows = torch.arange(8.0).repeat(2)[:, None]  # 2 heads of head_dim 8: rows 0..7 each
    out = rope_interleave(rows, 8).flatten().tolist()
    assert out[:8] == [0, 4, 1, 5, 2, 6, 3, 7] and out[8:] == out[:8]


def test_cli_export(pruned: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = pruned["llama-gqa"]
    assert main(["export", str(folder), "--format", "gguf", "--output", str(tmp_path / "m.gguf"),
                 "--outtype", "f32"]) == 0
    assert (tmp_path / "m.gguf").exists()
    assert main(["export", str(folder), "--format", "llama-padded", "-o", str(tmp_path / "padded")]) == 0
    assert (tmp_path / "padded" / "config.json").exists()
    assert main(["export", str(folder), "--format", "llama-padded"]) == 2  # no --output
    assert main(["export", str(folder), "--format", "llama-padded", "-o", str(tmp_path / "padded")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


# --- llama.cpp itself (optional: needs llama-cpp-python, which CI does not build) ------------------

@pytest.mark.parametrize("name", ["llama-gqa", "qwen2", "qwen2-flap", "no-heads-1", "no-heads-0", "no-channels-2"])
def test_llama_cpp_matches_pytorch(pruned: dict[str, Path], emptied: dict[str, Path], name: str,
                                   tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from slimgpt.export.llama_cpp import llama_cpp_logits

    folder = {**pruned, **emptied}[name]
    path = export_gguf(folder, tmp_path / "m.gguf", outtype="f32").path
    tokens = probe()
    logits = llama_cpp_logits(path, tokens)
    reference = _reference_logits(pruned["qwen2"], *EMPTIED[name]) if name in EMPTIED else _pruned_logits(folder)
    assert torch.allclose(logits, reference, atol=1e-3), (logits - reference).abs().max()
