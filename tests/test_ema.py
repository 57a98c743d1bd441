"""EMA of the weights: validation and the sampling callback see the average, checkpoints hold both,
and a resumed run continues the same average."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_lm import DataSource, DialogDataModule, MaskedDiffusionLM, ScratchBackbone
from diffusion_lm.callbacks import ValidationSampling
from diffusion_lm.data import CanvasPolicy
from diffusion_lm.ema import EMA
from diffusion_lm.errors import ConfigError

from .conftest import TINY

PARAM = "net.model.model.embeddings.tok_embeddings.weight"


class ProbeSampling(ValidationSampling):
    """The sampling callback, recording the weights it samples with."""

    def __init__(self) -> None:
        super().__init__(preset="greedy", canvas_length=4, max_prompts=1)
        self.seen: list[torch.Tensor] = []

    def sample(self, trainer, pl_module):
        self.seen.append(dict(pl_module.named_parameters())[PARAM].detach().clone())
        return super().sample(trainer, pl_module)


class StopAfter(pl.Callback):
    """Saves a checkpoint in ``on_train_batch_end`` at ``step`` and stops (listed before the EMA, as
    a preemption checkpoint may be: the step's EMA update has not run yet when it saves)."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def _data(path, tmp_path) -> DialogDataModule:
    return DialogDataModule(
        [DataSource(str(path), format="messages", language="en", val_size=4)],
        batch_size=4,
        max_length=96,
        canvas=CanvasPolicy(length=16),
        cache_dir=str(tmp_path / "hf"),
    )


def _fit(tmp_path, data_file, callbacks, max_steps=4, val_every=None, ckpt_path=None):
    pl.seed_everything(0)
    model = MaskedDiffusionLM(
        ScratchBackbone(**TINY), warmup_steps=0, learning_rate=1e-2, lr_schedule="constant"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=None if val_every else 0,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, _data(data_file, tmp_path), ckpt_path=ckpt_path)
    return trainer


def test_validation_and_sampling_see_the_average(tmp_path, messages_jsonl):
    plain = _fit(tmp_path / "plain", messages_jsonl, [], val_every=4)
    probe = ProbeSampling()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ema", save_last=True)
    # The probe is listed after the EMA: Lightning's callback would have swapped the trained weights
    # back by the time it samples.
    ema = _fit(tmp_path / "ema", messages_jsonl, [EMA(decay=0.5), probe, ckpt], val_every=4)
    late = _fit(tmp_path / "late", messages_jsonl, [EMA(decay=0.5, update_starting_at_step=100)], val_every=4)

    val_plain, val_ema = float(plain.callback_metrics["val/nelbo"]), float(ema.callback_metrics["val/nelbo"])
    assert abs(val_ema - val_plain) > 1e-3  # validation saw other weights
    # Averaging has not started: the average is the current model (not the initial weights).
    assert float(late.callback_metrics["val/nelbo"]) == pytest.approx(val_plain, abs=1e-6)

    state = torch.load(tmp_path / "ema" / "last.ckpt", weights_only=False)
    average, current = state["state_dict"][PARAM], state["current_model_state"][PARAM]
    assert not torch.equal(average, current)
    assert len(probe.seen) == 1 and torch.equal(probe.seen[0], average)

    # The checkpoint's state_dict is the average: validating it reproduces the in-training figure.
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    model = MaskedDiffusionLM(ScratchBackbone(**TINY))
    got = trainer.validate(
        model, _data(messages_jsonl, tmp_path), ckpt_path=tmp_path / "ema" / "last.ckpt", verbose=False
    )[0]
    assert got["val/nelbo"] == pytest.approx(val_ema, abs=1e-6)


def test_a_resumed_run_continues_the_same_average(tmp_path, messages_jsonl):
    straight = ModelCheckpoint(dirpath=tmp_path / "a", save_last=True)
    _fit(tmp_path / "a", messages_jsonl, [EMA(decay=0.7), straight], max_steps=6)
    stop_path = str(tmp_path / "b" / "stop.ckpt")
    _fit(tmp_path / "b", messages_jsonl, [StopAfter(3, stop_path), EMA(decay=0.7)], max_steps=6)
    saved = torch.load(stop_path, weights_only=False)
    assert int(saved["averaging_state"]["n_averaged"]) == 3  # the pending update was applied before saving
    resumed = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    _fit(tmp_path / "b", messages_jsonl, [EMA(decay=0.7), resumed], max_steps=6, ckpt_path=stop_path)

    want = torch.load(tmp_path / "a" / "last.ckpt", weights_only=False)
    got = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)
    assert got["global_step"] == want["global_step"] == 6
    for key in ("state_dict", "current_model_state"):
        for name, value in want[key].items():
            torch.testing.assert_close(got[key][name], value, rtol=0, atol=1e-6, msg=f"{key} {name}")
    assert not torch.equal(want["state_dict"][PARAM], want["current_model_state"][PARAM])


def test_options_are_checked():
    with pytest.raises(ConfigError, match="EMA.decay"):
        EMA(decay=1.0)
    with pytest.raises(ConfigError, match="update_every_n_steps"):
        EMA(update_every_n_steps=0)
