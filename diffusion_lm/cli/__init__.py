"""The ``diffusion-lm`` command: the top layer, where flags and files meet the library.

``fit | validate | test | predict`` are LightningCLI subcommands (:mod:`diffusion_lm.cli.fit`:
``--config``, ``--print_config``, class paths for schedules and callbacks). ``export | generate |
infill | chat | check | serve | eval | sweep`` are typed functions exposed through jsonargparse, one
module each (:mod:`diffusion_lm.cli.generate`, ...): their signatures are the command lines, their docstrings
``--help``. Nothing in the library imports this package.
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

from jsonargparse import auto_cli

from ..errors import ConfigError, TrainingDiverged
from .fit import DiffusionLMCLI, with_atomic_checkpoint_io

__all__ = ["COMMANDS", "DiffusionLMCLI", "main", "repeatable_lists", "with_atomic_checkpoint_io"]

# name -> "module:function"; each function's typed signature is its command-line interface.
COMMANDS = {
    "export": "diffusion_lm.cli.export:export_command",
    "generate": "diffusion_lm.cli.generate:generate_command",
    "infill": "diffusion_lm.cli.infill:infill_command",
    "chat": "diffusion_lm.cli.chat:chat_command",
    "check": "diffusion_lm.cli.check:check_command",
    "serve": "diffusion_lm.cli.serve:serve_command",
    "eval": "diffusion_lm.cli.evaluate:eval_command",
    "sweep": "diffusion_lm.cli.sweep:sweep_command",
}


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
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,
                                                                       types.UnionType) else (hint,)
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
