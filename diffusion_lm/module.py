"""MaskedDiffusionLM: the LightningModule that fine-tunes an encoder as a masked-diffusion LM."""

from __future__ import annotations

import logging
import math
import warnings
import zlib
from typing import Any, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from .backbone import Backbone, ScratchBackbone, load_backbone
from .data.conversation import Conversation, Turn
from .data.template import ChatTemplate
from .errors import ConfigError
from .metrics import LanguageNelbo
from .objective import counter_uniform, masked_diffusion_nelbo
from .resume import apply_optimizer_hparams, changed_hparams, check_resume, describe_resume
from .schedules import LogLinearSchedule, NoiseSchedule, stratified_times

__all__ = ["MaskedDiffusionLM", "load_model"]

log = logging.getLogger(__name__)

# Lightning warns that a step checkpoint of a manually optimised module holds the weights *after*
# the step. That is what we want: a checkpoint at global_step N holds the weights after N updates,
# exactly as under automatic optimisation.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")

_BATCH_TENSORS = ("input_ids", "attention_mask", "loss_mask", "loss_weight", "metric_mask")


def check_options(**options: Any) -> None:
    """One-line errors for out-of-range ``model.*`` options, before anything is loaded or read."""
    rules = {
        "learning_rate": (lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0 (e.g. 1e-4)"),
        "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0"),
        "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1), e.g. [0.9, 0.98]"),
        "warmup_steps": (lambda v: v >= 0, "must be >= 0 (0 disables warm-up)"),
        "min_lr_ratio": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        "micro_batch_size": (lambda v: v is None or v >= 1, "must be >= 1 (or unset: the whole batch at once)"),
        "gradient_clip_val": (lambda v: v is None or (math.isfinite(v) and v >= 0),
                              "must be >= 0 (or unset: no clipping)"),
        "time_eps": (lambda v: 0 < v < 1, "must be in (0, 1), e.g. 1e-3 (the 1/t weight is infinite at t = 0)"),
        "canvas_length": (lambda v: v >= 1, "must be >= 1"),
    }
    for name, value in options.items():
        ok, what = rules[name]
        if not ok(value):
            raise ConfigError(f"model.{name} {what}, got {value}")


