"""Long runs: an interrupted and resumed run trains exactly like an uninterrupted one (also after
kill -9), validation does not depend on batching or process count, non-finite steps are skipped."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_lm import DataSource, DialogDataModule, MaskedDiffusionLM, ScratchBackbone
from diffusion_lm.data import CanvasPolicy, DialogBatchSampler

from .conftest import DIALOGS, REPO, TINY, tiny_cli_args, write_jsonl


class Record(pl.Callback):
    """Per optimizer step: the loss and the examples of the batch."""

    def __init__(self) -> None:
        self.steps: dict[int, tuple[float, list[int]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = float(trainer.callback_metrics["train/loss"])
        self.steps[trainer.global_step] = (loss, batch["sample_index"].tolist())


def _data(path, **kw) -> DialogDataModule:
    return DialogDataModule([DataSource(str(path), format="messages", language="en", val_size=0)],
                            batch_size=4, max_length=96, canvas=CanvasPolicy(mode="sampled", length=16),
                            train_turns="all", **kw)


class StopAt(pl.Callback):
    """Stops the run after ``step`` optimizer steps (an interruption with the schedule unchanged)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit(tmp_path, data_file, max_steps, ckpt_path=None, every=None, stop=None) -> Record:
    pl.seed_everything(0)
    record = Record()
    callbacks = [record] + ([StopAt(stop)] if stop else [])
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_last=True,
                                         save_top_k=-1))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                         enable_checkpointing=bool(every), enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                         callbacks=callbacks, default_root_dir=tmp_path)
    model = MaskedDiffusionLM(ScratchBackbone(**TINY), warmup_steps=2, learning_rate=3e-3)
    trainer.fit(model, _data(data_file, cache_dir=str(tmp_path / "hf")), ckpt_path=ckpt_path)
    return record


