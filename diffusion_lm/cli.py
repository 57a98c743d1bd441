"""The ``diffusion-lm`` command.

``fit | validate | test | predict`` are LightningCLI subcommands (``--config``, ``--print_config``,
class paths for schedules and callbacks). ``export | generate | infill | chat | check`` are typed
functions exposed through jsonargparse, in the modules that own them.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Optional, Sequence

from lightning.pytorch.cli import LightningCLI

from .data.datamodule import DialogDataModule
from .errors import ConfigError
from .module import MaskedDiffusionLM

__all__ = ["DiffusionLMCLI", "main", "COMMANDS"]

# name -> "module:function"; each function's typed signature is its command-line interface.
COMMANDS = {
    "export": "diffusion_lm.export:export_command",
    "generate": "diffusion_lm.sampling.commands:generate_command",
    "infill": "diffusion_lm.sampling.commands:infill_command",
    "chat": "diffusion_lm.sampling.commands:chat_command",
    "check": "diffusion_lm.health:check_command",
}


class DiffusionLMCLI(LightningCLI):
    """LightningCLI for :class:`MaskedDiffusionLM` and :class:`DialogDataModule`.

    The data module shards and length-groups batches itself, so the Trainer default
    ``use_distributed_sampler`` is off.
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


def _resolve(name: str) -> Callable:
    module_name, func = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module_name), func)


def main(args: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``diffusion-lm`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in COMMANDS:
            from jsonargparse import auto_cli

            auto_cli(_resolve(argv[0]), args=argv[1:], as_positional=False)
        else:
            DiffusionLMCLI(args=None if args is None else argv)
    except ConfigError as err:
        if os.environ.get("DIFFUSION_LM_DEBUG"):
            raise
        print(f"diffusion-lm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
