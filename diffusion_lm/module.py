"""MaskedDiffusionLM: the LightningModule that fine-tunes an encoder as a masked-diffusion LM."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from .adapters import LoraAdapter, PeftOptions, apply_lora
from .backbone import FAMILIES, ScratchBackbone, SparseHeadDenoiser, load_backbone
from .callbacks import BatchComposition
from .chat import ChatTemplate, Conversation, Turn
from .distributed import check_strategy, root_forward
from .errors import ConfigError, TrainingDiverged
from .health import MLMHealthCheck
from .metrics import GroupedMeans, LanguageNelbo
from .objective import masked_diffusion_nelbo, masked_token_accuracy
from .resume import apply_optimizer_hparams, changed_hparams, check_resume, describe_resume
from .schedules import LogLinearSchedule, NoiseSchedule, indexed_times, stratified_times
from .sampling.loop import GenerationResult, StepHook
from .sampling.loop import generate as sample
from .seeding import Seed, counter_uniform_at, stable_seed

__all__ = ["MaskedDiffusionLM", "TextGeneration"]

log = logging.getLogger(__name__)

# Lightning warns that a step checkpoint of a manually optimised module holds the weights *after*
# the step. That is what we want: a checkpoint at global_step N holds the weights after N updates,
# exactly as under automatic optimisation.
warnings.filterwarnings("ignore",
                        message="Using ModelCheckpoint with manual optimization and every_n_train_steps")

# Per-token tensors of a batch (rows x positions); the other keys are per example.
# Fixed mask rates of the masked-token accuracy reported by validate/test: BERT's pretraining rate,
# half, and close to the all-[MASK] start of generation.
EVAL_MASK_RATES = (0.15, 0.5, 0.9)
ACCURACY_NAMES = tuple(f"acc_mask{round(r * 100)}" for r in EVAL_MASK_RATES)

_ROW_TENSORS = ("input_ids", "attention_mask", "loss_mask", "loss_weight", "metric_mask", "example",
                "position")


def check_options(**options: Any) -> None:
    """One-line errors for out-of-range ``model.*`` options, before anything is loaded or read."""
    rules = {
        "learning_rate": (lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0 (e.g. 1e-4)"),
        "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0"),
        "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                  "must be two numbers in [0, 1), e.g. [0.9, 0.98]"),
        "warmup_steps": (lambda v: v >= 0, "must be >= 0 (0 disables warm-up)"),
        "min_lr_ratio": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        "micro_batch_size": (lambda v: v is None or v >= 1,
                             "must be >= 1 (or unset: the whole batch at once)"),
        "gradient_clip_val": (lambda v: v is None or (math.isfinite(v) and v >= 0),
                              "must be >= 0 (or unset: no clipping)"),
        "time_eps": (lambda v: 0 < v < 1,
                     "must be in (0, 1), e.g. 1e-3 (the 1/t weight is infinite at t = 0)"),
        "canvas_length": (lambda v: v >= 1, "must be >= 1"),
        "max_nonfinite_steps": (lambda v: v >= 1, "must be >= 1"),
        "prompt_dropout": (lambda v: 0 <= v < 1,
                           "must be in [0, 1) (share of training examples whose prompt is masked)"),
    }
    for name, value in options.items():
        ok, what = rules[name]
        if not ok(value):
            raise ConfigError(f"model.{name} {what}, got {value}")


def _rows(batch: dict, rows: slice) -> dict:
    return {k: batch[k][rows] for k in _ROW_TENSORS}


class TextGeneration:
    """The text -> answer path of a model: prompt ids from the chat template, the prompt + canvas
    length check, the sampler, decoding. :class:`MaskedDiffusionLM` has it; a stand-in model (a test
    double of the server or the pipeline) gets it by providing ``template``, ``denoise``,
    ``max_length`` and ``hparams.canvas_length``.
    """

    template: ChatTemplate
    max_length: int
    hparams: Any

    def denoise(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                query: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
        seed: Seed = 0,
        return_trajectory: bool = False,
        max_batch_size: Optional[int] = None,
        labels: Optional[Sequence[str]] = None,
        on_step: Optional[StepHook] = None,
    ) -> GenerationResult:
        """Answer each prompt (a user message, a :class:`Conversation` or its turns): the one text ->
        answer path (the pipeline functions, the chat session and the validation callback call it).

        The prompts are built by the training chat template, checked against the model's length
        (:meth:`check_lengths`; ``labels`` name them in the error, default ``prompt 1``, ...), answered by
        :func:`~diffusion_lm.sampling.generate` in eval mode (``sampler``: a :class:`SamplerConfig`, a
        preset name or a mapping; ``max_batch_size`` rows per forward; ``seed`` one base seed or one per
        prompt; ``on_step`` the sampler's step hook) and decoded: the result is the sampler's, with the
        answers' ``texts`` attached.
        """
        canvas = canvas_length or int(self.hparams.canvas_length)
        prompt_ids = [self.prompt_ids(p) for p in prompts]
        self.check_lengths(prompt_ids, canvas, labels)
        module = self if isinstance(self, torch.nn.Module) else None
        was_training = module is not None and module.training
        if module is not None:
            module.eval()
        try:
            tpl = self.template
            result = sample(
                self._sampling_denoiser(), prompt_ids, mask_id=tpl.mask_id, eos_id=tpl.eos_id,
                pad_id=tpl.pad_id,
                canvas_length=canvas, sampler=sampler, seed=seed, return_trajectory=return_trajectory,
                max_batch_size=max_batch_size, max_length=self.max_length, on_step=on_step,
            )
        finally:
            if module is not None:
                module.train(was_training)
        result.texts = [self.template.decode_answer(ids) for ids in result.ids]
        return result

    def _sampling_denoiser(self):
        """``denoise``; while a Trainer with :class:`~diffusion_lm.distributed.EncoderFSDPStrategy`
        holds the model (validation sampling), each call runs as the FSDP root's forward, which gathers
        the parameters outside the wrapped layers."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return self.denoise

        def denoise(ids, attention, query):
            return root_forward(trainer, lambda: self.denoise(ids, attention, query))

        return denoise

    def prompt_budget(self, canvas_length: int) -> int:
        """Prompt tokens that fit next to ``canvas_length`` answer slots (a :class:`ConfigError` when the
        canvas alone fills the model)."""
        limit = self.max_length
        if canvas_length >= limit:
            raise ConfigError(f"--canvas_length {canvas_length} leaves no room for a prompt: the model takes "
                              f"{limit} positions in all; lower --canvas_length")
        return limit - canvas_length

    def length_problem(self, label: str, prompt_tokens: int, canvas_length: int) -> Optional[str]:
        """Why a prompt of ``prompt_tokens`` does not fit next to ``canvas_length`` answer slots, naming it
        ``label`` and the fix; None when it fits."""
        limit, total = self.max_length, prompt_tokens + canvas_length
        if total <= limit:
            return None
        fix = f"shorten the prompt to at most {limit - canvas_length} tokens"
        if prompt_tokens < limit:
            fix += f" or lower --canvas_length to at most {limit - prompt_tokens}"
        return (f"{label} is {prompt_tokens} tokens; with --canvas_length {canvas_length} that is {total} > "
                f"the model's limit of {limit} positions: {fix}")

    def check_lengths(self, prompt_ids: Sequence[Sequence[int]], canvas_length: int,
                      labels: Optional[Sequence[str]] = None) -> None:
        """A :class:`ConfigError` for the first prompt that does not fit next to the canvas."""
        self.prompt_budget(canvas_length)
        for i, ids in enumerate(prompt_ids):
            problem = self.length_problem(labels[i] if labels is not None else f"prompt {i + 1}", len(ids),
                                          canvas_length)
            if problem is not None:
                raise ConfigError(problem)


class MaskedDiffusionLM(TextGeneration, pl.LightningModule):
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
        micro_batch_size: split each batch into chunks of this many rows for backward (gradient
            accumulation with exact global normalisation; a packed row holds several examples);
            default: the whole batch at once.
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
        max_nonfinite_steps: an optimizer step whose loss or gradient norm is not finite is skipped
            (weights unchanged) and counted as ``train/skipped_steps``; after this many in a row the
            run stops with an error naming the step and the last good checkpoint.
        prompt_dropout: share of training examples whose whole prompt is replaced by [MASK] (default 0,
            off), so the model also learns the unconditional distribution that classifier-free guidance
            (``--guidance``) contrasts against.
        peft: parameter-efficient fine-tuning (:class:`~diffusion_lm.adapters.PeftOptions`, e.g.
            ``{method: lora, r: 8}``): LoRA adapters train, the backbone stays frozen; checkpoints then
            hold only what trains (and what reloading the backbone would not reproduce) plus the config.
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
        max_nonfinite_steps: int = 10,
        prompt_dropout: float = 0.0,
        peft: Optional[PeftOptions] = None,
    ) -> None:
        super().__init__()
        if isinstance(schedule, dict):  # a checkpoint's hparams (see below) or a class_path mapping
            schedule = NoiseSchedule.from_config(schedule)
        if schedule is not None and not isinstance(schedule, NoiseSchedule):
            raise TypeError(
                "model.schedule must be a diffusion_lm.schedules.NoiseSchedule subclass instance, got "
                f"{type(schedule).__name__}"
            )
        check_options(learning_rate=learning_rate, weight_decay=weight_decay, betas=betas,
                      warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, micro_batch_size=micro_batch_size,
                      gradient_clip_val=gradient_clip_val, time_eps=time_eps, canvas_length=canvas_length,
                      max_nonfinite_steps=max_nonfinite_steps, prompt_dropout=prompt_dropout)
        self.save_hyperparameters()
        # Plain data in hparams, as LightningCLI stores them: checkpoints then load with
        # torch.load(weights_only=True) (Lightning's default) whatever schedule class was used.
        if isinstance(self.hparams.get("backbone"), ScratchBackbone):
            self.hparams["backbone"] = dataclasses.asdict(self.hparams["backbone"])
        if isinstance(self.hparams.get("schedule"), NoiseSchedule):
            self.hparams["schedule"] = self.hparams["schedule"].to_config()
        peft_options = PeftOptions.coerce(peft) if peft is not None else None  # checked before loading
        if peft_options is not None:
            self.hparams["peft"] = dataclasses.asdict(peft_options)
        self.automatic_optimization = False
        self.schedule = schedule or LogLinearSchedule()
        loaded = load_backbone(backbone, attn_implementation=attn_implementation)
        self.tokenizer = loaded.tokenizer
        self.template = ChatTemplate(loaded.tokenizer, role_headers=role_headers)
        if gradient_checkpointing:
            loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.net = SparseHeadDenoiser(loaded.model, self.template.mask_id)
        self.adapter: Optional[LoraAdapter] = None
        self._frozen_keys: frozenset[str] = frozenset()
        if peft_options is not None:
            self._apply_peft(peft_options, loaded)
        self.val_metrics = LanguageNelbo()  # per-language NELBO, languages as the data brings them
        self.test_metrics = LanguageNelbo()
        # masked-token accuracy at fixed rates, per language and per source
        self.val_accuracy = GroupedMeans(ACCURACY_NAMES)
        self.test_accuracy = GroupedMeans(ACCURACY_NAMES)
        # an export folder's metadata (set by loading.load_exported)
        self.diffusion_config: Optional[dict] = None
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient (checkpointed)
        self._nonfinite_streak = 0

    def configure_callbacks(self):
        """Callbacks every run gets unless ``trainer.callbacks`` already has one of the kind: the
        batch-composition diagnostics, and the MLM health check at fit start (unless disabled, or the
        backbone is built from a config: a random head is then expected, not a fault)."""
        trainer = self._trainer
        if trainer is None:
            return []
        present = {type(cb) for cb in trainer.callbacks}
        out: list = [] if any(issubclass(t, BatchComposition) for t in present) else [BatchComposition()]
        if not self.hparams.get("health_check", True):
            return out
        if not isinstance(self.hparams.get("backbone"), str):
            # A model built from a config (a ScratchBackbone, or the plain dict LightningCLI stores
            # in hparams) has a random head by construction: nothing to diagnose.
            return out
        if any(issubclass(t, MLMHealthCheck) for t in present):
            return out
        return out + [MLMHealthCheck()]

    # ----------------------------------------------------------------- parameter-efficient fine-tuning
    def _apply_peft(self, options: PeftOptions, loaded) -> None:
        """Inject the adapters, freeze the rest, and note which frozen tensors checkpoints can leave out
        (those the backbone's own files reproduce; a model built from a config has none)."""
        model = loaded.model
        family = FAMILIES.get(getattr(model.config, "model_type", ""))
        fresh = loaded.fresh_head or not isinstance(self.hparams.get("backbone"), str)
        train_head = fresh if options.train_head is None else bool(options.train_head)
        self.adapter = apply_lora(model, options, family.head_prefixes if family else (), train_head)
        trainable = {p.data_ptr() for p in self.parameters() if p.requires_grad}
        new = {k.replace(".base_layer.", ".") for k in loaded.new_weights}
        self._frozen_keys = frozenset(
            k for k, v in super().state_dict(keep_vars=True).items()
            if k.startswith("net.model.") and v.data_ptr() not in trainable
            and k[len("net.model."):].replace(".base_layer.", ".") not in new
        )

    def state_dict(self, *args: Any, destination=None, prefix: str = "", keep_vars: bool = False):
        """The module's state; with ``model.peft``, without the frozen backbone tensors that reloading
        the backbone reproduces (checkpoints hold what trains, plus the config)."""
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in getattr(self, "_frozen_keys", ()):
            out.pop(prefix + key, None)
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; with ``model.peft`` the frozen backbone tensors a checkpoint
        leaves out keep the values the backbone was loaded with (any other missing key is an error)."""
        if getattr(self, "_frozen_keys", None):
            own = super().state_dict()
            state_dict = {**{k: own[k] for k in self._frozen_keys if k not in state_dict}, **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (tied tensors counted once)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    # ----------------------------------------------------------------- resuming
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume rules (:mod:`diffusion_lm.resume`): the model must be the checkpoint's; other options
        are the current config's, announced in one line and applied at train start."""
        state = checkpoint.get("diffusion_lm_training") or {}
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._nonfinite_streak = int(state.get("nonfinite_streak", 0))
        trainer = self._trainer
        if trainer is None:  # load_from_checkpoint: the model was built from the checkpoint itself
            return
        saved = checkpoint.get("hyper_parameters") or {}
        where = str(trainer.ckpt_path or "checkpoint")
        check_resume(saved, self.hparams, where)
        if trainer.state.fn == "fit":
            rank_zero_info(describe_resume(where, checkpoint.get("global_step"),
                                           changed_hparams(saved, self.hparams)))
            self._resumed = True

    def on_train_start(self) -> None:
        if getattr(self, "_resumed", False):
            # The restored optimizer and LR scheduler carry the checkpoint's options: apply the config's.
            self._resumed = False
            apply_optimizer_hparams(self.optimizers(use_pl_optimizer=False), self.lr_schedulers(),
                                    self.hparams)

    # ----------------------------------------------------------------- basics
    @property
    def mask_id(self) -> int:
        return self.template.mask_id

    def denoise(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                query: torch.Tensor) -> torch.Tensor:
        """Float32 logits at ``query`` positions (the denoiser contract of the objective and sampler)."""
        return self.net(input_ids, attention_mask, query)

    def setup(self, stage: str) -> None:
        """Hand the data module the model's chat template and sequence limit (``connect``), so the data,
        the sampler and export share one template; the data never reads the Trainer's model."""
        check_strategy(self.trainer.strategy)
        if self.adapter is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ConfigError("model.peft: LoRA training under FSDP is not supported (frozen and trainable "
                              "tensors would share flat shards); use DDP (--trainer.strategy=ddp): only the "
                              "adapters' gradients are synchronised")
        connect = getattr(getattr(self.trainer, "datamodule", None), "connect", None)
        if callable(connect):
            connect(self.template, self.max_length)

    # ------------------------------------------------------------- training
    def _drop_prompts(self, r: dict, keys: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        """``input_ids`` with the whole prompt of a ``prompt_dropout`` share of the examples replaced by
        [MASK] (one draw per example, keyed like the masks, so ranks and resumes draw the same)."""
        u = counter_uniform_at(stable_seed(seed, "prompt_dropout"), step, keys, torch.zeros_like(keys))
        prompt = (r["attention_mask"] > 0) & ~r["loss_mask"].bool() & (keys >= 0)
        return r["input_ids"].masked_fill(prompt & (u < self.hparams.prompt_dropout), self.mask_id)

    def _nelbo(self, rows: dict, t: torch.Tensor, seed: int, step: int, keys: torch.Tensor, normalizer=None,
               num_groups: Optional[int] = None, drop_prompts: bool = False):
        """NELBO of some rows of a batch. ``t`` and ``keys`` are per token: the time of the token's
        example and the global index that keys its mask noise (with its position in the example);
        ``drop_prompts`` applies ``prompt_dropout`` (training only)."""
        # Trim trailing row padding (rows are left-aligned): micro-batches of short rows run on short tensors.
        width = int((rows["attention_mask"] > 0).sum(dim=1).max())
        r = {k: v[:, :width] for k, v in rows.items()}
        if drop_prompts and self.hparams.get("prompt_dropout", 0.0) > 0:
            r["input_ids"] = self._drop_prompts(r, keys[:, :width], seed, step)
        packed = bool(r["attention_mask"].max() > 1)
        uniforms = counter_uniform_at(seed, step, keys[:, :width], r["position"])
        return masked_diffusion_nelbo(
            lambda ids, attn, query: self.net(ids, attn, query, packed=packed),
            r["input_ids"],
            r["attention_mask"],
            r["loss_mask"],
            t[:, :width],
            self.schedule,
            self.mask_id,
            loss_weight=r["loss_weight"],
            metric_mask=r["metric_mask"],
            normalizer=normalizer,
            uniforms=uniforms,
            groups=r["example"] if num_groups is not None else None,
            num_groups=num_groups,
        )

    def _step_times(self, num_examples: int) -> torch.Tensor:
        """Times stratified over the global batch; every rank draws the same stream and takes its slice."""
        world, rank, step = self.trainer.world_size, self.global_rank, self.global_step
        t_gen = torch.Generator().manual_seed(stable_seed(self.hparams.seed, step))
        return stratified_times(
            num_examples * world,
            rank_offset=rank * num_examples,
            local_batch_size=num_examples,
            eps=self.hparams.time_eps,
            generator=t_gen,
            device=self.device,
        )

    def _row_chunks(self, num_rows: int) -> list[slice]:
        """Micro-batches of rows; every rank runs the same number (a sharded or DDP backward is a
        collective, and packed batches give ranks different row counts)."""
        micro = self.hparams.micro_batch_size
        if not micro:
            return [slice(0, num_rows)]
        count = math.ceil(num_rows / micro)
        if self.trainer.world_size > 1:
            count = int(self.trainer.strategy.reduce(torch.tensor(count, device=self.device),
                                                     reduce_op="max"))
        return [slice(i * micro, (i + 1) * micro) for i in range(count)]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        scheduler = self.lr_schedulers()
        step, rank, world = self.global_step, self.global_rank, self.trainer.world_size
        # Dropout draws keyed by (seed, step, rank): a resumed run repeats them without saved RNG state.
        torch.manual_seed(stable_seed(self.hparams.seed, "dropout", step, rank))
        n = int(batch["sample_index"].shape[0])  # examples on this rank (rows may pack several)
        example = batch["example"]
        t = self._step_times(n)[example.clamp_min(0)]
        # Noise keys: the example's index in the global batch, so ranks, micro-batches and packing
        # all draw the masks one process would draw.
        keys = torch.where(example >= 0, example + rank * n, -1)
        local_weight = (batch["loss_weight"] * batch["loss_mask"]).sum().detach().float()
        global_weight = self.trainer.strategy.reduce(local_weight.clone(), reduce_op="sum")
        # DDP averages gradients over ranks; scale so the result is sum(all ranks) / global weight.
        normalizer = global_weight / world
        opt.zero_grad(set_to_none=True)
        weighted, masked = torch.zeros((), device=self.device), 0
        num_rows = batch["input_ids"].shape[0]
        for rows in self._row_chunks(num_rows):
            empty = rows.start >= num_rows
            rows = slice(0, 1) if empty else rows  # a rank with fewer rows still joins the collective
            # Under FSDP the forward runs as the root's forward, so the backward below follows it.
            out = root_forward(self.trainer, lambda rows=rows: self._nelbo(
                _rows(batch, rows), t[rows], self.hparams.seed, step, keys[rows], normalizer,
                drop_prompts=True))
            self.manual_backward(out.loss * 0.0 if empty else out.loss)
            if not empty:
                weighted += out.weighted_sum
                masked += out.num_masked
        loss = self.trainer.strategy.reduce(weighted, reduce_op="sum") / global_weight.clamp_min(1e-8)
        grad_norm = self._clip(opt)
        if bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm)):
            opt.step()
            if scheduler is not None:
                scheduler.step()
            self._nonfinite_streak = 0
        else:
            self._skip_step(opt, loss, grad_norm)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/masked_tokens", float(masked), on_step=True, on_epoch=False, batch_size=n)
        self.log("train/lr", opt.param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=n)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=n)
        real = (batch["attention_mask"] > 0).sum()
        self.log("train/padding_share", 1.0 - float(real) / batch["attention_mask"].numel(), on_step=True,
                 on_epoch=False, batch_size=n)
        return loss

    def _skip_step(self, opt, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Leave the weights unchanged after a non-finite loss or gradient; stop after too many in a row."""
        opt.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self._nonfinite_streak += 1
        log.warning("step %d: non-finite %s; optimizer step skipped (%d in a row, %d in all)",
                    self.global_step, "loss" if not torch.isfinite(loss) else "gradient norm",
                    self._nonfinite_streak, self.skipped_steps)
        limit = self.hparams.get("max_nonfinite_steps", 10)
        if self._nonfinite_streak >= limit:
            callback = self.trainer.checkpoint_callback
            last = ""
            if callback:
                last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"training stopped at step {self.global_step}: {self._nonfinite_streak} optimizer steps in a "
                f"row had a non-finite loss or gradient norm; {where}. Lower model.learning_rate, check the "
                "data, or use bf16/fp32 precision (model.max_nonfinite_steps sets the limit)"
            )

    def _clip(self, opt) -> torch.Tensor:
        """Clip the gradient norm (when ``gradient_clip_val`` is set) and return the norm before clipping."""
        value = self.hparams.gradient_clip_val or float("inf")
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's precision hook refuses norm clipping under FSDP (lightning#19235).
            return self.trainer.model.clip_grad_norm_(value)
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            # fp16 with a GradScaler: it unscales, detects non-finite gradients and skips in its own step.
            if self.hparams.gradient_clip_val:
                self.clip_gradients(opt, gradient_clip_val=value, gradient_clip_algorithm="norm")
            return torch.zeros((), device=self.device)
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.clip_grad_norm_(params, value)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["diffusion_lm_training"] = {"skipped_steps": self.skipped_steps,
                                               "nonfinite_streak": self._nonfinite_streak}

    # ------------------------------------------------------------ validation
    def _accuracy(self, batch: dict, keys: torch.Tensor, metrics: GroupedMeans) -> None:
        """Masked-token accuracy at :data:`EVAL_MASK_RATES`, masks keyed like the validation noise."""
        width = int((batch["attention_mask"] > 0).sum(dim=1).max())
        r = {k: v[:, :width] for k, v in _rows(batch, slice(None)).items()}
        packed = bool(r["attention_mask"].max() > 1)
        n = int(batch["sample_index"].shape[0])
        figures: list[dict] = [{} for _ in range(n)]
        weights: list[dict] = [{} for _ in range(n)]
        for k, (rate, name) in enumerate(zip(EVAL_MASK_RATES, ACCURACY_NAMES)):
            uniforms = counter_uniform_at(self.hparams.val_seed, 1 + k, keys[:, :width], r["position"])
            correct, total = masked_token_accuracy(
                lambda ids, attn, query: self.net(ids, attn, query, packed=packed), r["input_ids"],
                r["attention_mask"], r["loss_mask"], rate, self.mask_id, uniforms,
                metric_mask=r["metric_mask"], groups=r["example"], num_groups=n)
            for i, (c, t) in enumerate(zip(correct.tolist(), total.tolist())):
                figures[i][name] = c / t if t else float("nan")
                weights[i][name] = t
        sources = batch.get("source") or [""] * n
        groups = [[lang, f"src:{src}" if src else ""] for lang, src in zip(batch["language"], sources)]
        metrics.update(figures, groups, weights)

    def _eval_step(self, batch: dict, batch_idx: int, metrics: LanguageNelbo,
                   accuracy: Optional[GroupedMeans] = None) -> None:
        # Noise keyed by each example's index in the validation set (its time and its masks): every
        # batch size, packing and process count scores the same noised examples; copies that only
        # even out the ranks carry no metric weight.
        index = batch["sample_index"]
        example = batch["example"].clamp_min(0)
        t = indexed_times(index, seed=self.hparams.val_seed,
                          eps=self.hparams.time_eps).to(self.device)[example]
        keys = torch.where(batch["example"] >= 0, index[example], -1)
        out = self._nelbo(_rows(batch, slice(None)), t, self.hparams.val_seed, 0, keys,
                          num_groups=int(index.shape[0]))
        metrics.update(out.seq_nelbo, out.seq_tokens, batch["language"], batch.get("source"))
        if accuracy is not None:
            self._accuracy(batch, keys, accuracy)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_metrics, self.val_accuracy)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute("val")
        values.update(self.val_accuracy.compute("val/"))
        self.val_metrics.reset()
        self.val_accuracy.reset()
        for key, value in values.items():
            self.log(key, value, prog_bar=key == "val/nelbo", sync_dist=False, rank_zero_only=False)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_metrics, self.test_accuracy)

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute("test")
        values.update(self.test_accuracy.compute("test/"))
        self.test_metrics.reset()
        self.test_accuracy.reset()
        for key, value in values.items():
            self.log(key, value)

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
        # Imported here: at module level it would list transformers' optimizers among the known
        # subclasses in `diffusion-lm fit --help`.
        from transformers import (
            get_constant_schedule_with_warmup,
            get_cosine_with_min_lr_schedule_with_warmup,
            get_linear_schedule_with_warmup,
        )

        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(hp.warmup_steps, total)
        if hp.lr_schedule == "cosine":
            sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total,
                                                                min_lr_rate=hp.min_lr_ratio)
        elif hp.lr_schedule == "linear":
            sched = get_linear_schedule_with_warmup(opt, warmup, total)
        else:
            sched = get_constant_schedule_with_warmup(opt, warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
