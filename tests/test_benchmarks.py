"""The reproduction benchmark's pieces: the held-out code tasks and ``paper_tables.py`` end to end.

The benchmark scripts live in ``benchmarks/`` (not a package), so they are imported by path. The
end-to-end runs use a tiny random LLaMA with the shipped tokenizer: its numbers are noise, but every
row, table, claim and cache path runs.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from slimgpt import corpus
from slimgpt.config import METHODS
from slimgpt.evaluation import load_tasks
from slimgpt.models.slim import builtin_model_path

pytest.importorskip("lm_eval")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import paper_tables  # noqa: E402
import tasks as code_tasks  # noqa: E402

TOKENIZER = builtin_model_path("tiny-mha")  # the reference models' 4096-token BPE


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may touch the network: Hub access fails at once instead of retrying."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    return code_tasks.build_tasks()


@pytest.fixture(scope="module")
def documents() -> dict[str, code_tasks.Document]:
    return {doc.path: doc for doc in code_tasks.heldout_documents(code_tasks.load_manifest())}


# --- tasks ----------------------------------------------------------------------------------------


def test_committed_tasks_are_a_fresh_deterministic_build(built: dict[str, list[dict[str, Any]]]) -> None:
    assert code_tasks.build_tasks() == built  # same corpus, same seed: same items
    for name, items in built.items():
        committed = (code_tasks.TASKS_DIR / f"{name}.jsonl").read_text(encoding="utf-8")
        assert committed == code_tasks._jsonl(items), f"{name}: run python benchmarks/tasks.py"
        assert len(items) == code_tasks.DEFAULT_ITEMS
    total = sum(path.stat().st_size for path in code_tasks.TASKS_DIR.iterdir())
    assert total < 1_000_000


def test_every_item_comes_from_a_heldout_file(tmp_path: Path, built: dict[str, list[dict[str, Any]]]) -> None:
    """By the corpus's own split rule (a hash of the path), applied to a stand-in tree of the sources."""
    sources = {item["source"] for items in built.values() for item in items}
    for source in sources:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / source).write_text("")
    heldout = {p.relative_to(tmp_path).as_posix() for p in corpus.stdlib_files("heldout", root=tmp_path)}
    assert heldout == sources
    assert corpus.stdlib_files("train", root=tmp_path) == []
    manifest = {entry["path"] for entry in code_tasks.load_manifest()}
    assert sources <= manifest


def test_items_are_the_heldout_text_they_claim(
    built: dict[str, list[dict[str, Any]]], documents: dict[str, code_tasks.Document]
) -> None:
    for name, items in built.items():
        for item in items:
            lines = documents[item["source"]].lines
            true_line = lines[item["line"] - 1]
            answer = item["choices"][item["label"]]
            before = "\n".join(lines[: item["line"] - 1])  # the file up to the newline that ends the line before
            assert len(set(item["choices"])) == len(item["choices"]) >= 2
            if name == "code-closing":
                head = item["context"].rsplit("\n", 1)[-1]  # the cut line, up to the brackets
                assert true_line.startswith(head + answer) and (before + "\n" + head).endswith(item["context"])
                assert len({len(choice) for choice in item["choices"]}) == 1
                assert set("".join(item["choices"])) <= set(")]}")
                continue
            assert answer == "\n" + true_line and before.endswith(item["context"])
            assert all(choice.startswith("\n") for choice in item["choices"])
            if name == "code-real-or-shuffled":
                fake = item["choices"][1 - item["label"]]
                assert sorted(fake) == sorted(answer)
            if name == "code-nextline":
                indent = "\n" + code_tasks._indent(true_line)
                others = [c for i, c in enumerate(item["choices"]) if i != item["label"]]
                assert len(others) == 3 and all(c.startswith(indent) and not c[len(indent)].isspace() for c in others)


def test_no_token_straddles_context_and_choice(built: dict[str, list[dict[str, Any]]], tiny_model: Path) -> None:
    """lm-eval scores the tokens of context + choice after the context's own tokens: they must align.

    Checked with lm-eval's own pair encoding and the reference models' tokenizer.
    """
    from lm_eval.models.huggingface import HFLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    lm = HFLM(pretrained=LlamaForCausalLM.from_pretrained(tiny_model), tokenizer=tokenizer)
    for name, items in built.items():
        for item in items:
            for choice in item["choices"]:
                context_ids, choice_ids = lm._encode_pair(item["context"], choice)
                whole = lm.tok_encode(item["context"] + choice)
                assert choice_ids and whole[: len(context_ids)] == context_ids, (name, item["id"], choice)


