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
    "serve": "diffusion_lm.serve:serve_command",
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


if __name__ == "__main__":  # pragma: no cover
    main()