def test_resume_mid_epoch_continues_exactly(tmp_path, messages_jsonl):
    """Straight 12 steps vs 5 steps + resume to 12 (an epoch is 8 batches: the resume is mid-epoch and
    the run crosses an epoch boundary): the same batches and bit-identical losses at every step."""
    straight = _fit(tmp_path / "a", messages_jsonl, 12)
    _fit(tmp_path / "b", messages_jsonl, 12, every=1, stop=5)
    resumed = _fit(tmp_path / "b", messages_jsonl, 12, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert sorted(resumed.steps) == list(range(6, 13))
    for step, (loss, examples) in resumed.steps.items():
        assert examples == straight.steps[step][1], f"step {step} trained other examples"
        assert loss == straight.steps[step][0], f"step {step}: {loss} vs {straight.steps[step][0]}"


def test_sampler_resume_skips_the_trained_batches_only():
    lengths = list(range(50))
    full = DialogBatchSampler(lengths, 4, strata=[i % 2 for i in lengths], seed=3)
    full.set_epoch(2)
    batches = list(full)
    resumed = DialogBatchSampler(lengths, 4, strata=[i % 2 for i in lengths], seed=3)
    resumed.resume(2, 3 * 4)
    resumed.set_epoch(2)
    assert list(resumed) == batches[3:]
    assert list(resumed) == batches  # the resume position applies to one iteration only
    other_epoch = DialogBatchSampler(lengths, 4, seed=3)
    other_epoch.resume(1, 8)
    other_epoch.set_epoch(2)
    assert len(list(other_epoch)) == len(full)


def _metrics(path: Path) -> dict[int, float]:
    """``train/loss`` per step from a CSVLogger file."""
    out = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def _cli(root: Path, data_file: Path, *extra: str) -> list[str]:
    args = tiny_cli_args(root, data_file, "--trainer.max_steps=12", "--trainer.log_every_n_steps=1",
                         "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                         f"--trainer.logger.save_dir={root}", "--trainer.logger.name=log",
                         "--trainer.logger.version=0", "--data.train_turns=all",
                         "--trainer.limit_val_batches=0", *extra)
    args = [a for a in args if a != "--trainer.logger=false"]
    return [sys.executable, "-m", "diffusion_lm", "fit"] + args


@pytest.mark.multiprocess
@pytest.mark.skipif(sys.platform != "linux", reason="needs POSIX signals")
def test_resume_after_kill_9_matches_the_uninterrupted_run(tmp_path, messages_jsonl):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    straight = tmp_path / "straight"
    subprocess.run(_cli(straight, messages_jsonl), check=True, env=env, cwd=tmp_path, capture_output=True)
    killed = tmp_path / "killed"
    ckpts = ["--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={killed / 'ckpt'}",
             "--trainer.callbacks.filename={step}", "--trainer.callbacks.every_n_train_steps=1",
             "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=-1"]
    proc = subprocess.Popen(_cli(killed, messages_jsonl, *ckpts), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "ckpt" / "step=5.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resume_from = torch.load(killed / "ckpt" / "last.ckpt", weights_only=False)["global_step"]
    assert 4 <= resume_from < 12  # step 5 or, killed while last.ckpt was replaced, step 4
    subprocess.run(_cli(killed, messages_jsonl, *ckpts, "--trainer.logger.version=1",
                        f"--ckpt_path={killed / 'ckpt' / 'last.ckpt'}"), check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    want = _metrics(straight / "log" / "version_0" / "metrics.csv")
    got = _metrics(killed / "log" / "version_1" / "metrics.csv")
    assert len(want) == 12 and sorted(got) == list(range(resume_from, 12))  # CSV steps count from 0
    for step in got:
        assert got[step] == want[step], f"step {step}: {got[step]} vs {want[step]}"


# ------------------------------------------------------------------------------------ validation
def _validate(tmp_path, data_file, devices=1, **data_kw) -> dict:
    pl.seed_everything(0)
    model = MaskedDiffusionLM(ScratchBackbone(**TINY))
    data = DialogDataModule([DataSource(str(data_file), format="messages", language="en", val_size=7)],
                            max_length=96, canvas=CanvasPolicy(length=16), cache_dir=str(tmp_path / "hf"),
                            **data_kw)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, default_root_dir=tmp_path)
    return trainer.validate(model, data, verbose=False)[0]


def test_validation_does_not_depend_on_batching(tmp_path, messages_jsonl):
    ref = _validate(tmp_path, messages_jsonl, batch_size=2)
    for kw in ({"batch_size": 7}, {"batch_size": 3, "batching": "padded"},
               {"batch_size": 4, "val_batch_size": 1}):
        got = _validate(tmp_path, messages_jsonl, **kw)
        assert got["val/nelbo"] == pytest.approx(ref["val/nelbo"], abs=1e-6), kw


@pytest.mark.multiprocess
@pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_two_processes_validate_like_one(tmp_path):
    """7 validation examples over 2 ranks of batch 2 (the last global batch is topped up with copies
    that must not count): the same NELBO as one process."""
    data_file = write_jsonl(tmp_path / "d.jsonl", DIALOGS[:15])
    one = _validate(tmp_path, data_file, batch_size=2)
    two = _validate(tmp_path, data_file, devices=2, batch_size=2)
    assert two["val/nelbo"] == pytest.approx(one["val/nelbo"], abs=1e-6)
    assert two["val/nelbo_en"] == pytest.approx(one["val/nelbo_en"], abs=1e-6)


# ---------------------------------------------------------------------------------- non-finite guard
class _NanAt(MaskedDiffusionLM):
    """Returns a NaN loss for the given training batches (0-based; as a bad batch or an overflow would)."""

    nan_steps: tuple = ()
    batches = 0

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.batches += 1
        return out

    def _nelbo(self, *args, **kwargs):
        out = super()._nelbo(*args, **kwargs)
        if self.nan_steps == "all" or self.batches in self.nan_steps:
            out.loss = out.loss * float("nan")
            out.weighted_sum = out.weighted_sum * float("nan")
        return out


def _nan_run(tmp_path, data_file, nan_steps, max_steps, **kw):
    model = _NanAt(ScratchBackbone(**TINY), warmup_steps=0, **kw)
    model.nan_steps = nan_steps
    weights = []

    class Weights(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            weights.append(next(pl_module.parameters()).detach().clone())

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, limit_val_batches=0, callbacks=[Weights()],
                         default_root_dir=tmp_path)
    trainer.fit(model, _data(data_file, cache_dir=str(tmp_path / "hf")))
    return model, trainer, weights


def test_a_nan_step_is_skipped_and_counted(tmp_path, messages_jsonl):
    model, trainer, weights = _nan_run(tmp_path, messages_jsonl, (2,), 5)
    assert model.skipped_steps == 1 and trainer.global_step == 5  # the NaN batch did not count as a step
    assert torch.equal(weights[2], weights[1])  # the skipped step left the weights as they were
    assert not torch.equal(weights[3], weights[2])
    assert all(torch.isfinite(w).all() for w in weights)
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1


def test_a_diverged_run_stops_with_the_step_and_checkpoint(tmp_path, messages_jsonl):
    from diffusion_lm.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged,
                       match=r"stopped at step 0: 3 optimizer steps in a row .*no checkpoint"):
        _nan_run(tmp_path, messages_jsonl, "all", 10, max_nonfinite_steps=3)


def test_a_diverging_cli_run_exits_non_zero_with_one_line(tmp_path, messages_jsonl, capsys):
    from diffusion_lm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit"] + tiny_cli_args(tmp_path, messages_jsonl, "--model.learning_rate=1e6",
                                     "--model.max_nonfinite_steps=2", "--model.gradient_clip_val=null",
                                     "--trainer.max_steps=30"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("diffusion-lm: error: training stopped at step") and "non-finite" in err
