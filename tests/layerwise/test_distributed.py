"""Pruning across processes (slimgpt.layerwise.distributed): two CPU ranks (gloo) prune the same model as one
process, only rank 0 writes, and --stream and --resume work; the sharding and the single-process no-ops.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import slimgpt.layerwise.distributed as distributed
from conftest import TEXT, make_model
from slimgpt import PruneConfig, prune_model
from slimgpt.cli import main as cli_main
from slimgpt.errors import ConfigError, DataError
from slimgpt.layerwise.checkpoint import Checkpoint
from slimgpt.models.slim import load_model
from slimgpt.solver.hessian import InputStatistics

WORKER = Path(__file__).with_name("distributed_worker.py")
SRC = Path(__file__).resolve().parents[2] / "src"
OPTIONS = ["--ratio", "0.35", "--nsamples", "7", "--seqlen", "32", "--batch-size", "2", "--device", "cpu"]
CONFIG = {"ratio": 0.35, "nsamples": 7, "seqlen": 32, "batch_size": 2, "device": "cpu"}


def test_shard_bounds_are_contiguous_and_balanced() -> None:
    for n in range(1, 12):
        for world in range(1, n + 1):
            bounds = distributed.shard_bounds(n, world)
            sizes = [b.stop - b.start for b in bounds]
            assert [i for b in bounds for i in range(b.start, b.stop)] == list(range(n))  # every window once, in order
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_single_process_is_a_no_op() -> None:
    assert distributed.current() is None and distributed.world_size() == 1 and distributed.is_main()
    windows = torch.arange(12).view(6, 2)
    with distributed.joined() as group:  # no process group: nothing changes
        assert group is None
        assert distributed.shard(windows) is windows
        assert distributed.gather_windows(windows, 6) is windows
        assert distributed.broadcast_object({"a": 1}) == {"a": 1}
        assert distributed.from_main(lambda: 7) == 7
        assert distributed.all_agree(lambda: 3, lambda v: v, "a value") == 3
        method = object()
        assert distributed.solve_on_main(method, ("prune_attention",)) is method
        stats = InputStatistics(4, "cpu")
        stats.add(torch.randn(5, 4))
        before = (stats.second_moment.clone(), stats.sum.clone(), stats.tokens)
        distributed.reduce_statistics(stats)
        assert torch.equal(stats.second_moment, before[0]) and torch.equal(stats.sum, before[1])
        assert stats.tokens == before[2]
    with pytest.raises(ConfigError, match="--device cuda"):
        distributed.check_launch_device("cuda:1", 2)
    distributed.check_launch_device("cuda:1", 1)  # one process: any device


def test_distributed_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Methods that cannot shard refuse in one line before any work; too few windows for the ranks too."""
    from slimgpt.methods import get_method
    from slimgpt.prune import cannot_distribute

    for name in ("slicegpt", "dynamic-slicing", "modegpt", "llm-pruner", "disp-llm"):
        assert name in cannot_distribute(get_method(PruneConfig(method=name)))
    for name in ("slimgpt", "wanda-sp", "flap", "fasp", "magnitude", "prunenet", "dotresize"):
        assert cannot_distribute(get_method(PruneConfig(method=name))) == ""
    monkeypatch.setattr(distributed, "_GROUP", distributed.Group(0, 4, torch.device("cpu")))
    with pytest.raises(DataError, match="--nsamples 4"):
        distributed.check_shardable(3)
    with pytest.raises(ConfigError, match="in one process"):
        prune_model(make_model("llama"), PruneConfig(method="slicegpt", ratio=0.2), torch.zeros(4, 8, dtype=torch.long))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(root: Path, world: int = 2) -> list[subprocess.Popen[str]]:
    """Start ``world`` ranks of the worker, with the variables torchrun and accelerate launch set."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=f"{SRC}{os.pathsep}{WORKER.parent}",
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(root)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def _wait(procs: list[subprocess.Popen[str]]) -> None:
    """Every rank finished with status 0 (else its output's tail); a rank still running after 4 min fails."""
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        outputs.append(out)
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _assert_same_model(folder: Path, reference: Path) -> None:
    """Same kept heads and channels, same shapes, weights equal relative to each tensor's scale."""
    ours, theirs = (json.loads((f / "slimgpt_report.json").read_text()) for f in (folder, reference))
    for key in ("kept_heads", "kept_channels"):
        assert [r[key] for r in ours["layers"]] == [r[key] for r in theirs["layers"]], key
    a, b = _weights(folder), _weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        scale = b[name].float().abs().max().clamp_min(1e-12)
        assert float((a[name].float() - b[name].float()).abs().max() / scale) < 1e-4, name


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of TEXT: the same ids in every session (a trained BPE's merges can vary, and
    with them the calibration windows)."""
    vocab = {"<unk>": 0, "<eos>": 1} | {c: i + 2 for i, c in enumerate(sorted(set(TEXT)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's runs with two ranks, and the same runs in this process (one rank) under ROOT/single."""
    root = tmp_path_factory.mktemp("distributed")
    model: Any = make_model("llama")
    model.save_pretrained(root / "dense", max_shard_size="50KB")  # sharded, so --stream streams
    _char_tokenizer().save_pretrained(root / "dense")
    (root / "calib.txt").write_text(TEXT * 40)
    options = [*OPTIONS, "--calib", str(root / "calib.txt")]
    (root / "args.json").write_text(json.dumps(options))
    config = dict(CONFIG, calib=str(root / "calib.txt"))
    (root / "prune-config.json").write_text(json.dumps(config))
    procs = _launch(root)  # the two ranks run while this process makes the single-process references
    assert cli_main(["prune", str(root / "dense"), *options, "-o", str(root / "single" / "memory")]) == 0
    dense, tok = load_model(str(root / "dense"), device="cpu")
    prune_model(dense, PruneConfig.from_dict(config), tokenizer=tok, checkpoint_dir=root / "single" / "stopped",
                stop_after_layer=0, progress=False)
    _wait(procs)
    return root


@pytest.mark.parametrize("run", ["memory", "stream", "resumed", "stream-resumed"])
def test_two_ranks_prune_the_same_model(two_ranks: Path, run: str) -> None:
    _assert_same_model(two_ranks / "run" / run, two_ranks / "single" / "memory")
    report = json.loads((two_ranks / "run" / run / "slimgpt_report.json").read_text())
    assert report["calibration"]["world_size"] == 2 and report["calibration"]["nsamples"] == 7


def test_two_ranks_checkpoint_equals_one_process(two_ranks: Path) -> None:
    """Rank 0 checkpoints every rank's windows: the same activations as one process, within float rounding."""
    ours = Checkpoint(two_ranks / "run" / "kept.checkpoint").stream()["hidden"]
    theirs = Checkpoint(two_ranks / "single" / "stopped").stream()["hidden"]
    assert ours.shape == theirs.shape == (7, 32, 64)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-4
    assert not (two_ranks / "run" / "resumed.checkpoint").exists()  # removed after success by rank 0


def test_only_rank_zero_writes(two_ranks: Path) -> None:
    assert json.loads((two_ranks / "writes-rank1.json").read_text()) == []
    assert any("memory" in w for w in json.loads((two_ranks / "writes-rank0.json").read_text()))  # the hook works
    # the resumed runs removed their checkpoints; the crashed streamed run left no output
    assert sorted(p.name for p in (two_ranks / "run").iterdir()) == [
        "kept.checkpoint", "memory", "resumed", "stream", "stream-resumed"]
