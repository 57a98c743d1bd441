"""Resuming with --ckpt_path: the config is applied (never silently replaced by the checkpoint's),
the LR schedule carries on without re-warming, a different model is a one-line error."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from diffusion_lm.cli import main

from .conftest import DIALOGS, tiny_cli_args, write_jsonl


class LRRecorder(pl.Callback):
    """Records ``(step, learning rate)`` at the start of every training step."""

    seen: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        LRRecorder.seen.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))


def _args(root, data, *extra: str) -> list[str]:
    args = [a for a in tiny_cli_args(root,
                                     data) if not a.startswith(("--trainer.max_steps", "--model.warmup_steps",
                                                                      "--trainer.logger"))]
    return ["fit"] + args + [
        "--model.health_check=false", "--model.warmup_steps=4", "--model.lr_schedule=constant",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                             "--trainer.callbacks.save_last=true",
        f"--trainer.callbacks+={__name__}.LRRecorder", *extra]


def test_resume_applies_the_new_learning_rate_without_rewarming(tmp_path, messages_jsonl, caplog):
    LRRecorder.seen = []
    main(_args(tmp_path, messages_jsonl, "--trainer.max_steps=6", "--model.learning_rate=1e-3"))
    assert [lr for _, lr in LRRecorder.seen] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    first = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert first.is_file()

    # A later run logs to version_1; `--ckpt_path last` still finds version_0's last.ckpt.
    LRRecorder.seen = []
    caplog.set_level("INFO")
    main(_args(tmp_path, messages_jsonl, "--trainer.max_steps=9", "--model.learning_rate=2e-3",
               "--ckpt_path=last"))
    assert (f"resuming from {first} at step 6: same model; applied changed options: "
            "learning_rate 0.001 -> 0.002") in caplog.text
    # Extending max_steps does not re-warm; the new rate applies from the first resumed step.
    assert LRRecorder.seen == [(6, 2e-3), (7, 2e-3), (8, 2e-3)]
    second = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(second, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 9 and checkpoint["hyper_parameters"]["learning_rate"] == 2e-3


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """``(root, data file, last.ckpt)`` of a one-step run."""
    root = tmp_path_factory.mktemp("one_step")
    data = write_jsonl(root / "dialogs.jsonl", DIALOGS)
    main(_args(root, data, "--trainer.max_steps=1"))
    return root, data, next(root.rglob("last.ckpt"))


@pytest.mark.parametrize("change, key", [
    ("--model.backbone.hidden_size=64", "model.backbone.hidden_size"),
    ("--model.schedule=diffusion_lm.schedules.CosineSchedule", "model.schedule.class_path"),
    ("--model.role_headers={user: 'Q:'}", "model.role_headers.user"),
])
def test_a_different_model_is_an_error_naming_the_key_before_any_data_is_read(one_step_run, capsys,
                                                                              monkeypatch, change, key):
    root, data, last = one_step_run

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the checkpoint was checked")

    monkeypatch.setattr("diffusion_lm.data.mix.load_raw", no_data)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(_args(root, data, "--trainer.max_steps=2", f"--ckpt_path={last}", change))
    assert info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"diffusion-lm: error: {key} differs from the checkpoint {last}")
