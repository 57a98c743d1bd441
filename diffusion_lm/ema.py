"""``EMA``: an exponential moving average of the weights for validation, sampling and export.

Optional and off unless configured:

.. code-block:: yaml

    trainer:
      callbacks:
        - class_path: diffusion_lm.ema.EMA
          init_args: {decay: 0.999, update_starting_at_step: 1000}

It is Lightning's ``EMAWeightAveraging`` (same arguments, same checkpoint layout: ``state_dict``
holds the average, ``current_model_state`` the trained weights, so ``diffusion-lm export``'s
``--weights auto`` writes the average) with four changes this project needs:

1. **Everything at the end of validation sees the average.** Lightning swaps the trained weights
   back in its own ``on_validation_epoch_end``, so a callback listed after it (e.g.
   :class:`~diffusion_lm.callbacks.ValidationSampling`) sampled with the trained weights, depending
   on the order of ``trainer.callbacks``. Here the swap back happens in ``on_validation_end``, after
   every ``on_validation_epoch_end`` hook.
2. **Before averaging starts, the average is the current model.** Lightning's average holds the
   weights of the start of ``fit`` until the first update (``update_starting_at_step``), so
   validations and checkpoints before it reported and exported the *initial* weights.
3. **Checkpoints are right whenever they are written**: during validation (the weights are then
   swapped) and before this step's update ran (a callback that saves in ``on_train_batch_end``
   before this one, e.g. the preemption checkpoint): the pending update is applied first, so a
   resumed run continues the very same average.
4. **FSDP**: Lightning's callback deep-copies the unsharded module at setup and cannot average a
   sharded one. Under an FSDP strategy the average is kept per rank for the rank's own shard of
   each parameter (the update is elementwise: no communication, 1/N of the memory) and written in
   the strategy's checkpoint format (sharded folders included; see
   :func:`~diffusion_lm.distributed.read_sharded_checkpoint`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.strategies import FSDPStrategy

from .distributed import CURRENT_PREFIX

__all__ = ["EMA"]

log = logging.getLogger(__name__)


class EMA(EMAWeightAveraging):
    """Exponential moving average of the weights: validation, sampling callbacks, checkpoints' ``state_dict``
    and export use the average; training continues on the current weights.

    Args:
        decay: weight of the old average per update (0.999: an average over ~1000 updates).
        update_every_n_steps: update every n optimizer steps.
        update_starting_at_step: first optimizer step (0-based) that updates the average; before it,
            the average is the current model.
        update_starting_at_epoch: also update at the end of each epoch from this one on.
        device: where the average lives (default: with the model; ``cpu`` saves accelerator memory).
            Ignored under FSDP (each rank keeps its shard next to the parameters).
        use_buffers: also average floating-point buffers (default true, as Lightning's).
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: Optional[int] = None,
        update_starting_at_epoch: Optional[int] = None,
        device: Optional[Union[torch.device, str, int]] = None,
        use_buffers: bool = True,
    ) -> None:
        from .errors import ConfigError

        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA.decay must be in [0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise ConfigError(f"EMA.update_every_n_steps must be >= 1, got {update_every_n_steps}")
        super().__init__(
            device=device,
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
            update_starting_at_epoch=update_starting_at_epoch,
        )
        self.decay = decay
        self._swapped = False  # the module holds the average, the averaging holder the trained weights
        self._final = False  # swapped at the end of fit, for good
        self._sharded = False  # FSDP: the average is `_shards`, one tensor per local parameter shard
        self._shards: Optional[list[torch.Tensor]] = None
        self._shard_updates = 0

    # ------------------------------------------------------------------------------- setup
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return  # validate/test/predict of a checkpoint: its state_dict already is the average
        self._swapped = self._final = False
        self._sharded = isinstance(trainer.strategy, FSDPStrategy)
        if not self._sharded:
            super().setup(trainer, pl_module, stage)
        # FSDP: the shards exist only once the strategy has wrapped the model (after setup hooks).

    def _params(self, pl_module: "pl.LightningModule") -> list[torch.Tensor]:
        # Under FSDP (use_orig_params, Lightning's default) these are views of this rank's shard.
        return [p for p in pl_module.parameters()]

    def _ensure_shards(self, pl_module: "pl.LightningModule") -> list[torch.Tensor]:
        if self._shards is None:
            self._shards = [p.detach().clone() for p in self._params(pl_module)]
        return self._shards

    @property
    def _has_average(self) -> bool:
        return self._shards is not None if self._sharded else self._average_model is not None

    @property
    def _started(self) -> bool:
        if self._sharded:
            return self._shard_updates > 0
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    # ------------------------------------------------------------------------------- averaging
    def _update(self, pl_module: "pl.LightningModule") -> None:
        if not self._sharded:
            self._average_model.update_parameters(pl_module)
            return
        shards = self._ensure_shards(pl_module)
        current = [p.detach() for p in self._params(pl_module)]
        with torch.no_grad():
            if self._shard_updates == 0:
                torch._foreach_copy_(shards, current)
            else:  # decay * average + (1 - decay) * current, as torch's get_ema_avg_fn
                torch._foreach_lerp_(shards, current, 1.0 - self.decay)
        self._shard_updates += 1

    def _follow_current(self, pl_module: "pl.LightningModule") -> None:
        """Until the first update, the average is the current model (see the module docstring, 2)."""
        if self._started or not self._has_average:
            return
        if self._sharded:
            with torch.no_grad():
                torch._foreach_copy_(
                    self._ensure_shards(pl_module), [p.detach() for p in self._params(pl_module)]
                )
        else:
            self._copy_current_to_average(pl_module)

    def _copy_current_to_average(self, pl_module: "pl.LightningModule") -> None:
        import itertools

        average = itertools.chain(
            self._average_model.module.parameters(), self._average_model.module.buffers()
        )
        current = itertools.chain(pl_module.parameters(), pl_module.buffers())
        with torch.no_grad():
            for a, c in zip(average, current):
                a.copy_(c.to(a.device))

    def _swap(self, pl_module: "pl.LightningModule") -> None:
        if not self._sharded:
            self._swap_models(pl_module)
            return
        with torch.no_grad():
            for shard, param in zip(self._ensure_shards(pl_module), self._params(pl_module)):
                tmp = shard.clone()
                shard.copy_(param.data)
                param.data.copy_(tmp)

    def _pending_update(self, trainer: "pl.Trainer") -> bool:
        step = trainer.global_step
        return trainer.training and step > self._latest_update_step and self.should_update(step_idx=step - 1)

    # ------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._sharded:
            self._ensure_shards(pl_module)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_update(trainer):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(
            epoch_idx=trainer.current_epoch
        ):
            self._update(pl_module)
            self._latest_update_epoch = trainer.current_epoch

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """After ``fit`` the module holds the average (as with Lightning's callback). It is swapped in,
        not copied: ``ModelCheckpoint`` writes ``last.ckpt`` after this hook, and that checkpoint must
        still hold the trained weights (a run resumed from it trains on, not from the average)."""
        if not self._has_average or self._swapped:
            self._final = self._has_average
            return
        self._follow_current(pl_module)
        self._swap(pl_module)
        self._swapped = self._final = True

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._sharded:
            self._ensure_shards(pl_module)
        if self._has_average and not self._swapped:
            self._follow_current(pl_module)
            self._swap(pl_module)
            self._swapped = True

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Nothing: the average stays in place for the other ``on_validation_epoch_end`` hooks."""

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._swapped and not self._final:
            self._swap(pl_module)
            self._swapped = False

    def on_exception(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException
    ) -> None:
        self.on_validation_end(trainer, pl_module)  # an interrupted validation leaves the trained weights

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "latest_update_epoch": self._latest_update_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._latest_update_epoch = int(state_dict.get("latest_update_epoch", self._latest_update_epoch))

    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        if not self._has_average:
            return super().on_save_checkpoint(trainer, pl_module, checkpoint)
        swapped = self._swapped
        if swapped:  # saved during validation: the module holds the average; dump the trained weights
            self._swap(pl_module)
            self._swapped = False
            checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()
        if self._pending_update(trainer):  # saved before this step's update ran
            self._update(pl_module)
            self._latest_update_step = trainer.global_step
            if self.state_key in checkpoint.get("callbacks", {}):  # collected before this hook
                checkpoint["callbacks"][self.state_key] = self.state_dict()
        self._follow_current(pl_module)
        if self._sharded:
            self._save_sharded(trainer, pl_module, checkpoint)
        else:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if swapped:
            self._swap(pl_module)
            self._swapped = True

    def _save_sharded(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict) -> None:
        current = checkpoint["state_dict"]
        self._swap(pl_module)  # the average into the module, to write it in the strategy's format
        try:
            average = trainer.strategy.lightning_module_state_dict()  # a collective: every rank is here
        finally:
            self._swap(pl_module)
        if getattr(trainer.strategy, "_state_dict_type", "full") == "sharded":
            checkpoint["state_dict"] = {**average, **{CURRENT_PREFIX + k: v for k, v in current.items()}}
        else:
            checkpoint["state_dict"] = average
            checkpoint["current_model_state"] = current
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(self._shard_updates, dtype=torch.long)}

    def on_load_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        if not self._sharded:
            return super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if trainer.state.fn != "fit":
            return
        # The strategy loaded the checkpoint's state_dict (the average, if it has one) into the module.
        averaging = checkpoint.get("averaging_state") or {}
        if "n_averaged" not in averaging:
            log.info("EMA: the checkpoint has no average; it starts from the current weights")
            self._shards = None
            self._ensure_shards(pl_module)
            return
        self._shards = [p.detach().clone() for p in self._params(pl_module)]
        self._shard_updates = int(averaging["n_averaged"])
        _load_current_fsdp(trainer, checkpoint)


def _load_current_fsdp(trainer: "pl.Trainer", checkpoint: dict) -> None:
    """Load the trained (non-averaged) weights of an FSDP checkpoint into the sharded module."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = trainer.strategy.model
    if "current_model_state" in checkpoint:  # full checkpoint: every rank read the whole file
        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=False)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            model.load_state_dict(checkpoint["current_model_state"])
        return
    import torch.distributed.checkpoint as dcp

    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        target = model.state_dict()
        state = {"model": {CURRENT_PREFIX + k: v for k, v in target.items()}}
        dcp.load(state, checkpoint_id=str(trainer.ckpt_path))
        model.load_state_dict({k[len(CURRENT_PREFIX) :]: v for k, v in state["model"].items()})
