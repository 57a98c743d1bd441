"""Data-parallel training equals one process with the whole batch (CPU DDP over gloo)."""

from __future__ import annotations

import sys

import pytest
import torch
import lightning.pytorch as pl

from diffusion_lm import DataSource, DialogDataModule, MaskedDiffusionLM, ScratchBackbone
from diffusion_lm.data import CanvasPolicy
from diffusion_lm.objective import counter_uniform

from .conftest import TINY


class GradCapture(pl.Callback):
    """Saves the (already all-reduced) gradients just before the first optimizer step."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0 and trainer.global_rank == 0:
            grads = {n: p.grad.detach().clone()
                     for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save(grads, self.path)


def _train_one_step(tmp_path, data_file, devices: int, batch_size: int, micro: int | None, out: str,
                    peft: dict | None = None):
    pl.seed_everything(0)
    model = MaskedDiffusionLM(ScratchBackbone(**TINY), micro_batch_size=micro, warmup_steps=0,
                              gradient_clip_val=None, peft=peft)
    data = DialogDataModule(
        [DataSource(str(data_file), format="messages", language="en", val_size=0)],
        batch_size=batch_size,
        max_length=96,
        canvas=CanvasPolicy(length=16),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[GradCapture(out)],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    return torch.load(out)


def test_counter_noise_is_uniform_and_independent_of_batch_split():
    rows = torch.arange(64)
    u = counter_uniform(3, 7, rows, 256)
    assert 0.49 < u.mean().item() < 0.51 and u.min() >= 0 and u.max() < 1
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1].item()) < 0.02
    torch.testing.assert_close(torch.cat([counter_uniform(3, 7, rows[:20], 256),
                                          counter_uniform(3, 7, rows[20:], 256)]), u)
    assert not torch.equal(counter_uniform(3, 8, rows, 256), u)  # a new step draws new masks


def test_micro_batches_give_the_whole_batch_gradient(tmp_path, messages_jsonl):
    whole = _train_one_step(tmp_path, messages_jsonl, 1, 8, None, str(tmp_path / "whole.pt"))
    micro = _train_one_step(tmp_path, messages_jsonl, 1, 8, 3, str(tmp_path / "micro.pt"))
    assert whole.keys() == micro.keys() and whole
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.multiprocess
@pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("peft", [None, {"r": 4, "dropout": 0.0}], ids=["full", "lora"])
def test_two_ranks_give_the_single_process_gradient(tmp_path, messages_jsonl, peft):
    single = _train_one_step(tmp_path, messages_jsonl, 1, 8, None, str(tmp_path / "single.pt"), peft)
    ddp = _train_one_step(tmp_path, messages_jsonl, 2, 4, None, str(tmp_path / "ddp.pt"), peft)
    assert single.keys() == ddp.keys() and single
    if peft is not None:  # only the adapters (and the fresh head of a model built from a config) train
        assert all(".lora_" in n or ".head." in n or "decoder.bias" in n for n in single), sorted(single)
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
