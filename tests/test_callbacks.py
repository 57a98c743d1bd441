"""ValidationSampling: answers the fixed validation prompts at validation end, writes JSONL rows,
logs per-language scalars and a TensorBoard text table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from diffusion_lm import CanvasPolicy, DataSource, DialogDataModule, MaskedDiffusionLM, ScratchBackbone
from diffusion_lm.callbacks import ValidationSampling
from diffusion_lm.data import ValidationPrompt
from diffusion_lm.errors import ConfigError
from diffusion_lm.sampling import SamplerConfig

from .conftest import REPO, TINY

PROMPTS = [ValidationPrompt("Hello there", "en"), ValidationPrompt("Как дела?", "ru"),
           ValidationPrompt("What is 2+2?", "en"), ValidationPrompt("Что нового?", "ru")]
ROW_KEYS = {"step", "epoch", "prompt", "language", "answer", "rep3", "longest_run", "length", "nfe", "tokens",
            "tokens_per_forward", "seconds", "empty", "eos_position", "ended", "distinct1", "distinct2",
            "longest_repeat", "looping"}


def _parts(data_file: Path):
    model = MaskedDiffusionLM(ScratchBackbone(**TINY), canvas_length=12, health_check=False, warmup_steps=1)
    data = DialogDataModule([DataSource(path=str(data_file), format="messages", language="en", val_size=4)],
                            batch_size=4, max_length=96, canvas=CanvasPolicy(length=12),
                            validation_prompts=list(PROMPTS))
    return model, data


def _sampler(model) -> dict:
    # An untrained model tends to commit EOS first; keep it out so answers have tokens to measure.
    return {"preset": "fast", "suppress_tokens": [model.template.eos_id]}


def _trainer(root: Path, callback, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, limit_val_batches=1, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                    default_root_dir=str(root), log_every_n_steps=1)
    return pl.Trainer(callbacks=[callback], **{**defaults, **kwargs})


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_fit_writes_samples_logs_scalars_and_tensorboard_text(tmp_path, messages_jsonl):
    model, data = _parts(messages_jsonl)
    callback = ValidationSampling(sampler=_sampler(model))
    trainer = _trainer(tmp_path, callback, max_steps=2, val_check_interval=1, num_sanity_val_steps=1,
                       logger=TensorBoardLogger(str(tmp_path), name="logs"))
    trainer.fit(model, data)

    path = Path(trainer.log_dir) / "val_samples.jsonl"
    assert callback.path == path and path.parent.name.startswith("version_")
    rows = _rows(path)
    # two validations (steps 1 and 2; the sanity check does not count), four prompts each
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4
    assert all(set(r) == ROW_KEYS for r in rows)
    assert [r["prompt"] for r in rows[:4]] == [p.text for p in PROMPTS]
    assert [r["language"] for r in rows[:4]] == ["en", "ru", "en", "ru"]
    for r in rows:
        assert r["length"] >= 1 and isinstance(r["answer"], str)
        assert 0.0 <= r["rep3"] <= 1.0 and r["longest_run"] >= 1
        assert r["nfe"] >= 1 and r["tokens_per_forward"] == pytest.approx(r["tokens"] / r["nfe"], rel=1e-4)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    last = rows[4:]
    en, ru = [r for r in last if r["language"] == "en"], [r for r in last if r["language"] == "ru"]
    assert metrics["val_samples/len_ru"] == pytest.approx(sum(r["length"] for r in ru) / 2)
    assert metrics["val_samples/rep3_en"] == pytest.approx(sum(r["rep3"] for r in en) / 2, abs=1e-5)
    assert metrics["val_samples/tokens_per_forward"] == pytest.approx(
        sum(r["tokens"] for r in last) / sum(r["nfe"] for r in last))
    assert {"val_samples/rep3_ru", "val_samples/len_en", "val_samples/nfe",
            "val_samples/longest_run_en"} <= set(metrics)
    # every answer metric, per language
    for name in ("distinct1", "distinct2", "longest_repeat", "looping", "empty", "ended"):
        for lang, group in (("en", en), ("ru", ru)):
            assert metrics[f"val_samples/{name}_{lang}"] == pytest.approx(sum(r[name] for r in group) / 2,
                                                                          abs=1e-5)
    for r in rows:  # the EOS position is in the canvas, after the answer; null when the answer never ended
        assert (r["eos_position"] is None) == (r["ended"] == 0.0)
        assert r["eos_position"] is None or r["eos_position"] >= r["length"]

    events = b"".join(f.read_bytes() for f in Path(trainer.log_dir).glob("events.out.tfevents.*"))
    assert b"val_samples" in events and "| lang | prompt | answer |".encode() in events
    assert "Как дела?".encode() in events


def test_validate_every_n_max_prompts_without_logger(tmp_path, messages_jsonl):
    model, data = _parts(messages_jsonl)
    callback = ValidationSampling(sampler=_sampler(model), every_n_validations=2, max_prompts=2,
                                  filename="s.jsonl")
    trainer = _trainer(tmp_path, callback, logger=False)
    results = [trainer.validate(model, data, verbose=False)[0] for _ in range(3)]
    rows = _rows(tmp_path / "s.jsonl")  # no logger: the run's default_root_dir
    # validations 1 and 3 sample; max_prompts=2 takes one prompt per language (round-robin)
    assert len(rows) == 4 and [r["language"] for r in rows] == ["en", "ru", "en", "ru"]
    assert [r["prompt"] for r in rows[:2]] == ["Hello there", "Как дела?"]
    assert rows[:2] == [dict(r, seconds=r0["seconds"]) for r, r0 in zip(rows[2:], rows[:2])]  # fixed seed
    assert "val_samples/rep3_en" in results[0] and "val_samples/len_ru" in results[2]
    assert "val_samples/rep3_en" not in results[1]
    assert callback.state_dict() == {"validations": 3}
    restored = ValidationSampling()
    restored.load_state_dict(callback.state_dict())
    assert restored.validations == 3


def test_options_and_demo_config():
    assert ValidationSampling().sampler == SamplerConfig.preset("quality")
    fast_yaml = str(REPO / "configs/sampler/fast.yaml")
    assert ValidationSampling(sampler=fast_yaml).sampler == SamplerConfig.preset("fast")
    assert ValidationSampling(preset="greedy", sampler={"window": "full"}).sampler == \
        SamplerConfig.preset("greedy", window="full")
    for bad in ({"every_n_validations": 0}, {"max_prompts": 0}, {"canvas_length": -1}, {"preset": "turbo"}):
        with pytest.raises(ConfigError):
            ValidationSampling(**bad)
    demo = yaml.safe_load((REPO / "configs/demo.yaml").read_text(encoding="utf-8"))
    specs = [c for c in demo["trainer"]["callbacks"]
             if c["class_path"] == "diffusion_lm.callbacks.ValidationSampling"]
    assert len(specs) == 1
    assert isinstance(ValidationSampling(**specs[0].get("init_args", {})), ValidationSampling)


@pytest.mark.multiprocess
@pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_two_ranks_sample_without_deadlock_and_write_once(tmp_path, messages_jsonl):
    model, data = _parts(messages_jsonl)
    data.batch_size = data.val_batch_size = 2
    callback = ValidationSampling(sampler=_sampler(model), max_prompts=2)
    trainer = _trainer(tmp_path, callback, devices=2, strategy="ddp_spawn", max_steps=2, val_check_interval=1,
                       num_sanity_val_steps=0, logger=TensorBoardLogger(str(tmp_path), name="logs"))
    trainer.fit(model, data)
    paths = list(Path(tmp_path).rglob("val_samples.jsonl"))
    assert len(paths) == 1
    rows = _rows(paths[0])  # rank 0 alone writes: 2 validations x 2 prompts
    assert [(r["step"], r["language"]) for r in rows] == [(1, "en"), (1, "ru"), (2, "en"), (2, "ru")]
