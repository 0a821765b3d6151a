"""Inference speed and memory, dense against pruned (SlimGPT paper, Table 4).

Three timings, each the mean and standard deviation of ``runs`` runs after ``warmup`` untimed runs:
- prefill: one forward over a prompt of P tokens (tokens/s = batch * P / seconds);
- generate: greedy generation of exactly N new tokens (``min_new_tokens = max_new_tokens = N``, so an
  early end-of-sequence cannot make a model look faster);
- decode: the N - 1 single-token steps inside that generation, timed between the first and the last
  call of a logits processor (the first call happens right after the prefill step).

The prompt is random token ids from a seeded generator: speed does not depend on the text, and no
tokenizer or dataset is needed.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from slimgpt._util.timing import cpu_peak_rss_bytes
from slimgpt.errors import ConfigError

logger = logging.getLogger(__name__)

CUDA_PEAK_NOTE = "torch.cuda.max_memory_allocated during prefill and generation (weights, cache, activations)"
CPU_PEAK_NOTE = (
    "peak resident set size of the whole process (getrusage ru_maxrss): a lifetime high-water mark "
    "that includes everything loaded before, not this model alone"
)


@dataclass(frozen=True)
class SpeedResult:
    """Timings (mean, std over ``runs``) and sizes of one model on one device."""

    device: str
    dtype: str
    batch_size: int
    prompt_tokens: int
    gen_tokens: int
    runs: int
    warmup: int
    prefill_tokens_per_s: float
    prefill_tokens_per_s_std: float
    decode_tokens_per_s: float
    decode_tokens_per_s_std: float
    generate_seconds: float
    generate_seconds_std: float
    generated_tokens: int  # new tokens per sequence that generate() actually produced
    n_parameters: int
    weight_bytes: int
    peak_memory_bytes: int
    peak_memory_note: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeedResult:
        return cls(**data)


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the model; tied weights (shared tensors) are counted once."""
    return sum(parameter.numel() for parameter in model.parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters in their stored dtype; tied weights counted once."""
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock time measures them (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


class _StepClock:
    """A logits processor that only records when each generation step's logits are ready."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


class _Timer:
    """Times one prefill forward and one greedy generation of ``model`` on a fixed random prompt."""

    def __init__(self, model: Any, target: torch.device, batch_size: int, prompt_tokens: int, gen_tokens: int,
                 seed: int) -> None:
        from transformers import GenerationConfig

        self.model, self.target = model, target
        generator = torch.Generator().manual_seed(seed)
        vocab = int(model.config.vocab_size)
        self.prompt = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=generator).to(target)
        self.attention_mask = torch.ones_like(self.prompt)
        self.config = GenerationConfig(
            max_new_tokens=gen_tokens,
            min_new_tokens=gen_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=0,
            eos_token_id=model.config.eos_token_id,
        )

    def prefill(self) -> float:
        """Seconds of one forward over the prompt."""
        _synchronize(self.target)
        start = time.perf_counter()
        self.model(input_ids=self.prompt, attention_mask=self.attention_mask, use_cache=False)
        _synchronize(self.target)
        return time.perf_counter() - start

    def generate(self) -> tuple[float, float, int]:
        """Seconds of the whole generation, seconds of its decode steps, and the new tokens produced."""
        from transformers import LogitsProcessorList

        clock = _StepClock(self.target)
        _synchronize(self.target)
        start = time.perf_counter()
        output = self.model.generate(
            input_ids=self.prompt,
            attention_mask=self.attention_mask,
            generation_config=self.config,
            logits_processor=LogitsProcessorList([clock]),
        )
        _synchronize(self.target)
        total = time.perf_counter() - start
        decode = clock.stamps[-1] - clock.stamps[0]  # the N - 1 steps after the first token
        return total, decode, int(output.shape[1] - self.prompt.shape[1])


@torch.no_grad()
def measure_speed(
    model: Any,
    prompt_tokens: int = 128,
    gen_tokens: int = 512,
    runs: int = 3,
    warmup: int = 1,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SpeedResult:
    """Time prefill, decode and generation of ``model`` (a Hugging Face causal LM) on ``device``.

    device: where the prompt is placed; default the device of the model's first parameter. The model
    must already be there (one code path for CPU and CUDA).
    """
    if prompt_tokens < 1 or gen_tokens < 2 or runs < 1 or warmup < 0 or batch_size < 1:
        raise ConfigError(
            "speed needs prompt_tokens >= 1, gen_tokens >= 2, runs >= 1, warmup >= 0, batch_size >= 1; got "
            f"{prompt_tokens}, {gen_tokens}, {runs}, {warmup}, {batch_size}"
        )
    first = next(model.parameters())
    target = torch.device(device) if device is not None else first.device
    timer = _Timer(model, target, batch_size, prompt_tokens, gen_tokens, seed)

    was_training = model.training
    model.eval()
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    try:
        prefill_times = _repeat(timer.prefill, runs, warmup, "prefill", progress)
        generations = _repeat(timer.generate, runs, warmup, "generate", progress)
    finally:
        model.train(was_training)

    peak, note = _peak_memory(target)
    generated = {count for _, _, count in generations}
    if generated != {gen_tokens}:
        logger.warning("generate() produced %s new tokens instead of %d", sorted(generated), gen_tokens)
    prefill_rate = _mean_std([batch_size * prompt_tokens / seconds for seconds in prefill_times])
    decode_rate = _mean_std([batch_size * (gen_tokens - 1) / decode for _, decode, _ in generations])
    generate_time = _mean_std([total for total, _, _ in generations])
    return SpeedResult(
        device=str(target),
        dtype=str(first.dtype).removeprefix("torch."),
        batch_size=batch_size,
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        runs=runs,
        warmup=warmup,
        prefill_tokens_per_s=prefill_rate[0],
        prefill_tokens_per_s_std=prefill_rate[1],
        decode_tokens_per_s=decode_rate[0],
        decode_tokens_per_s_std=decode_rate[1],
        generate_seconds=generate_time[0],
        generate_seconds_std=generate_time[1],
        generated_tokens=min(generated),
        n_parameters=count_parameters(model),
        weight_bytes=weight_bytes(model),
        peak_memory_bytes=peak,
        peak_memory_note=note,
    )


def _peak_memory(target: torch.device) -> tuple[int, str]:
    """Peak memory in bytes since the reset (CUDA) or of the process's life (CPU), and what it counts."""
    if target.type == "cuda":
        return int(torch.cuda.max_memory_allocated(target)), CUDA_PEAK_NOTE
    return cpu_peak_rss_bytes(), CPU_PEAK_NOTE


def _repeat(measure: Callable[[], Any], runs: int, warmup: int, name: str, progress: bool) -> list[Any]:
    """Run ``measure`` warmup + runs times; keep the timed runs only."""
    results = []
    for index in tqdm(range(warmup + runs), desc=f"speed: {name}", disable=not progress, leave=False):
        result = measure()
        if index >= warmup:
            results.append(result)
    return results
