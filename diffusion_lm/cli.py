"""The ``diffusion-lm`` command.

``fit | validate | test | predict`` are LightningCLI subcommands (``--config``, ``--print_config``,
class paths for schedules and callbacks). ``export | generate | infill | chat | check | serve`` are typed
functions exposed through jsonargparse, in the modules that own them.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import types
import typing
from typing import Any, Callable, Optional, Sequence

from lightning.pytorch.cli import LightningCLI

from .checkpoint_io import AtomicCheckpointIO
from .data.datamodule import DialogDataModule
from .errors import ConfigError, TrainingDiverged
from .module import MaskedDiffusionLM
from .preemption import add_default as add_preemption_default
from .resume import check_resume, find_last_checkpoint, read_checkpoint

__all__ = ["DiffusionLMCLI", "main", "COMMANDS"]

# name -> "module:function"; each function's typed signature is its command-line interface.
COMMANDS = {
    "export": "diffusion_lm.export:export_command",
    "generate": "diffusion_lm.sampling.commands:generate_command",
    "infill": "diffusion_lm.sampling.commands:infill_command",
    "chat": "diffusion_lm.sampling.commands:chat_command",
    "check": "diffusion_lm.health:check_command",
    "serve": "diffusion_lm.serve:serve_command",
}


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
            found = find_last_checkpoint(trainer.get("default_root_dir"), [d for d in dirpaths if isinstance(d, str)])
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
    from lightning.fabric.plugins import CheckpointIO

    items = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in items):
        items.append(AtomicCheckpointIO())
    return items


def _resolve(name: str) -> Callable:
    module_name, func = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module_name), func)


def _list_of_str_params(fn: Callable) -> list[str]:
    """Names of ``fn``'s parameters typed ``list[str]`` (or ``Optional[list[str]]``)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: no rewriting
        return []
    names = []
    for name in inspect.signature(fn).parameters:
        hint = hints.get(name)
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if any(typing.get_origin(h) is list and typing.get_args(h) in ((str,), ()) for h in options):
            names.append(name)
    return names


def repeatable_lists(fn: Callable, argv: Sequence[str]) -> list[str]:
    """Make ``--name A --name B`` mean the list ``[A, B]`` for ``list[str]`` parameters of ``fn``.

    jsonargparse wants ``--name+ A`` or a YAML list for list options; each repeated flag's value is
    kept as a literal string (no YAML parsing: a prompt like ``null`` or ``- item`` stays text).
    ``--name+ ...`` and ``--name=...`` forms pass through / are gathered as well.
    """
    names = _list_of_str_params(fn)
    if not names:
        return list(argv)
    out: list[str] = []
    gathered: dict[str, list[str]] = {}
    slot: dict[str, int] = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        if token == "--":
            out.extend(argv[i:])
            break
        matched = False
        for name in names:
            flag = f"--{name}"
            if token == flag and i + 1 < len(argv):
                value, step = argv[i + 1], 2
            elif token.startswith(flag + "="):
                value, step = token[len(flag) + 1 :], 1
            else:
                continue
            if name not in slot:
                slot[name] = len(out)
                out.append(flag)
                out.append("")  # filled below
            gathered.setdefault(name, []).append(value)
            i += step
            matched = True
            break
        if not matched:
            out.append(token)
            i += 1
    for name, values in gathered.items():
        out[slot[name] + 1] = json.dumps(values, ensure_ascii=False)
    return out


def main(args: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``diffusion-lm`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in COMMANDS:
            from jsonargparse import auto_cli

            fn = _resolve(argv[0])
            auto_cli(fn, args=repeatable_lists(fn, argv[1:]), as_positional=False)
        else:
            DiffusionLMCLI(args=None if args is None else argv)
    except ConfigError as err:
        if os.environ.get("DIFFUSION_LM_DEBUG"):
            raise
        print(f"diffusion-lm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingDiverged as err:
        if os.environ.get("DIFFUSION_LM_DEBUG"):
            raise
        print(f"diffusion-lm: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    main()
