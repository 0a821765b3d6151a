"""OpenMP's wait policy on a shared CPU: a perplexity pass and a greedy decode, ACTIVE against PASSIVE.

torch's CPU kernels run on OpenMP threads. When a parallel region ends, libgomp's default (ACTIVE) keeps
the threads spinning for a while so the next region starts at once. On a machine whose cores are all
busy with another job, a spinning thread holds a core that the thread it waits for needs, and every
barrier becomes a scheduler round trip. slimgpt therefore sets ``OMP_WAIT_POLICY=PASSIVE`` before torch
loads, unless the user has set it (``slimgpt/__init__.py``). This measures both policies, each in a fresh
process (the policy is read once, when OpenMP starts), alone and next to a competitor: another process
running 2-thread float32 matmuls with the default policy, as another user's job would.

    python benchmarks/omp_wait.py --json docs/results/omp_wait.json   # ~2 min on 2 idle cores

Run it on an otherwise idle machine: the competitor is the only load it means to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CHILD = r"""
import json, sys, time, torch
from slimgpt.data import eval_windows
from slimgpt.evaluation import perplexity
from slimgpt.models.slim import load_model
torch.set_num_threads(int(sys.argv[1]))
model, tokenizer = load_model("tiny-mha", dtype="float32")
windows = eval_windows(tokenizer, "builtin", 128)[: int(sys.argv[2])]
start = time.perf_counter()
value = perplexity(model, windows, batch_size=8, progress=False)
ppl_s = time.perf_counter() - start
prompt = windows[:1, :16]
start = time.perf_counter()
with torch.no_grad():
    model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
decode_s = time.perf_counter() - start
print(json.dumps({"ppl": value, "ppl_s": ppl_s, "decode_tokens_per_s": 64 / decode_s}))
"""

COMPETITOR = r"""
import torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def run_child(policy: str, threads: int, windows: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    done = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(windows)], env=env, check=True,
                          capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=200, help="128-token windows in the perplexity pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for competitor in (False, True):
        other = None
        if competitor:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            other = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)
            time.sleep(3)
        try:
            for policy in ("ACTIVE", "PASSIVE"):
                for repeat in range(args.repeats):
                    result = run_child(policy, args.threads, args.windows)
                    rows.append({"competitor": competitor, "policy": policy, "repeat": repeat, **result,
                                 "load_average": os.getloadavg()[0]})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            if other is not None:
                other.terminate()
                other.wait()
    lines = ["| next to a 2-thread job | OMP_WAIT_POLICY | perplexity pass s | decode tokens/s |",
             "| --- | --- | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {'yes' if row['competitor'] else 'no'} | {row['policy']} | {row['ppl_s']:.2f} | "
                     f"{row['decode_tokens_per_s']:.0f} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"windows": args.windows, "threads": args.threads, "rows": rows,
                                         "cpus": os.cpu_count()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
