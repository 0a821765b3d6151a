"""One rank of the two-process runs of tests/layerwise/test_distributed.py (launched with torchrun's variables).

Usage: RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python distributed_worker.py ROOT

ROOT holds ``dense`` (the model), ``calib.txt`` and ``args.json`` (the CLI options); the runs write under
ROOT/run: the in-memory and the streamed CLI runs, a run stopped after layer 0 and a streamed run that
crashes after layer 0 (their checkpoints; the first is also kept as ``kept.checkpoint``), and the CLI
resuming them. Every rank records the writes it attempts under ROOT (Python's audit events) in
ROOT/writes-rank<r>.json.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

import slimgpt.layerwise.distributed as distributed
from slimgpt.cli import main as cli_main
from slimgpt.config import PruneConfig
from slimgpt.layerwise.run import LayerHooks
from slimgpt.models.slim import load_model
from slimgpt.prune import prune_model
from slimgpt.streaming import stream_prune

WRITE_EVENTS = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "shutil.copyfile",
                "shutil.copytree", "tempfile.mkdtemp", "tempfile.mkstemp", "os.truncate", "os.symlink")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def record_writes(root: Path, writes: list[str]) -> None:
    """Every attempt to write, move or delete a file under ``root`` goes into ``writes``."""
    prefix = str(root.resolve())

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and args and isinstance(args[0], (str, Path)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
            if writing and os.path.abspath(args[0]).startswith(prefix):
                writes.append(f"open {args[0]} {mode} {flags}")
        elif (event in WRITE_EVENTS and args and isinstance(args[0], (str, Path))
              and os.path.abspath(args[0]).startswith(prefix)):
            writes.append(f"{event} {args[0]}")

    sys.addaudithook(hook)


class Crash(LayerHooks):
    def after(self, index: int, layer: Any) -> None:
        raise RuntimeError("simulated crash")


def main(root: Path) -> None:
    options = json.loads((root / "args.json").read_text())
    run = root / "run"
    writes: list[str] = []
    with distributed.launched("cpu", timeout_s=60) as group:
        assert group is not None and group.world_size == 2
        record_writes(root, writes)  # rank 0's list shows that the hook sees the writes
        base = ["prune", str(root / "dense"), *options]
        # rank 0 alone checks the output (it exists here): every rank fails with its one-line error, at once
        assert cli_main([*base, "-o", str(root / "dense")]) == 2
        assert cli_main([*base, "-o", str(run / "memory")]) == 0
        assert cli_main([*base, "-o", str(run / "stream"), "--stream"]) == 0
        # A run stopped after layer 0 leaves its checkpoint (rank 0 writes it from every rank's windows).
        model, tokenizer = load_model(str(root / "dense"), device="cpu")
        config = PruneConfig.from_dict(json.loads((root / "prune-config.json").read_text()))
        prune_model(model, config, tokenizer=tokenizer, checkpoint_dir=run / "stopped.checkpoint",
                    stop_after_layer=0, progress=False)
        try:  # a streamed run that crashes after layer 0 (on every rank) leaves its checkpoint, no output
            stream_prune(root / "dense", config, run / "crashed", checkpoint_dir=run / "stream-stopped.checkpoint",
                         progress=False, layer_hooks=Crash())
        except RuntimeError as error:
            assert "simulated crash" in str(error)
        if group.rank == 0:
            shutil.copytree(run / "stopped.checkpoint", run / "kept.checkpoint")
        dist.barrier()
        assert cli_main([*base, "-o", str(run / "resumed"), "--resume", "--checkpoint-dir",
                         str(run / "stopped.checkpoint")]) == 0
        assert cli_main([*base, "-o", str(run / "stream-resumed"), "--stream", "--resume", "--checkpoint-dir",
                         str(run / "stream-stopped.checkpoint")]) == 0
        dist.barrier()
    seen = json.dumps(writes)  # before this file's own write, which the hook records too
    (root / f"writes-rank{os.environ['RANK']}.json").write_text(seen)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
