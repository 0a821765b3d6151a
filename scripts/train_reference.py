"""Train slimgpt's built-in reference models (tiny-mha, tiny-gqa) on the built-in corpus.

Deterministic for a given machine and thread count: fixed seeds, a fixed step count (not a time
budget) and a fixed data order. The BPE tokenizer is trained first (once) with the `tokenizers`
library; then each model is a plain ``LlamaForCausalLM`` saved in bf16 safetensors, loadable with
``AutoModelForCausalLM.from_pretrained``. The loss curve goes to ``training.json`` beside the weights.

    python scripts/train_reference.py --model tiny-mha --out src/slimgpt/assets/models
    python scripts/train_reference.py --model tiny-gqa --out src/slimgpt/assets/models
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slimgpt import corpus

EOS = "<|endoftext|>"
VOCAB_SIZE = 4096

ARCHITECTURES = {
    # LLaMA-shaped: head_dim 32, FFN ratio 2.6875 (LLaMA-7B's 11008 / 4096), tied embeddings.
    "tiny-mha": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=8),
    "tiny-gqa": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=2),
}


def train_tokenizer(documents: list[str], out_dir: Path) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=1 << 30,
    )
    fast.save_pretrained(out_dir)
    return fast


def encode_stream(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> np.ndarray:
    ids: list[int] = []
    for ids_doc in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(ids_doc)
        ids.append(tokenizer.eos_token_id)
    return np.asarray(ids, dtype=np.int32)


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, tokens: np.ndarray, seqlen: int) -> float:
    model.eval()
    n = len(tokens) // seqlen
    windows = torch.from_numpy(tokens[: n * seqlen].astype(np.int64)).view(n, seqlen)
    total = 0.0
    for start in range(0, n, 8):
        batch = windows[start:start + 8]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch, labels=batch)
        total += out.loss.float().item() * len(batch)
    model.train()
    return total / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder that receives <model>/")
    parser.add_argument("--steps", type=int, default=650)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    documents = corpus.train_documents()
    tokenizer_dir = args.out / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(documents, tokenizer_dir)
    train_tokens = encode_stream(tokenizer, documents)
    heldout_tokens = encode_stream(tokenizer, corpus.heldout_text().split(corpus.DOC_SEPARATOR))
    print(f"train tokens {len(train_tokens):,}  heldout tokens {len(heldout_tokens):,}", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=args.seqlen, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0, **ARCHITECTURES[args.model],
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = np.random.default_rng(args.seed)
    curve = []
    start = time.time()
    model.train()
    for step in range(args.steps):
        offsets = rng.integers(0, len(train_tokens) - args.seqlen - 1, size=args.batch)
        batch = torch.from_numpy(np.stack([train_tokens[o:o + args.seqlen] for o in offsets]).astype(np.int64))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = evaluate(model, heldout_tokens, 256)
            elapsed = time.time() - start
            tokens_seen = (step + 1) * args.batch * args.seqlen
            curve.append({"step": step + 1, "tokens": tokens_seen, "seconds": round(elapsed, 1),
                          "train_loss": round(loss.item(), 4), "heldout_loss": round(val, 4)})
            print(f"step {step + 1:5d}  train {loss.item():.3f}  heldout {val:.3f}  "
                  f"{tokens_seen / elapsed:,.0f} tok/s  {elapsed / 60:.1f} min", flush=True)

    out_dir = args.out / args.model
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.config.dtype = torch.bfloat16
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {
        "model": args.model, "parameters": n_params, "architecture": ARCHITECTURES[args.model],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "corpus": {"train_files": len(corpus.stdlib_files("train")), "train_tokens": len(train_tokens),
                   "heldout_tokens": len(heldout_tokens), "python": platform.python_version()},
        "torch": torch.__version__, "seconds": round(time.time() - start, 1), "curve": curve,
        "command": " ".join(["python", *sys.argv]),
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {out_dir}", flush=True)


if __name__ == "__main__":
    main()