def test_tasks_load_through_lm_eval(tmp_path: Path) -> None:
    directory = code_tasks.write_task_yamls(tmp_path / "yamls")
    yaml = (directory / "code-nextline.yaml").read_text()
    assert str(code_tasks.TASKS_DIR / "code-nextline.jsonl") in yaml and 'target_delimiter: ""' in yaml
    suite = load_tasks(list(code_tasks.TASK_NAMES), directory)
    for name in code_tasks.TASK_NAMES:
        (task,) = suite.objects[name]
        docs = list(task.validation_docs())
        assert len(docs) == code_tasks.DEFAULT_ITEMS
        first = docs[0]
        assert task.doc_to_text(first) == first["context"] and task.doc_to_choice(first) == first["choices"]


# --- paper_tables.py ------------------------------------------------------------------------------


def test_the_default_plan_has_each_row_once() -> None:
    methods = paper_tables.registry_methods()
    options = paper_tables.Options(
        models=("tiny-mha", "tiny-gqa"), ablation_models=("tiny-mha",), tables=paper_tables.ALL_TABLES,
        methods=methods, ratios=paper_tables.TABLE1_RATIOS,
    )
    plan = paper_tables.build_plan(options, lambda model: model == "tiny-gqa")
    counts = {model: len(specs) for model, specs in plan.rows.items()}
    paper = sum(method in paper_tables.PAPER_METHODS for method in plan.methods)
    peers = len(plan.methods) - paper
    assert set(METHODS) | {"slimgpt-auto"} == set(methods) and peers >= 1 + len(METHODS) - 6
    # dense + Table 1 (the paper's methods at 4 ratios, the others at 20% and 50%), then on tiny-mha
    # 3 ablations x 2 ratios, 4 other schedules, 2 prose rows and 3 + 3 Figure 3 points (the full-size
    # point is Table 1's row); on tiny-gqa 2 query-heads rows.
    table1 = 4 * paper + 2 * peers
    assert counts == {"tiny-mha": 1 + table1 + 6 + 4 + 2 + 6, "tiny-gqa": 1 + table1 + 2}
    keys = [spec.key for specs in plan.rows.values() for spec in specs]
    assert len(keys) == len(set(keys))
    # 20% and 50% of every method run before any other ratio; the schedule=auto row is its own row.
    first = plan.rows["tiny-mha"][1:1 + 2 * len(plan.methods)]
    assert {spec.ratio for spec in first} == {0.2, 0.5}
    assert any(dict(spec.options).get("schedule") == "auto" for spec in first)


