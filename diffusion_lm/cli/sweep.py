"""``diffusion-lm sweep``: answer quality and repetition of a model vs the sampler's settings.

The work is :func:`diffusion_lm.evaluation.run_sweep`; this module parses the lists and task flags
and writes the report (``report.md``, ``report.json``, ``sweep_<factor>.png``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError
from ..evaluation import TASK_KINDS, TaskSpec, read_task, run_sweep, write_report
from ..loading import load_for_inference
from ..sampling.config import SamplerSpec, check_options

__all__ = ["sweep_command"]


def _values(flag: str, text: Optional[str], cast: Callable, check: str) -> list:
    """``"4,8,16"`` -> ``[4, 8, 16]``; a bad item is a one-line error naming the flag."""
    if text is None or not str(text).strip():
        return []
    out = []
    for item in str(text).split(","):
        try:
            value = cast(item.strip())
        except ValueError:
            what = "an integer" if cast is int else "a number"
            raise ConfigError(f"--{flag}: {item.strip()!r} is not {what}; give a comma-separated list such "
                              f"as {check}") from None
        out.append(value)
    return out


def _task(text: str, max_records: Optional[int]) -> TaskSpec:
    kind, sep, path = text.partition("=")
    if not sep or kind.strip() not in TASK_KINDS or not path.strip():
        raise ConfigError(f"--task {text!r}: expected KIND=PATH with KIND one of {', '.join(TASK_KINDS)} "
                          "(e.g. chat=data/eval/chat.jsonl)")
    return TaskSpec.coerce({"kind": kind.strip(), "path": path.strip(), "max_records": max_records},
                           f"--task {text!r}")


def sweep_command(
    model: str,
    task: Optional[list[str]] = None,
    steps: Optional[str] = "4,8,16,32",
    thresholds: Optional[str] = "0.5,0.7,0.9",
    block_sizes: Optional[str] = "4,8,32",
    repetition_guard: bool = True,
    preset: Optional[str] = None,
    sampler: SamplerSpec = None,
    canvas_length: Optional[int] = None,
    max_records: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 16,
    output_dir: str = "runs/sweep",
    device: Optional[str] = None,
) -> None:
    """Measure answer quality and repetition vs sampler settings, to choose them from data.

    One setting at a time is changed around the base sampler (--preset / --sampler); every task runs
    at each value. Writes OUTPUT_DIR/report.md (a table), report.json and sweep_<factor>.png (chrF,
    repeated 3-grams, looping share, empty answers and forwards per answer vs the setting), per task
    and, for a task in several languages, per language.

    Args:
        model: a .ckpt checkpoint of `diffusion-lm fit` or a `diffusion-lm export` folder.
        task: KIND=PATH, repeatable (kinds: chat, fim, bridge, edit; schemas in docs/evaluation.md);
            default: chat=data/eval/chat.jsonl.
        steps: forward passes per canvas to try, comma-separated ('' to skip).
        thresholds: confidence thresholds to try, comma-separated ('' to skip).
        block_sizes: semi-autoregressive block sizes to try, comma-separated ('' to skip).
        repetition_guard: also compare the repetition guard off and on.
        preset: the base sampler preset: quality (default), fast or greedy.
        sampler: a SamplerConfig on top of the preset, as a YAML file or an inline mapping.
        canvas_length: answer slots of chat tasks (default: the model's).
        max_records: use at most this many records of each task.
        seed: sampling seed.
        batch_size: rows decoded together.
        output_dir: folder for the report and plots.
        device: cpu or cuda (default: cuda when available).
    """
    grid: dict[str, list] = {}
    for flag, factor, text, cast, example in (("steps", "steps", steps, int, "4,8,16"),
                                               ("thresholds", "threshold", thresholds, float, "0.5,0.9"),
                                               ("block_sizes", "block_size", block_sizes, int, "8,32")):
        values = _values(flag, text, cast, example)
        for v in values:
            check_options(**{factor: v})
        if values:
            grid[factor] = values
    if repetition_guard:
        grid["repetition_guard"] = ["off", "on"]
    if not grid:
        raise ConfigError("nothing to sweep: give --steps, --thresholds, --block_sizes or --repetition_guard")
    check_options(batch_size=batch_size, canvas_length=canvas_length)
    if max_records is not None and max_records < 1:
        raise ConfigError(f"--max_records must be >= 1, got {max_records}")
    specs = [_task(t, max_records) for t in (task or ["chat=data/eval/chat.jsonl"])]
    labels = [s.label for s in specs]
    for i, spec in enumerate(specs):  # two tasks of one kind: name them apart
        if labels.count(spec.label) > 1:
            spec.name = f"{spec.kind}{i + 1}"
    for spec in specs:
        read_task(spec)  # bad task files fail before the (slow) model load
    lm = load_for_inference(model, device)
    rows = run_sweep(lm, specs, grid, preset=preset, sampler=sampler, seed=seed, batch_size=batch_size,
                     canvas_length=canvas_length)
    report = {"model": model, "preset": preset, "seed": seed, "tasks": {}, "sweep": rows}
    paths = write_report(report, Path(output_dir).expanduser())
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
