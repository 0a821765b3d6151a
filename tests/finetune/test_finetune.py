"""LoRA recovery fine-tuning: data and masks, the schedule, training, saving, resuming, and the CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import slimgpt
import slimgpt.data.hub as data_hub
from conftest import TEXT, calibration, make_model, probe
from slimgpt.cli import main
from slimgpt.errors import ConfigError, DataError
from slimgpt.finetune import (
    IGNORE_INDEX,
    FinetuneConfig,
    StepLog,
    finetune,
    instruction_example,
    learning_rate_at,
    load_training_data,
    lora_target_modules,
    save_finetuned,
    split_record,
    text_examples,
)
from slimgpt.models.families import get_adapter

# Short responses whose characters the test tokenizer knows (conftest.TEXT), so decoding is exact.
RECORDS = [
    {"instruction": "Add two numbers.", "input": "a, b", "output": "def add(a, b):\n    return a + b"},
    {"instruction": "Describe the fox.", "input": "", "output": "The quick brown fox jumps over the lazy dog."},
    {"instruction": "Push onto the stack.", "input": "item", "output": "self.items.append(item)"},
    {"instruction": "What does pruning remove?", "input": "", "output": "Pruning removes heads and channels."},
]
# The Alpaca prompt alone is ~180 tokens for the 96-token test vocabulary; LLaMA's rotary positions
# have no hard limit, so 256 (the paper's max length) works on the tiny model.
MAX_LENGTH = 256


def _config(data: Path | str, **overrides: Any) -> FinetuneConfig:
    values: dict[str, Any] = dict(data=str(data), batch_size=4, micro_batch_size=2, max_length=MAX_LENGTH,
                                  max_steps=6, warmup_steps=2, learning_rate=5e-3, checkpoint_every=2)
    values.update(overrides)
    return FinetuneConfig(**values)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    model = make_model("llama")
    report = slimgpt.prune_model(model, slimgpt.PruneConfig(ratio=0.5, nsamples=8, seqlen=32), calibration(),
                                 progress=False)
    return slimgpt.save_pruned(model, tokenizer, report, tmp_path_factory.mktemp("pruned") / "model")


@pytest.fixture(scope="module")
def instructions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "instructions.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in RECORDS * 2) + "\n")
    return path


@pytest.fixture(scope="module")
def raw_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT * 12)
    return path


def _load(directory: Path) -> tuple[Any, Any]:
    return slimgpt.load_model(str(directory), dtype="float32")


# --- config ------------------------------------------------------------------------------------------


def test_defaults_are_the_paper_recipe_and_round_trip() -> None:
    config = FinetuneConfig()
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout) == (8, 16, 0.05)
    assert config.lora_targets == ("q", "k", "v", "o", "gate", "up", "down")
    assert (config.learning_rate, config.lr_schedule, config.warmup_steps) == (1e-4, "cosine", 10)
    assert (config.batch_size, config.max_length, config.epochs, config.response_only) == (64, 256, 1.0, True)
    custom = FinetuneConfig(data="builtin", lora_targets=("q", "fc1"), max_steps=7, bf16=True)
    assert FinetuneConfig.from_json(custom.to_json()) == custom
    assert FinetuneConfig.from_dict(json.loads(custom.to_json())).lora_targets == ("q", "fc1")


@pytest.mark.parametrize(("overrides", "match"), [
    ({"batch_size": 64, "micro_batch_size": 5}, "multiple"),
    ({"lr_schedule": "cubic"}, "lr-schedule"),
    ({"lora_dropout": 1.0}, "lora-dropout"),
    ({"max_length": 1}, "max-length"),
    ({"lora_rank": 0}, "lora-rank"),
    ({"learning_rate": 0.0}, "lr"),
    ({"max_steps": 0}, "max-steps"),
    ({"lora_targets": ()}, "lora-targets"),
    ({"device": "gpu-please"}, "device"),
])
def test_bad_options_are_rejected(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(**overrides)


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown fine-tuning option"):
        FinetuneConfig.from_dict({"data": "builtin", "lora_rnak": 4})


# --- LoRA targets --------------------------------------------------------------------------------------


def _suffixes(names: list[str]) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in names}


def test_targets_map_roles_to_each_family() -> None:
    llama, opt = make_model("llama"), make_model("opt")
    names = lora_target_modules(llama)
    assert len(names) == 3 * 7
    assert _suffixes(names) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    opt_names = lora_target_modules(opt)
    assert len(opt_names) == 3 * 6  # gate and up both mean fc1
    assert _suffixes(opt_names) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert _suffixes(lora_target_modules(opt, ("o", "fc2"))) == {"out_proj", "fc2"}
    with pytest.raises(ConfigError, match="bogus"):
        lora_target_modules(opt, ("q", "bogus"))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_targets_skip_maps_pruned_to_zero_width() -> None:
    model = make_model("llama")
    adapter = get_adapter(model.config)
    layer = adapter.decoder_layers(model)[0]
    adapter.shrink_layer(layer, torch.tensor([], dtype=torch.long), torch.arange(96))
    names = lora_target_modules(model)
    assert not [name for name in names if name.startswith("model.layers.0.self_attn")]
    assert "model.layers.0.mlp.gate_proj" in names and len(names) == 3 * 7 - 4


# --- data -------------------------------------------------------------------------------------------


def test_prompt_tokens_are_masked(tokenizer: Any) -> None:
    prompt, response = split_record(RECORDS[0])
    assert prompt.endswith("### Input:\na, b\n\n### Response:\n") and response == RECORDS[0]["output"]
    example = instruction_example(tokenizer, prompt, response, MAX_LENGTH)
    assert example is not None
    trained = example.labels != IGNORE_INDEX
    # Every label is either masked or equal to its token; the trained tokens are exactly response + EOS.
    assert torch.equal(example.labels[trained], example.input_ids[trained])
    # (the byte-level pre-tokenizer splits at the prompt's final newline, so the response tokenizes alone)
    assert example.input_ids[trained].tolist() == tokenizer(response)["input_ids"] + [tokenizer.eos_token_id]
    assert not trained[: len(tokenizer(prompt)["input_ids"]) - 1].any()  # the prompt, boundary aside
    assert int(example.input_ids[-1]) == tokenizer.eos_token_id
    full = instruction_example(tokenizer, prompt, response, MAX_LENGTH, response_only=False)
    assert full is not None and torch.equal(full.labels, full.input_ids)
    # A prompt that fills max_length leaves nothing to learn: the record is dropped.
    assert instruction_example(tokenizer, prompt, response, 20) is None


def test_text_is_cut_into_full_windows(tokenizer: Any, raw_text: Path) -> None:
    examples = text_examples(tokenizer, [TEXT] * 5, 16)
    stream = len(tokenizer(TEXT + "\n\n")["input_ids"]) * 5
    assert len(examples) == stream // 16
    assert all(len(e.input_ids) == 16 and torch.equal(e.labels, e.input_ids) for e in examples)
    assert len(text_examples(tokenizer, [TEXT] * 5, 16, limit=3)) == 3
    data = load_training_data(tokenizer, _config(raw_text, max_length=32))
    assert data.kind == "text" and data.description["kind"] == "local"


def test_data_sources_pick_instruction_or_text(tokenizer: Any, instructions: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_training_data(tokenizer, _config(instructions))
    assert data.kind == "instruction" and len(data.examples) == 2 * len(RECORDS)
    text_jsonl = tmp_path / "text.jsonl"
    text_jsonl.write_text("\n".join(json.dumps({"text": TEXT}) for _ in range(6)))
    assert load_training_data(tokenizer, _config(text_jsonl, max_length=32)).kind == "text"
    # builtin is the stdlib corpus as raw text (stubbed here: tokenizing all of it takes too long).
    monkeypatch.setattr(slimgpt.corpus, "train_documents", lambda: [TEXT] * 6)
    builtin = load_training_data(tokenizer, _config("builtin", max_length=32))
    assert builtin.kind == "text" and builtin.description["kind"] == "builtin" and len(builtin.examples) > 4
    # alpaca reads the Hub rows through slimgpt.data (stubbed: no network) minus its held-out 5%.
    from datasets import Dataset

    rows = [dict(record, output=f"{record['output']} {i}") for i, record in enumerate(RECORDS * 20)]
    monkeypatch.setattr(data_hub, "load_hub_split", lambda *args: Dataset.from_list(rows))
    alpaca = load_training_data(tokenizer, _config("alpaca"))
    assert alpaca.kind == "instruction" and alpaca.description["hub_id"] == "yahma/alpaca-cleaned"
    assert len(alpaca.examples) == 76  # the last 4 of 80 rows are slimgpt.data's eval split


def test_bad_data_is_a_clear_error(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_training_data(tokenizer, _config(tmp_path / "missing.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"line 2 has no 'instruction', 'output'"):
        load_training_data(tokenizer, _config(broken))


# --- schedule ------------------------------------------------------------------------------------------


def test_learning_rate_warms_up_then_follows_the_cosine() -> None:
    config = FinetuneConfig(warmup_steps=10, learning_rate=1e-4)
    lrs = [learning_rate_at(step, 110, config) for step in range(110)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4) and lrs[10] == pytest.approx(1e-4)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[60] == pytest.approx(0.5e-4)
    assert 0 < lrs[-1] < 1e-7
    linear = FinetuneConfig(warmup_steps=0, lr_schedule="linear")
    assert learning_rate_at(50, 100, linear) == pytest.approx(0.5e-4)


# --- training ------------------------------------------------------------------------------------------


def test_finetune_lowers_loss_and_saves_the_pruned_model(pruned_dir: Path, instructions: Path,
                                                         tmp_path: Path) -> None:
    model, tokenizer = _load(pruned_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seen: list[StepLog] = []
    report = finetune(model, tokenizer, _config(instructions, max_steps=12), model_name=str(pruned_dir),
                      progress=False, on_step=seen.append)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's randomness is untouched
    assert seen == report.log
    losses = [entry.loss for entry in report.log]
    assert report.finished and report.steps == len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses  # a repeated tiny dataset is learnt
    assert all(entry.tokens > 0 and entry.lr > 0 and math.isfinite(entry.grad_norm) for entry in report.log)
    assert all(p.requires_grad for p in model.parameters())  # requires_grad as it was
    assert not any(".lora_" in name for name, _ in model.named_parameters())  # merged and unloaded

    out = save_finetuned(model, tokenizer, report, tmp_path / "tuned", source=pruned_dir)
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    tuned, _ = _load(out)
    assert type(tuned).__name__.startswith("Slim")
    assert tuned.config.layer_sizes() == model.config.layer_sizes()
    dense = make_model("llama").config
    assert sum(s.ffn_dim for s in tuned.config.layer_sizes()) < dense.num_hidden_layers * dense.intermediate_size
    original, _ = _load(pruned_dir)
    assert original.config.layer_sizes() == tuned.config.layer_sizes()
    state = tuned.state_dict()
    changed = [k for k in before if not torch.equal(before[k], state[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only LoRA-targeted weights moved
    x = probe()
    assert torch.allclose(tuned(x).logits, model.eval()(x).logits, atol=1e-5)
    assert not torch.allclose(tuned(x).logits, original(x).logits, atol=1e-3)

    provenance = json.loads((out / "slimgpt_finetune.json").read_text())
    assert provenance["config"]["data"] == str(instructions) and provenance["data"]["kind"] == "instruction"
    assert provenance["source"] == str(pruned_dir.resolve()) and provenance["steps"] == 12
    log = json.loads((out / "finetune_log.json").read_text())
    assert [entry["loss"] for entry in log] == losses and {"lr", "tokens", "seconds"} <= set(log[0])
    assert "Recovery fine-tuning" in (out / "README.md").read_text()
    assert (out / "slimgpt_report.json").exists()


def test_raw_text_trains_on_every_token(pruned_dir: Path, raw_text: Path) -> None:
    model, tokenizer = _load(pruned_dir)
    report = finetune(model, tokenizer, _config(raw_text, max_length=32, max_steps=3, bf16=True), progress=False)
    assert report.data["kind"] == "text"
    assert all(entry.tokens == 4 * 31 and entry.input_tokens == 4 * 32 for entry in report.log)
    assert all(math.isfinite(entry.loss) for entry in report.log)


def test_an_error_mid_run_leaves_the_model_as_it_was(pruned_dir: Path, instructions: Path) -> None:
    model, tokenizer = _load(pruned_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def fail_at_step_two(entry: StepLog) -> None:
        if entry.step == 2:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        finetune(model, tokenizer, _config(instructions), progress=False, on_step=fail_at_step_two)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_micro_batching_does_not_change_the_step(pruned_dir: Path, instructions: Path) -> None:
    # The loss of a step is the mean over the targets of the whole batch, however it is split. (Weights
    # after the step are not compared: Adam's first update is close to lr * sign(grad), so rounding
    # noise on gradient entries that cancel to ~0 moves them by up to lr.)
    logs = []
    for micro in (1, 4):
        model, tokenizer = _load(pruned_dir)
        report = finetune(model, tokenizer, _config(instructions, micro_batch_size=micro, max_steps=1,
                                                    lora_dropout=0.0), progress=False)
        logs.append(report.log[0])
    assert logs[0].tokens == logs[1].tokens
    assert logs[0].loss == pytest.approx(logs[1].loss, rel=1e-5)
    assert logs[0].grad_norm == pytest.approx(logs[1].grad_norm, rel=1e-4)


def test_resume_after_interruption_is_bit_identical(pruned_dir: Path, instructions: Path, tmp_path: Path) -> None:
    config = _config(instructions)  # 6 steps, checkpoints after steps 2 and 4, dropout 0.05
    reference, tokenizer = _load(pruned_dir)
    full = finetune(reference, tokenizer, config, progress=False)

    crashed, _ = _load(pruned_dir)
    checkpoint = tmp_path / "ckpt"
    partial = finetune(crashed, tokenizer, config, checkpoint_dir=checkpoint, stop_after_step=3, progress=False)
    assert not partial.finished and partial.steps == 3
    assert {p.suffix for p in checkpoint.rglob("*") if p.is_file()} <= {".safetensors", ".json", ".md"}  # no pickle
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2

    resumed, _ = _load(pruned_dir)  # a new process reloads the pruned model
    report = finetune(resumed, tokenizer, config, checkpoint_dir=checkpoint, resume=True, progress=False)
    assert report.finished and report.resumed_from_step == 2 and report.steps == 6
    assert [e.loss for e in report.log] == [e.loss for e in full.log]
    expected, actual = reference.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)

    with pytest.raises(ConfigError, match="learning_rate"):
        finetune(_load(pruned_dir)[0], tokenizer, _config(instructions, learning_rate=1e-3),
                 checkpoint_dir=checkpoint, resume=True, progress=False)


# --- command line --------------------------------------------------------------------------------------


def test_cli_trains_saves_and_refuses_bad_input(pruned_dir: Path, instructions: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "tuned"
    argv = ["finetune", str(pruned_dir), "--data", str(instructions), "--output", str(output), "--max-steps", "2",
            "--batch-size", "2", "--micro-batch-size", "1", "--warmup-steps", "1", "--checkpoint-every", "1"]
    assert main(argv) == 0
    assert "LoRA fine-tuning" in capsys.readouterr().out
    assert (output / "model.safetensors").exists() and not output.with_name("tuned.checkpoint").exists()
    provenance = json.loads((output / "slimgpt_finetune.json").read_text())
    assert provenance["config"]["batch_size"] == 2 and provenance["config"]["lora_targets"][-1] == "down"
    assert _load(output)[0].config.layer_sizes() == _load(pruned_dir)[0].config.layer_sizes()

    def fails(args: list[str], message: str) -> None:
        assert main(args) == 2
        assert message in capsys.readouterr().err

    fails(argv, "--overwrite")
    fails([*argv[:3], str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "other")], "does not exist")
    output.with_name("tuned2.checkpoint").mkdir()
    fails([*argv[:4], "--output", str(tmp_path / "tuned2")], "--resume")
    fails([*argv[:6], "--batch-size", "3", "--micro-batch-size", "2"], "multiple")
    assert not (tmp_path / "other").exists() and not (tmp_path / "tuned2").exists()