def test_smollm2_plan_uses_english_and_skips_unknown_methods() -> None:
    argv = ["--models", "smollm2-135m", "--methods", "slimgpt,slimgpt-auto,no-such-method", "--ratios", "0.2,0.5"]
    options = paper_tables.make_options(paper_tables.parse_args(argv))
    plan = paper_tables.build_plan(options, lambda model: True)
    assert plan.methods == ("slimgpt", "slimgpt-auto") and any("'no-such-method'" in note for note in plan.notes)
    specs = plan.rows["smollm2-135m"]
    assert {spec.calib for spec in specs if spec.method != "dense"} == {"english", "builtin"}  # Table 14
    assert options.protocol("smollm2-135m").eval_lengths(8192) == (128, 512)
    table1 = [spec for spec in specs if spec.key in plan.tasks]
    assert len(table1) == 1 + 2 * 2  # dense + Table 1: ablation rows are judged on perplexity only
    assert paper_tables.output_stem(options, quick=False) == "paper_tables_smollm2-135m"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer LLaMA with the shipped 4096-token tokenizer and a 256-token context."""
    folder = tmp_path_factory.mktemp("tiny-random")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def small_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibrate on a few training files: tokenizing the whole training split takes ~15 s per call."""
    text = tmp_path / "train_sample.txt"
    text.write_text("\n\n".join(corpus.read_documents(corpus.stdlib_files("train")[:20])))
    import paper_bench

    real = paper_bench.calibration_windows

    def calibration_windows(tokenizer: Any, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
        return real(tokenizer, str(text) if source == "builtin" else source, nsamples, seqlen, seed)

    monkeypatch.setattr(paper_bench, "calibration_windows", calibration_windows)


def test_paper_tables_quick_runs_end_to_end_and_resumes(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], small_builtin: None
) -> None:
    out = tmp_path / "results"
    argv = ["--models", str(tiny_model), "--tables", "1", "--methods", "slimgpt,magnitude,no-such-method",
            "--ratios", "0.2,0.5", "--quick", "--out", str(out), "--threads", "1"]
    assert paper_tables.main(argv) == 0
    printed = capsys.readouterr().out
    assert "'no-such-method' is not available" in printed and "CPU time budget: 5 of 5 rows" in printed

    data = json.loads((out / "paper_tables_quick.json").read_text())
    rows = dict(data["rows"])
    assert len(rows) == 5 and not (out / "paper_tables.json").exists()
    dense = rows[f"{tiny_model}|dense"]
    assert set(dense["ppl"]) == {"128", "256"} and dense["realised_ratio"] == 0
    for key, row in rows.items():
        assert row["wall_s"] > 0 and {t["name"] for t in row["zero_shot"]["tasks"]} == set(code_tasks.TASK_NAMES)
        if row["method"] != "dense":
            assert row["parameters"] < dense["parameters"], key
            assert abs(row["realised_ratio"] - row["ratio"]) < 0.1, key
    markdown = (out / "paper_tables_quick.md").read_text()
    assert "## Table 1" in markdown and "CPU time budget" in markdown
    assert "SlimGPT has a lower PPL than every baseline" in markdown
    assert "not measured: flap, llm-pruner, slicegpt, wanda-sp" in markdown
    assert (out / f"paper_tables_quick_ppl_vs_ratio_{tiny_model.name}.png").stat().st_size > 1000

    # A rerun reuses every finished row; a lost row (an interrupted run) is the only one redone.
    lost = f"{tiny_model}|magnitude|0.50|calib=builtin|n=16|s=128|"
    del data["rows"][lost]
    (out / "paper_tables_quick.json").write_text(json.dumps(data))
    # --render-only (while another invocation fills the JSON) runs nothing and writes no JSON.
    before = (out / "paper_tables_quick.json").read_text()
    assert paper_tables.main([*argv, "--render-only"]) == 0
    assert (out / "paper_tables_quick.json").read_text() == before
    assert "1 planned row(s) are not measured yet" in (out / "paper_tables_quick.md").read_text()
    capsys.readouterr()
    assert paper_tables.main(argv) == 0
    assert "CPU time budget: 1 of 5 rows" in capsys.readouterr().out
    again = json.loads((out / "paper_tables_quick.json").read_text())["rows"]
    assert set(again) == set(rows) and again[f"{tiny_model}|dense"] == dense


def test_sliced_rows_get_a_bits_back_column_and_old_rows_are_filled(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], small_builtin: None
) -> None:
    out = tmp_path / "results"
    argv = ["--models", str(tiny_model), "--tables", "1", "--methods", "slicegpt", "--ratios", "0.2",
            "--quick", "--out", str(out), "--threads", "1"]
    assert paper_tables.main(argv) == 0
    path = out / "paper_tables_quick.json"
    data = json.loads(path.read_text())
    key = f"{tiny_model}|slicegpt|0.20|calib=builtin|n=16|s=128|"
    sizes = data["rows"][key]["bits_back"]
    assert set(sizes) == {"bfloat16", "float32"}
    for size in sizes.values():
        assert 0 < size["bitsback_bytes"] < size["safetensors_bytes"] and size["rotation_bits_returned"] > 0
    assert "bits_back" not in data["rows"][f"{tiny_model}|dense"]
    markdown = (out / "paper_tables_quick.md").read_text()
    assert "### Bits-back export of the sliced rows" in markdown
    assert f"{sizes['bfloat16']['saved_percent']:.2f}%" in markdown

    # A row measured before the column existed: the rerun prunes again, exports, and runs no evaluation.
    del data["rows"][key]["bits_back"]
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert paper_tables.main(argv) == 0
    printed = capsys.readouterr().out
    assert "CPU time budget: 0 of 2 rows" in printed and "[bits-back 1/1]" in printed
    filled = json.loads(path.read_text())["rows"][key]["bits_back"]
    for dtype, size in sizes.items():  # the bytes are deterministic; the times are not
        assert filled[dtype]["bitsback_bytes"] == size["bitsback_bytes"], dtype
        assert filled[dtype]["safetensors_bytes"] == size["safetensors_bytes"], dtype


