"""Zero-shot evaluation through the stock lm-evaluation-harness, offline, on a local task.

The task (tests/assets/eval_task/next_letter.jsonl: "Letters: m n o p Next:" -> "q" among three
letters) only has to run end to end; a random model scores at chance. Its YAML is written at test time
so that ``data_files`` is an absolute path, as lm-eval's ``json`` datasets need.
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slimgpt.cli import add_subcommands as register
from slimgpt.errors import DataError
from slimgpt.evaluation import EvalReport, compare, evaluate_model, load_tasks, zero_shot

pytest.importorskip("lm_eval")

TASK_DATA = Path(__file__).resolve().parents[1] / "assets" / "eval_task" / "next_letter.jsonl"
WORDS = ["<unk>", "</s>", "Letters", ":", "Next", *string.ascii_lowercase]

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
  cache_dir: {cache}
output_type: multiple_choice
validation_split: validation
fewshot_split: validation
doc_to_text: "{{{{query}}}}"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

# A group, like MMLU: lm-eval reports only its aggregated acc (no acc_norm).
GROUP_YAML = """\
group: letters_group
task:
  - next_letter_a
  - next_letter_b
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
"""


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tasks")
    cache = tmp_path_factory.mktemp("datasets_cache")  # keep `datasets` out of the user's cache
    for name in ("next_letter", "next_letter_a", "next_letter_b"):
        text = TASK_YAML.format(name=name, data=TASK_DATA.resolve(), cache=cache)
        (directory / f"{name}.yaml").write_text(text)
    (directory / "letters_group.yaml").write_text(GROUP_YAML)
    generative = TASK_YAML.format(name="next_letter_generate", data=TASK_DATA.resolve(), cache=cache)
    generative = generative.replace("output_type: multiple_choice", "output_type: generate_until")
    (directory / "next_letter_generate.yaml").write_text(generative.split("metric_list:")[0])
    return directory


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    word_level = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", eos_token="</s>", bos_token="</s>", pad_token="</s>"
    )


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        eos_token_id=1, bos_token_id=1, pad_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def zeroed_llama() -> LlamaForCausalLM:
    """Stands in for a pruned model: half of every layer's FFN channels and two heads are zeroed."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 64:] = 0
            layer.self_attn.o_proj.weight[:, 32:] = 0
    return model


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may touch the network: Hub access fails at once instead of retrying."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The libraries read these variables at import; an earlier import in this process would miss them.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def test_zero_shot_on_a_local_task_for_a_dense_and_a_pruned_model(
    tasks_dir: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    suite = load_tasks(["next_letter", "letters_group"], tasks_dir)
    for model in (tiny_llama(), zeroed_llama()):
        result = zero_shot(model, tokenizer, suite, fewshot={"letters_group": 2}, batch_size=4, limit=12)
        assert [task.name for task in result.tasks] == ["next_letter", "letters_group"]
        single, group = result.tasks
        assert 0.0 <= single.acc <= 1.0 and single.acc_norm is not None and 0.0 <= single.acc_norm <= 1.0
        assert (single.num_fewshot, single.n_samples) == (0, 12)
        assert 0.0 <= group.acc <= 1.0 and group.acc_norm is None  # the group aggregates acc only
        assert (group.num_fewshot, group.n_samples) == (2, 24)
        assert result.average == pytest.approx((single.acc_norm + group.acc) / 2)
        assert result.average_acc == pytest.approx((single.acc + group.acc) / 2)
        assert result.limit == 12 and "local task YAMLs" in result.task_source


def test_evaluate_model_report_round_trips_and_compares(
    tasks_dir: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    reports = [
        evaluate_model(model, tokenizer, name, tasks=["next_letter"], tasks_dir=tasks_dir, limit=6,
                       speed=True, gen_tokens=4, prompt_tokens=8, runs=1, warmup=0)
        for name, model in (("dense", tiny_llama()), ("pruned", zeroed_llama()))
    ]
    for report in reports:
        assert EvalReport.from_json(report.to_json()) == report
        assert report.zero_shot is not None and report.speed is not None
        assert report.speed.generated_tokens == 4
        assert report.versions["lm_eval"] != "not installed"
    table = compare(reports)
    assert "dense [1]" in table and "pruned [2]" in table and "next_letter acc / acc_norm (%)" in table


def test_stock_task_names_offline_give_a_one_line_data_error() -> None:
    with pytest.raises(DataError) as error:
        load_tasks(["piqa"])
    message = str(error.value)
    assert "--tasks-dir" in message and "online" in message and "\n" not in message


def test_unknown_local_task_is_a_data_error(tasks_dir: Path) -> None:
    with pytest.raises(DataError, match="unknown zero-shot task 'boolq'"):
        load_tasks(["boolq"], tasks_dir)
    with pytest.raises(DataError, match="not multiple-choice"):
        load_tasks(["next_letter_generate"], tasks_dir)
    with pytest.raises(DataError, match="not a directory"):
        load_tasks(["boolq"], tasks_dir / "missing")


def test_cli_eval_end_to_end(
    tasks_dir: Path, tokenizer: PreTrainedTokenizerFast, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out" / "report.json"
    parser = argparse.ArgumentParser(prog="slimgpt")
    register(parser.add_subparsers(dest="command", required=True))
    options = "--tasks next_letter --limit 5 --speed --gen-tokens 3 --prompt-tokens 4 --runs 1 --warmup 0"
    options += " --device cpu --dtype float32"
    paths = ["--tasks-dir", str(tasks_dir), "--json", str(out), "--plots", str(tmp_path / "plots")]
    args = parser.parse_args(["eval", str(model_dir), *options.split(), *paths])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| next_letter | 0 |" in printed and "decode (tokens/s)" in printed
    report = EvalReport.from_json(out.read_text())
    assert report.model == str(model_dir) and report.zero_shot is not None
    assert json.loads(out.read_text())["format"] == "slimgpt.eval_report"
    assert (tmp_path / "plots" / "kept_ratio_1.png").stat().st_size > 1000


def test_python_in_task_yamls_is_named_before_it_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from slimgpt.evaluation.harness import warn_python_in_tasks

    (tmp_path / "plain.yaml").write_text("task: plain\n")
    (tmp_path / "code.yaml").write_text("task: code\nprocess_docs: !function utils.process\n")
    with caplog.at_level("WARNING"):
        files = warn_python_in_tasks(tmp_path)
    assert [f.name for f in files] == ["code.yaml"]
    assert "code.yaml uses !function" in caplog.text and "plain.yaml" not in caplog.text
