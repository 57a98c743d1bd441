"""A stop signal saves a checkpoint and exits 128 + signal (not 0 with nothing saved, lightning#19916)."""

from __future__ import annotations

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
from diffusion_lm.cli import main
from diffusion_lm.data import CanvasPolicy
from diffusion_lm.preemption import Preempted, PreemptionCheckpoint

from .conftest import REPO, TINY, tiny_cli_args

PERIODIC = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_last=true"]


def _fit_args(root: Path, data: Path, *extra: str) -> list[str]:
    args = [a for a in tiny_cli_args(root, data) if not a.startswith("--trainer.max_steps")]
    return args + ["--model.health_check=false"] + PERIODIC + list(extra)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_a_checkpoint_exits_143_and_the_checkpoint_resumes(tmp_path, messages_jsonl, caplog):
    out = tmp_path / "fit.log"
    cmd = [sys.executable, "-m", "diffusion_lm", "fit"] + _fit_args(tmp_path, messages_jsonl,
                                                                    "--trainer.max_steps=100000")
    with out.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        # The first periodic checkpoint means the training loop is running.
        while (not list(tmp_path.rglob("*step=*.ckpt")) and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.1)
        assert proc.poll() is None, out.read_text()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    text = out.read_text()
    assert code == 143, text
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"SIGTERM received: saved {last}" in text and "exiting with code 143" in text
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert step >= 2
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    # The checkpoint resumes: two more steps from where it stopped.
    caplog.set_level("INFO")
    main(["fit"] + _fit_args(tmp_path, messages_jsonl, f"--trainer.max_steps={step + 2}",
                             f"--ckpt_path={last}"))
    err = caplog.text
    assert f"resuming from {last} at step {step}: same model; no option changed" in err
    assert f"`max_steps={step + 2}` reached" in err


class SendSignal(pl.Callback):
    """Sends ``signum`` to this process at the start of training step ``step`` on rank ``rank``."""

    def __init__(self, signum: int, step: int, rank: int = 0) -> None:
        self.signum, self.step, self.rank = signum, step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


def _parts(data_file: Path):
    pl.seed_everything(0)
    model = MaskedDiffusionLM(ScratchBackbone(**TINY), warmup_steps=1, health_check=False)
    data = DialogDataModule([DataSource(str(data_file), format="messages", language="en", val_size=0)],
                            batch_size=2, max_length=96, canvas=CanvasPolicy(length=16))
    return model, data


def _trainer(root: Path, *callbacks, devices: int = 1) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                      max_steps=50, limit_val_batches=0, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False, default_root_dir=root,
                      callbacks=[ModelCheckpoint(dirpath=root / "ckpt"), *callbacks])


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_sigusr1_saves_at_the_step_end_exits_138_and_restores_handlers(tmp_path, messages_jsonl):
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))  # a user's handler
    try:
        model, data = _parts(messages_jsonl)
        with pytest.raises(Preempted) as info:
            _trainer(tmp_path, PreemptionCheckpoint(), SendSignal(signal.SIGUSR1, step=2)).fit(model, data)
        assert info.value.code == 128 + signal.SIGUSR1 == 138
        assert seen == [signal.SIGUSR1]  # the handler installed before training still ran
        checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == 3  # the step during which the signal came, completed
        assert signal.getsignal(signal.SIGUSR1) is not None and seen  # handlers restored after fit
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] * 2
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_unknown_or_uncatchable_signal_names_are_config_errors():
    from diffusion_lm.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown signal 'SIGFOO'"):
        PreemptionCheckpoint(signals=["SIGFOO"])
    with pytest.raises(ConfigError, match="cannot be caught"):
        PreemptionCheckpoint(signals=["KILL"])
    assert PreemptionCheckpoint(signals=["term"]).signals == [signal.SIGTERM]
    assert PreemptionCheckpoint(signals=[]).signals == []


@pytest.mark.multiprocess
@pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, messages_jsonl):
    model, data = _parts(messages_jsonl)
    trainer = _trainer(tmp_path, PreemptionCheckpoint(), SendSignal(signal.SIGUSR1, step=1, rank=1),
                       devices=2)
    with pytest.raises(Exception) as info:  # the spawned ranks exit with 138
        trainer.fit(model, data)
    assert "138" in str(info.value)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2  # rank 0 never got the signal, yet saved at rank 1's step


class HandlerProbe(pl.Callback):
    """Records the SIGTERM and SIGUSR1 handlers in force during training."""

    def __init__(self) -> None:
        self.handlers = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_slurm_auto_requeue_keeps_lightnings_requeue_handler(tmp_path, messages_jsonl, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for key, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242",
                       "SLURM_JOB_NAME": "train"}.items():
        monkeypatch.setenv(key, value)
    preemption, probe = PreemptionCheckpoint(), HandlerProbe()
    model, data = _parts(messages_jsonl)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=tmp_path, callbacks=[preemption, probe],
                         plugins=[SLURMEnvironment(auto_requeue=True)])
    trainer.fit(model, data)
    assert probe.handlers[signal.SIGTERM] == preemption._handler  # SIGTERM: save and exit 143
    assert probe.handlers[signal.SIGUSR1] != preemption._handler  # SIGUSR1: Lightning's hpc save + requeue
    assert callable(probe.handlers[signal.SIGUSR1])