def _seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is salted per process for str)."""
    return zlib.crc32(",".join(str(p) for p in parts).encode())


class MaskedDiffusionLM(pl.LightningModule):
    """Masked-diffusion fine-tuning of a BERT-like encoder (MDLM objective, SUBS parameterisation).

    Only assistant answers (``loss_mask``) are noised; the prompt stays intact. Each optimizer step
    normalises the loss by the answer-token weight of the *global* batch (all ranks, all
    micro-batches), so N ranks give the same gradient as one process with the whole batch.

    Args:
        backbone: hub id, local folder, or a :class:`ScratchBackbone` config.
        schedule: noise schedule (default log-linear, ``alpha(t) = 1 - t``); any ``NoiseSchedule``
            subclass by class path.
        learning_rate / weight_decay / betas: AdamW (no decay on biases and norms).
        warmup_steps: linear warm-up steps; ``lr_schedule`` then decays (cosine to
            ``min_lr_ratio * learning_rate``, linear to 0) or stays constant.
        micro_batch_size: split each batch into chunks of this size for backward (gradient
            accumulation with exact global normalisation); default: the whole batch at once.
        gradient_clip_val: max gradient norm (None disables); applied inside the step because the
            step is manual (FSDP clips through its own module method, lightning#19235).
        gradient_checkpointing: trade compute for memory in the encoder.
        time_eps: times are drawn in ``[time_eps, 1]`` (the 1/t weight explodes near 0).
        seed / val_seed: training noise seed (per rank streams) and the fixed validation noise seed.
        attn_implementation: ``sdpa`` (default), ``flash_attention_2`` or ``eager``.
        role_headers: chat template role headers (default ``User:`` / ``Assistant:`` / ``System:``).
        canvas_length: default generation canvas (answer slots) for sampling.
        health_check: run the MLM health check (:class:`~diffusion_lm.health.MLMHealthCheck`) at
            the start of ``fit`` of a pretrained backbone; a ``MLMHealthCheck`` in ``trainer.callbacks``
            replaces the default one and runs for any backbone.
    """

    def __init__(
        self,
        backbone: Union[str, ScratchBackbone],
        schedule: Optional[NoiseSchedule] = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 100,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        min_lr_ratio: float = 0.1,
        micro_batch_size: Optional[int] = None,
        gradient_clip_val: Optional[float] = 1.0,
        gradient_checkpointing: bool = False,
        time_eps: float = 1e-3,
        seed: int = 0,
        val_seed: int = 1234,
        attn_implementation: Optional[str] = "sdpa",
        role_headers: Optional[dict[str, str]] = None,
        canvas_length: int = 64,
        health_check: bool = True,
    ) -> None:
        super().__init__()
        if schedule is not None and not isinstance(schedule, NoiseSchedule):
            raise TypeError(
                f"model.schedule must be a diffusion_lm.schedules.NoiseSchedule subclass instance, got {type(schedule).__name__}"
            )
        check_options(learning_rate=learning_rate, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                      min_lr_ratio=min_lr_ratio, micro_batch_size=micro_batch_size,
                      gradient_clip_val=gradient_clip_val, time_eps=time_eps, canvas_length=canvas_length)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.schedule = schedule or LogLinearSchedule()
        model, tokenizer = load_backbone(backbone, attn_implementation=attn_implementation)
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer, role_headers=role_headers)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.net = Backbone(model, self.template.mask_id)
        self.val_metrics = LanguageNelbo(["en", "ru"])
        self.test_metrics = LanguageNelbo(["en", "ru"])

    def configure_callbacks(self):
        """The MLM health check at fit start, unless disabled, already configured in the Trainer, or
        the backbone is built from a config (a random head is then expected, not a fault)."""
        from .health import MLMHealthCheck

        trainer = self._trainer
        if not self.hparams.get("health_check", True) or trainer is None:
            return []
        if not isinstance(self.hparams.get("backbone"), str):
            # A model built from a config (a ScratchBackbone, or the plain dict LightningCLI stores
            # in hparams) has a random head by construction: nothing to diagnose.
            return []
        if any(isinstance(cb, MLMHealthCheck) for cb in trainer.callbacks):
            return []
        return [MLMHealthCheck()]

    # ----------------------------------------------------------------- resuming
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume rules (:mod:`diffusion_lm.resume`): the model must be the checkpoint's; other options
        are the current config's, announced in one line and applied at train start."""
        trainer = self._trainer
        if trainer is None:  # load_from_checkpoint: the model was built from the checkpoint itself
            return
        saved = checkpoint.get("hyper_parameters") or {}
        where = str(trainer.ckpt_path or "checkpoint")
        check_resume(saved, self.hparams, where)
        if trainer.state.fn == "fit":
            rank_zero_info(describe_resume(where, checkpoint.get("global_step"), changed_hparams(saved, self.hparams)))
            self._resumed = True

    def on_train_start(self) -> None:
        if getattr(self, "_resumed", False):
            # The restored optimizer and LR scheduler carry the checkpoint's options: apply the config's.
            self._resumed = False
            apply_optimizer_hparams(self.optimizers(use_pl_optimizer=False), self.lr_schedulers(), self.hparams)

    # ----------------------------------------------------------------- basics
    @property
    def mask_id(self) -> int:
        return self.template.mask_id

    def denoise(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Float32 logits at ``query`` positions (the denoiser contract of the objective and sampler)."""
        return self.net(input_ids, attention_mask, query)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        languages = {s.language for s in getattr(datamodule, "sources", [])} | {"en", "ru"}
        self.val_metrics = LanguageNelbo(languages)
        self.test_metrics = LanguageNelbo(languages)

    # ------------------------------------------------------------- training
    def _nelbo(self, batch: dict, t: torch.Tensor, seed: int, step: int, rows: torch.Tensor, normalizer=None):
        """NELBO of a (micro-)batch; ``rows`` are the global sample indices that key the mask noise."""
        # Trim trailing batch padding: micro-batches of short rows run on short tensors.
        width = int(batch["attention_mask"].sum(dim=1).max())
        b = {k: batch[k][:, :width] for k in _BATCH_TENSORS}
        uniforms = counter_uniform(seed, step, rows.to(self.device), width)
        return masked_diffusion_nelbo(
            self.denoise,
            b["input_ids"],
            b["attention_mask"],
            b["loss_mask"],
            t,
            self.schedule,
            self.mask_id,
            loss_weight=b["loss_weight"],
            metric_mask=b["metric_mask"],
            normalizer=normalizer,
            uniforms=uniforms,
        )

    def _step_times(self, batch_size: int) -> torch.Tensor:
        """Times stratified over the global batch; every rank draws the same stream and takes its slice."""
        world, rank, step = self.trainer.world_size, self.global_rank, self.global_step
        t_gen = torch.Generator().manual_seed(_seed(self.hparams.seed, step))
        return stratified_times(
            batch_size * world,
            rank_offset=rank * batch_size,
            local_batch_size=batch_size,
            eps=self.hparams.time_eps,
            generator=t_gen,
            device=self.device,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        scheduler = self.lr_schedulers()
        n = batch["input_ids"].shape[0]
        t = self._step_times(n)
        first_row = self.global_rank * n  # global index of this rank's first sample
        local_weight = (batch["loss_weight"] * batch["loss_mask"]).sum().detach().float()
        global_weight = self.trainer.strategy.reduce(local_weight.clone(), reduce_op="sum")
        # DDP averages gradients over ranks; scale so the result is sum(all ranks) / global weight.
        normalizer = global_weight / self.trainer.world_size
        micro = self.hparams.micro_batch_size or n
        opt.zero_grad(set_to_none=True)
        weighted, masked = torch.zeros((), device=self.device), 0
        for start in range(0, n, micro):
            chunk = {k: batch[k][start : start + micro] for k in _BATCH_TENSORS}
            rows = torch.arange(first_row + start, first_row + start + chunk["input_ids"].shape[0])
            out = self._nelbo(chunk, t[start : start + micro], self.hparams.seed, self.global_step, rows, normalizer)
            self.manual_backward(out.loss)
            weighted += out.weighted_sum
            masked += out.num_masked
        self._clip(opt)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        loss = self.trainer.strategy.reduce(weighted, reduce_op="sum") / global_weight.clamp_min(1e-8)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/masked_tokens", float(masked), on_step=True, on_epoch=False, batch_size=n)
        self.log("train/lr", opt.param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=n)
        return loss

    def _clip(self, opt) -> None:
        value = self.hparams.gradient_clip_val
        if not value:
            return
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's precision hook refuses norm clipping under FSDP (lightning#19235).
            self.trainer.model.clip_grad_norm_(value)
        else:
            self.clip_gradients(opt, gradient_clip_val=value, gradient_clip_algorithm="norm")

    # ------------------------------------------------------------ validation
    def _eval_step(self, batch: dict, batch_idx: int, metrics: LanguageNelbo) -> None:
        # Fixed-seed noise: the same t and masks for the same batch at every validation.
        n = batch["input_ids"].shape[0]
        t_gen = torch.Generator().manual_seed(_seed(self.hparams.val_seed, batch_idx, self.global_rank))
        t = stratified_times(n, eps=self.hparams.time_eps, generator=t_gen, device=self.device)
        rows = torch.arange(n) + self.global_rank * n
        out = self._nelbo(batch, t, self.hparams.val_seed, batch_idx, rows)
        metrics.update(out.seq_nelbo, out.seq_tokens, batch["language"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute("val")
        self.val_metrics.reset()
        for key, value in values.items():
            self.log(key, value, prog_bar=key == "val/nelbo", sync_dist=False, rank_zero_only=False)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute("test")
        self.test_metrics.reset()
        for key, value in values.items():
            self.log(key, value)

    # ------------------------------------------------------------ generation
    def prompt_ids(self, prompt: Union[str, Conversation, Sequence[Turn]]) -> list[int]:
        """Prompt ids for a user message, a conversation or its turns (the training template)."""
        if isinstance(prompt, str):
            turns: Sequence[Turn] = [Turn("user", prompt)]
        elif isinstance(prompt, Conversation):
            turns = prompt.turns
        else:
            turns = prompt
        return self.template.prompt_ids(turns)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Union[str, Conversation, Sequence[Turn]]],
        sampler: Any = None,
        canvas_length: Optional[int] = None,
        seed: Optional[int] = 0,
        return_trajectory: bool = False,
    ):
        """Answer each prompt; returns the sampler's result with decoded ``texts`` attached."""
        from .sampling import generate as sample

        was_training = self.training
        self.eval()
        try:
            result = sample(
                self.denoise,
                [self.prompt_ids(p) for p in prompts],
                mask_id=self.template.mask_id,
                eos_id=self.template.eos_id,
                pad_id=self.template.pad_id,
                canvas_length=canvas_length or self.hparams.canvas_length,
                sampler=sampler,
                seed=seed,
                return_trajectory=return_trajectory,
                max_length=self.max_length,
            )
        finally:
            self.train(was_training)
        result.texts = [self.template.decode_answer(ids) for ids in result.ids]
        return result

    @property
    def max_length(self) -> int:
        """Longest sequence the backbone accepts."""
        return int(getattr(self.net.model.config, "max_position_embeddings", 512))

    def predict_step(self, batch: list[Conversation], batch_idx: int) -> list[dict]:
        result = self.generate(batch)
        return [
            {"prompt": c.turns[-1].content, "language": c.language, "answer": text}
            for c, text in zip(batch, result.texts)
        ]

    # ------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        hp = self.hparams
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.learning_rate,
            betas=tuple(hp.betas),
        )
        from transformers import (
            get_constant_schedule_with_warmup,
            get_cosine_with_min_lr_schedule_with_warmup,
            get_linear_schedule_with_warmup,
        )

        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(hp.warmup_steps, total)
        if hp.lr_schedule == "cosine":
            sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=hp.min_lr_ratio)
        elif hp.lr_schedule == "linear":
            sched = get_linear_schedule_with_warmup(opt, warmup, total)
        else:
            sched = get_constant_schedule_with_warmup(opt, warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def load_model(path: str, map_location: str | torch.device = "cpu") -> MaskedDiffusionLM:
    """Load a model for inference from a Lightning checkpoint (``.ckpt``)."""
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"--model {path!r}: no such checkpoint file or export folder")
    if os.path.isdir(path):
        from .export import load_exported

        return load_exported(path, map_location=map_location)
    model = MaskedDiffusionLM.load_from_checkpoint(path, map_location=map_location)
    model.eval()
    return model