def test_a_claim_with_unmeasured_rows_is_held_only_so_far() -> None:
    import paper_render

    options = paper_tables.Options(models=("m",), ablation_models=("m",), tables=("1",), methods=("slimgpt",),
                                   ratios=(0.2, 0.5), peer_ratios=(0.2, 0.5))

    def row(ppl: float) -> dict[str, Any]:
        return {"ppl": {"128": {"value": ppl}}}

    def rows(**ppl: float) -> dict[str, Any]:
        return {paper_tables.base_row("m", options, 0.2, method).key: row(value) for method, value in ppl.items()}

    baselines = list(paper_render.BASELINES)
    everything = {"slimgpt": 10.0, **{m: 20.0 for m in baselines}}
    verdict = paper_render._versus(paper_render.Tables(rows(**everything), {}, {}), options, "m", 0.2, baselines, "c")
    assert verdict.verdict == "HELD"
    partial = {k: v for k, v in everything.items() if k != baselines[0]}
    verdict = paper_render._versus(paper_render.Tables(rows(**partial), {}, {}), options, "m", 0.2, baselines, "c")
    assert verdict.verdict == "HELD so far" and f"not measured: {baselines[0]}" in verdict.evidence
    worse = {**partial, baselines[1]: 5.0}
    verdict = paper_render._versus(paper_render.Tables(rows(**worse), {}, {}), options, "m", 0.2, baselines, "c")
    assert verdict.verdict == "NOT HELD"
    verdict = paper_render._versus(paper_render.Tables(rows(slimgpt=10.0), {}, {}), options, "m", 0.2, baselines, "c")
    assert verdict.verdict == "NOT MEASURED"


def test_prose_calibration_text_is_prose_from_training_files() -> None:
    text = paper_tables.prose_text(max_chars=20_000)
    paragraphs = text.strip().split("\n\n")
    assert len(text) >= 20_000 and len(paragraphs) > 20
    assert not any(p.lstrip().startswith((">>>", "def ", "import ")) for p in paragraphs)
    letters = sum(char.isalpha() or char == " " for char in text)
    assert letters > 0.85 * len(text)


# --- report_reference.py --------------------------------------------------------------------------


def test_layer_errors_start_at_the_first_changed_layer(tiny_model: Path) -> None:
    import report_reference

    dense = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    windows = torch.randint(0, dense.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    assert report_reference.layer_errors(dense, copy.deepcopy(dense), windows) == [0.0, 0.0]
    changed = copy.deepcopy(dense)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(0.5)
    first, second = report_reference.layer_errors(dense, changed, windows, batch_size=2)
    assert first == 0.0 and 0.0 < second < 1.0


def test_report_reference_quick_writes_the_report_and_figures(
    tiny_model: Path, tmp_path: Path, small_builtin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import paper_bench
    import report_reference

    monkeypatch.setattr(report_reference, "calibration_windows", paper_bench.calibration_windows)
    out = tmp_path / "docs"
    assert report_reference.main(["--model", str(tiny_model), "--quick", "--out", str(out), "--threads", "1"]) == 0
    markdown = (out / "reference_report.md").read_text()
    for heading in ("## Dense against pruned", "## Per-layer output error", "## Per-layer pruning"):
        assert heading in markdown
    figures = out / "reference_report"
    names = {path.name for path in figures.glob("*.png")}
    assert {"kept_ratio_2.png", "kept_ratio_3.png", "layer_error.png", "ppl_vs_ratio_builtin_128.png"} <= names
    assert all(f"]({figures.name}/{name})" in markdown for name in names)
    assert len(list(figures.glob("eval_*.json"))) == 3 and len(list(figures.glob("prune_*.json"))) == 2
