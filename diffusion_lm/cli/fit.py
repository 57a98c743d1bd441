"""``diffusion-lm fit | validate | test | predict``: LightningCLI over :class:`MaskedDiffusionLM` and
:class:`DialogDataModule`, with the project's Trainer defaults and resume rules."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.cli import LightningCLI

from ..checkpoint_io import AtomicCheckpointIO
from ..data.datamodule import DialogDataModule
from ..module import MaskedDiffusionLM
from ..preemption import add_default as add_preemption_default
from ..resume import check_resume, find_last_checkpoint, read_checkpoint

__all__ = ["DiffusionLMCLI", "with_atomic_checkpoint_io"]


class DiffusionLMCLI(LightningCLI):
    """LightningCLI for :class:`MaskedDiffusionLM` and :class:`DialogDataModule`.

    The data module shards and length-groups batches itself, so the Trainer default
    ``use_distributed_sampler`` is off. Defaults added to the Trainer unless configured:

    * :class:`~diffusion_lm.checkpoint_io.AtomicCheckpointIO` (unless another ``CheckpointIO`` plugin
      is given): checkpoints are written atomically and never with NaN weights;
    * for ``fit``, :class:`~diffusion_lm.preemption.PreemptionCheckpoint` (unless one is in
      ``trainer.callbacks``): SIGTERM/SIGUSR1 save a checkpoint and exit with 128 + signal.

    ``--ckpt_path`` follows :mod:`diffusion_lm.resume`: the config is applied (never replaced by the
    checkpoint's hyperparameters), a different model is an error, and ``last`` finds the newest
    ``last.ckpt`` of any earlier run under ``trainer.default_root_dir``.
    """

    def __init__(self, args: Optional[Sequence[str]] = None, run: bool = True, **kwargs) -> None:
        trainer_defaults = {"use_distributed_sampler": False, **kwargs.pop("trainer_defaults", {})}
        super().__init__(
            MaskedDiffusionLM,
            DialogDataModule,
            args=args,
            run=run,
            trainer_defaults=trainer_defaults,
            save_config_kwargs={"overwrite": True},
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        # One canvas length for training filler and sampling, unless set apart explicitly.
        parser.link_arguments("data.canvas.length", "model.canvas_length")

    def _parse_ckpt_path(self) -> None:
        # Replaces LightningCLI's: Lightning 2.6 overwrites every model.* option with the
        # checkpoint's hyperparameters (a changed architecture silently, a changed learning rate
        # too, while hparams.yaml shows the new value) and shows a traceback for a truncated file.
        # This runs right after parsing, before any class is built or any data is read.
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        ckpt_path = str(ckpt_path)
        if ckpt_path == "last":
            trainer = config.get("trainer") or {}
            callbacks = trainer.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            dirpaths = [getattr(getattr(cb, "init_args", None), "dirpath", None) for cb in callbacks]
            found = find_last_checkpoint(trainer.get("default_root_dir"),
                                         [d for d in dirpaths if isinstance(d, str)])
            if found is None:
                return  # Lightning warns and starts from scratch: `ckpt_path: last` on a first run
            ckpt_path = config["ckpt_path"] = found
        checkpoint = read_checkpoint(ckpt_path)
        if checkpoint is not None:
            check_resume(checkpoint.get("hyper_parameters") or {}, config["model"].as_dict(), ckpt_path)

    def instantiate_trainer(self, **kwargs: Any):
        """The Trainer, with the atomic checkpoint writer and (for ``fit``) the preemption callback
        added unless configured."""
        config = self.config_init.get(self.subcommand) if self.subcommand else self.config_init
        trainer = (config.get("trainer") if config is not None else None) or {}
        if "plugins" not in kwargs:
            kwargs["plugins"] = with_atomic_checkpoint_io(trainer.get("plugins"))
        if self.subcommand == "fit" and "callbacks" not in kwargs:
            kwargs["callbacks"] = add_preemption_default(trainer.get("callbacks"))
        return super().instantiate_trainer(**kwargs)


def with_atomic_checkpoint_io(plugins: Any) -> list:
    """``plugins`` (None, one plugin or a list) with :class:`AtomicCheckpointIO` added unless a
    ``CheckpointIO`` is configured."""
    items = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in items):
        items.append(AtomicCheckpointIO())
    return items
