"""Evaluation tasks, sweeps and the report of `diffusion-lm test`, on a tiny untrained model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from diffusion_lm import DataSource, DialogDataModule, MaskedDiffusionLM, ScratchBackbone
from diffusion_lm.data import CanvasPolicy
from diffusion_lm.errors import ConfigError
from diffusion_lm.evaluation import (
    EvaluationSuite,
    TaskSpec,
    bridge_nelbo,
    read_task,
    run_task,
    sweep_samplers,
)
from diffusion_lm.sampling import SamplerConfig
from diffusion_lm.sampling.policies import ScheduleSelector
from diffusion_lm.sampling.processors import RepetitionGuard

from .conftest import TINY, write_jsonl

CHAT = [{"id": "a", "language": "en", "messages": [{"role": "user", "content": "Hello there"}],
         "reference": "Hi! How can I help?"},
        {"id": "b", "language": "ru", "prompt": "Как дела?", "reference": "Хорошо, спасибо."}]
FIM = [{"id": "f", "prefix": "def add(a, b):\n    ", "middle": "c = a + b", "suffix": "\n    return c",
        "source": "example"}]
BRIDGE = [{"id": "g", "language": "en", "before": "It rained all day.", "bridge": "The roads flooded.",
           "after": "Schools were closed."}]
EDIT = [{"id": "e", "language": "en", "text": "The movie was really bad, honestly.", "span": [14, 24],
         "reference": "quite dull"}]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> MaskedDiffusionLM:
    torch.manual_seed(0)
    return MaskedDiffusionLM(ScratchBackbone(**TINY), canvas_length=8, health_check=False).eval()


@pytest.fixture
def task_files(tmp_path) -> dict[str, Path]:
    return {kind: write_jsonl(tmp_path / f"{kind}.jsonl", rows)
            for kind, rows in (("chat", CHAT), ("fim", FIM), ("bridge", BRIDGE), ("edit", EDIT))}


# ---------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("kind, line, message", [
    ("chat", "{not json", "line 1: not valid JSON"),
    ("fim", '{"prefix": "x", "middle": "y"}', "line 1: a fim record needs prefix, middle, suffix; 'suffix'"),
    ("edit", '{"text": "abc", "span": [2, 9]}', "line 1: span must be [start, end]"),
    ("bridge", '{"before": "a", "bridge": " ", "after": "b"}', "line 1: 'bridge' is empty"),
    ("chat", '{"reference": "x"}', "line 1: a chat record needs \"messages\""),
])
def test_bad_task_records_are_one_line_errors_naming_file_and_line(tmp_path, kind, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        read_task(TaskSpec(kind, str(path)))
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_bad_task_specs():
    with pytest.raises(ConfigError, match="kind 'quiz' is not one of"):
        TaskSpec.coerce({"kind": "quiz", "path": "x"})
    with pytest.raises(ConfigError, match="no such file"):
        read_task(TaskSpec("chat", "missing.jsonl"))
    with pytest.raises(ConfigError, match="slack must be >= 1"):
        TaskSpec.coerce({"kind": "fim", "path": "x", "slack": 0.5})


# ---------------------------------------------------------------------------------------- running
def test_every_task_kind_reports_its_figures(model, task_files):
    sampler = SamplerConfig.preset("fast")
    chat = run_task(model, TaskSpec("chat", str(task_files["chat"])), sampler)
    assert [r["id"] for r in chat.rows] == ["a", "b"] and chat.languages == ["en", "ru"]
    for key in ("chrf", "exact", "rep3", "looping", "distinct1", "distinct2", "empty", "length", "nfe",
                "chrf_en", "chrf_ru", "looping_ru"):
        assert key in chat.metrics, key
    assert 0.0 <= chat.metrics["chrf"] <= 100.0

    fim = run_task(model, TaskSpec("fim", str(task_files["fim"])), sampler)
    (row,) = fim.rows
    n = len(model.template.encode_text("c = a + b"))
    # a fixed hole is filled with exactly n text tokens; a variable one with at most ceil(1.5 n)
    assert row["figures"]["fixed/length"] == n and row["figures"]["fixed/empty"] == 0.0
    assert row["figures"]["variable/length"] <= math.ceil(1.5 * n)
    assert row["figures"]["fixed/parses"] in (0.0, 1.0) and "fixed/exact_python" in fim.metrics
    assert "fixed/chrf_src:example" in fim.metrics

    edit = run_task(model, TaskSpec("edit", str(task_files["edit"])), sampler)
    (row,) = edit.rows
    assert row["figures"]["fixed/rest_identical"] == 1.0 and row["figures"]["variable/rest_identical"] == 1.0
    filled = row["fixed"]["filled"]
    assert filled.startswith("The movie was ") and filled.endswith(", honestly.")

    bridge = run_task(model, TaskSpec("bridge", str(task_files["bridge"]), nelbo_samples=4), sampler)
    (row,) = bridge.rows
    assert math.isfinite(row["figures"]["nelbo"]) and row["figures"]["nelbo"] > 0
    assert {"fixed/chrf", "variable/chrf", "nelbo_en"} <= set(bridge.metrics)


def test_bridge_nelbo_is_deterministic_and_an_upper_bound_scale(model):
    a = bridge_nelbo(model, "It rained. ", "The roads flooded.", " Schools closed.", samples=4, seed=0)
    b = bridge_nelbo(model, "It rained. ", "The roads flooded.", " Schools closed.", samples=4, seed=0)
    assert a == b
    # an untrained model is close to uniform: the bound is near log V per token, far from 0
    assert 0.5 * math.log(len(model.tokenizer)) < a < 3 * math.log(len(model.tokenizer))


def test_records_too_long_for_the_model_are_skipped_with_a_reason(model, tmp_path):
    long_text = "word " * 200
    path = write_jsonl(tmp_path / "fim.jsonl", [FIM[0], {**FIM[0], "id": "long", "prefix": long_text}])
    result = run_task(model, TaskSpec("fim", str(path)), SamplerConfig.preset("fast"))
    assert [r["id"] for r in result.rows] == ["f"]
    assert len(result.skipped) == 1 and "line 2" in result.skipped[0] and "limit" in result.skipped[0]


def test_sweep_samplers_change_one_setting():
    base = SamplerConfig.preset("quality")
    (_, s4), (_, s8) = sweep_samplers(base, "steps", [4, 8], "quality")
    assert isinstance(s4.selector, ScheduleSelector) and s4 != s8
    (off, c_off), (on, c_on) = sweep_samplers(base, "repetition_guard", ["off", "on"])
    assert (off, on) == ("off", "on")
    assert not any(isinstance(p, RepetitionGuard) for p in c_off.processors)
    assert sum(isinstance(p, RepetitionGuard) for p in c_on.processors) == 1
    with pytest.raises(ConfigError, match="unknown sweep factor"):
        sweep_samplers(base, "temperature", [1.0])


# ------------------------------------------------------------------------------- diffusion-lm test
def test_evaluation_suite_writes_the_report_after_test(model, task_files, messages_jsonl, tmp_path):
    data = DialogDataModule([DataSource(str(messages_jsonl), format="messages", language="en", val_size=4)],
                            batch_size=4, max_length=96, canvas=CanvasPolicy(length=8))
    out = tmp_path / "report"
    suite = EvaluationSuite(
        tasks=[{"kind": k, "path": str(p), "nelbo_samples": 2} for k, p in task_files.items()],
        output_dir=str(out), preset="fast", steps=[2, 4], repetition_guard=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[suite],
                         default_root_dir=tmp_path)
    trainer.test(model, data, verbose=False)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(report["tasks"]) == {"chat", "fim", "bridge", "edit"}
    assert "test/nelbo" in report["test"] and "test/acc_mask15_en" in report["test"]
    assert {(r["factor"], r["value"]) for r in report["sweep"] if r["task"] == "chat"} == {
        ("steps", 2), ("steps", 4), ("repetition_guard", "off"), ("repetition_guard", "on")}
    assert any(r["task"] == "chat[ru]" for r in report["sweep"])  # per language as well
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Task `fim`" in md and "| fixed/parses |" in md and "## Sampler sweep" in md
    for factor in ("steps", "repetition_guard"):
        png = out / f"sweep_{factor}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_options_are_checked_early(task_files):
    with pytest.raises(ConfigError, match="batch_size"):
        EvaluationSuite(tasks=[{"kind": "chat", "path": str(task_files["chat"])}], batch_size=0)
    with pytest.raises(ConfigError, match="preset"):
        EvaluationSuite(tasks=[{"kind": "chat", "path": str(task_files["chat"])}], preset="turbo")


def test_the_shipped_suite_config_and_task_files_load():
    """configs/eval/suite.yaml composes with the demo recipe through the CLI, and its task files parse."""
    from diffusion_lm.cli import DiffusionLMCLI

    from .conftest import REPO

    cli = DiffusionLMCLI(args=["--config", str(REPO / "configs" / "demo.yaml"), "--config",
                               str(REPO / "configs" / "eval" / "suite.yaml")], run=False)
    (suite,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, EvaluationSuite)]
    assert [t.kind for t in suite.tasks] == ["chat", "fim", "bridge", "edit"]
    assert set(suite.sweep) == {"steps", "threshold", "block_size", "repetition_guard"}
    for spec in suite.tasks:
        records = read_task(TaskSpec(spec.kind, str(REPO / spec.path)))
        assert len(records) >= 12
        if spec.kind == "fim":  # each original function parses
            import ast

            for rec in records:
                ast.parse(rec["prefix"] + rec["middle"] + rec["suffix"])
