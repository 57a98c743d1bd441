"""An evaluation suite: tasks at one sampler setting, plus sweeps of the sampler's settings.

* :func:`evaluate` -- run tasks with a model and one sampler; optionally sweep settings; a report dict.
* :func:`run_sweep` -- task figures vs ``steps`` / ``threshold`` / ``block_size`` / repetition guard
  on-off, one factor at a time around the base sampler.
* :class:`EvaluationSuite` -- a Lightning callback: ``diffusion-lm test --config ... --ckpt_path ...``
  with it in ``trainer.callbacks`` runs the suite after the test NELBO and writes the report
  (:func:`~diffusion_lm.evaluation.report.write_report`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from ..errors import ConfigError
from ..sampling.config import SamplerConfig, SamplerSpec
from ..sampling.processors import RepetitionGuard
from .report import write_report
from .tasks import TaskResult, TaskSpec, read_task, run_task

__all__ = ["EvaluationSuite", "SWEEP_FACTORS", "evaluate", "run_sweep", "sweep_samplers"]

log = logging.getLogger(__name__)

SWEEP_FACTORS = ("steps", "threshold", "block_size", "repetition_guard")
# Figures a sweep keeps per task (when the task has them): quality, repetition, cost.
SWEEP_FIGURES = ("chrf", "exact", "rep3", "looping", "distinct2", "empty", "length", "nfe", "fixed/chrf",
                 "fixed/exact", "fixed/parses", "variable/chrf", "variable/empty")


def sweep_samplers(base: SamplerConfig, factor: str, values: Sequence[Any], preset: Optional[str] = None,
                   sampler: SamplerSpec = None) -> list[tuple[Any, SamplerConfig]]:
    """``(value, sampler)`` pairs: the base sampler with one setting changed. ``steps``, ``threshold`` and
    ``block_size`` go through :meth:`SamplerConfig.resolve` (as the command-line flags do) on top of
    ``preset`` / ``sampler``; ``repetition_guard`` takes ``on`` / ``off`` (or booleans)."""
    out = []
    for value in values:
        if factor in ("steps", "threshold", "block_size"):
            out.append((value, SamplerConfig.resolve(preset, sampler, **{factor: value})))
        elif factor == "repetition_guard":
            on = value if isinstance(value, bool) else str(value).strip().lower() in ("on", "true", "yes")
            others = [p for p in base.processors if not isinstance(p, RepetitionGuard)]
            guard = next((p for p in base.processors if isinstance(p, RepetitionGuard)), RepetitionGuard())
            out.append(("on" if on else "off", base.replace(processors=others + ([guard] if on else []))))
        else:
            raise ConfigError(f"unknown sweep factor {factor!r}; valid: {', '.join(SWEEP_FACTORS)}")
    return out


def run_sweep(model, specs: Sequence[TaskSpec], grid: dict[str, Sequence[Any]], *,
              preset: Optional[str] = None, sampler: SamplerSpec = None, seed: int = 0, batch_size: int = 16,
              canvas_length: Optional[int] = None) -> list[dict]:
    """One row per (factor, value, task): ``{factor, value, task, seconds, <figure>: mean}`` for the
    :data:`SWEEP_FIGURES` the task reports, and one per language of a multilingual task (``task[en]``).
    Factors are varied one at a time around the base sampler."""
    base = SamplerConfig.resolve(preset, sampler)
    records = {spec.label: read_task(spec) for spec in specs}
    rows = []
    for factor, values in grid.items():
        for value, config in sweep_samplers(base, factor, list(values), preset, sampler):
            for spec in specs:
                t0 = time.perf_counter()
                result = run_task(model, spec, config, seed=seed, batch_size=batch_size,
                                  canvas_length=canvas_length, records=records[spec.label])
                row = {"factor": factor, "value": value, "task": spec.label,
                       "seconds": round(time.perf_counter() - t0, 3)}
                row.update({k: result.metrics[k] for k in SWEEP_FIGURES if k in result.metrics})
                rows.append(row)
                languages = result.languages
                for lang in languages if len(languages) > 1 else []:  # models differ most by language
                    sub = {"factor": factor, "value": value, "task": f"{spec.label}[{lang}]"}
                    sub.update({k: result.metrics[f"{k}_{lang}"] for k in SWEEP_FIGURES
                                if f"{k}_{lang}" in result.metrics})
                    rows.append(sub)
    return rows


def _samples(rows: list[dict], count: int) -> list[dict]:
    """Up to ``count`` rows, taken round-robin over languages (every language shows samples)."""
    queues: dict[Any, list[dict]] = {}
    for row in rows:
        queues.setdefault(row.get("language"), []).append(row)
    out: list[dict] = []
    while len(out) < min(count, len(rows)):
        for queue in queues.values():
            if queue and len(out) < count:
                out.append(queue.pop(0))
    return out


def _task_entry(result: TaskResult, samples: int) -> dict:
    return {"kind": result.spec.kind, "path": result.spec.path, "records": len(result.rows),
            "skipped": len(result.skipped), "skip_reasons": result.skipped[:5], "figures": result.figures,
            "languages": result.languages, "metrics": result.metrics,
            "samples": _samples(result.rows, samples), "rows": result.rows}


def evaluate(model, tasks: Sequence[Union[TaskSpec, dict]], *, preset: Optional[str] = None,
             sampler: SamplerSpec = None, seed: int = 0, batch_size: int = 16,
             canvas_length: Optional[int] = None, sweep: Optional[dict[str, Sequence[Any]]] = None,
             sweep_tasks: Optional[Sequence[str]] = None, samples: int = 4) -> dict:
    """Run ``tasks`` with ``model`` at the sampler ``preset`` + ``sampler``; with ``sweep`` (``{factor:
    values}``), also sweep those settings on ``sweep_tasks`` (task names; default: the chat tasks).
    Returns the report dict that :func:`~diffusion_lm.evaluation.report.write_report` writes."""
    specs = [TaskSpec.coerce(t, f"tasks[{i}]") for i, t in enumerate(tasks)]
    if not specs:
        raise ConfigError("an evaluation suite needs at least one task ({kind, path})")
    names = [s.label for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names}; give each a name")
    config = SamplerConfig.resolve(preset, sampler)
    report: dict[str, Any] = {"sampler": config.to_dict(), "preset": preset, "seed": seed, "tasks": {}}
    for spec in specs:
        t0 = time.perf_counter()
        result = run_task(model, spec, config, seed=seed, batch_size=batch_size, canvas_length=canvas_length)
        entry = _task_entry(result, samples)
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        report["tasks"][spec.label] = entry
    if sweep:
        chosen = [s for s in specs if (s.label in sweep_tasks if sweep_tasks else s.kind == "chat")]
        unknown = set(sweep_tasks or ()) - set(names)
        if unknown:
            raise ConfigError(f"sweep_tasks {sorted(unknown)} are not tasks of the suite "
                              f"({', '.join(names)})")
        report["sweep"] = run_sweep(model, chosen, sweep, preset=preset, sampler=sampler, seed=seed,
                                    batch_size=batch_size, canvas_length=canvas_length)
    return report


class EvaluationSuite(Callback):
    """Run evaluation tasks at the end of ``test`` and write a report (JSON, Markdown, PNG plots).

    ``diffusion-lm test --config configs/demo.yaml --config configs/eval/suite.yaml --ckpt_path CKPT``:
    the test NELBO and masked-token accuracy per language come from the model's ``test_step``; this
    callback then generates with the model and adds the task figures and the sweeps.

    Args:
        tasks: the tasks (``{kind, path, name?, max_records?, slack?, nelbo_samples?}``, see
            :class:`~diffusion_lm.evaluation.tasks.TaskSpec`).
        output_dir: where the report goes (default: ``<log dir>/evaluation``).
        preset: sampler preset of the main run (default: the sampler's default, ``quality``).
        sampler: a SamplerConfig on top of the preset (YAML file or mapping).
        canvas_length: answer slots of chat tasks (default: the model's).
        seed: sampling seed.
        batch_size: rows decoded together.
        steps / thresholds / block_sizes: sweep these sampler settings (each one at a time).
        repetition_guard: also sweep the repetition guard off and on.
        sweep_tasks: task names to sweep (default: the chat tasks).
    """

    def __init__(
        self,
        tasks: list[TaskSpec],
        output_dir: Optional[str] = None,
        preset: Optional[str] = None,
        sampler: SamplerSpec = None,
        canvas_length: Optional[int] = None,
        seed: int = 0,
        batch_size: int = 16,
        steps: Optional[list[int]] = None,
        thresholds: Optional[list[float]] = None,
        block_sizes: Optional[list[int]] = None,
        repetition_guard: bool = False,
        sweep_tasks: Optional[list[str]] = None,
    ) -> None:
        super().__init__()
        self.tasks = [TaskSpec.coerce(t, f"EvaluationSuite.tasks[{i}]") for i, t in enumerate(tasks)]
        if batch_size < 1:
            raise ConfigError(f"EvaluationSuite.batch_size must be >= 1, got {batch_size}")
        SamplerConfig.resolve(preset, sampler)  # bad sampler options fail before the checkpoint loads
        self.output_dir = output_dir
        self.preset, self.sampler = preset, sampler
        self.canvas_length, self.seed, self.batch_size = canvas_length, seed, batch_size
        self.sweep: dict[str, list] = {}
        for factor, values in (("steps", steps), ("threshold", thresholds), ("block_size", block_sizes)):
            if values:
                self.sweep[factor] = list(values)
        if repetition_guard:
            self.sweep["repetition_guard"] = ["off", "on"]
        self.sweep_tasks = sweep_tasks
        self.report: Optional[dict] = None
        self.paths: list[Path] = []

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # trainer.log_dir broadcasts from rank 0: every rank calls it. Every rank generates (a sharded
        # model needs all of them in each forward); only rank 0 writes.
        folder = Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "evaluation")
        report = evaluate(pl_module, self.tasks, preset=self.preset, sampler=self.sampler, seed=self.seed,
                          batch_size=self.batch_size, canvas_length=self.canvas_length, sweep=self.sweep,
                          sweep_tasks=self.sweep_tasks)
        report["model"] = str(trainer.ckpt_path) if trainer.ckpt_path else type(pl_module).__name__
        report["test"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        self.report = report
        if trainer.is_global_zero:
            self.paths = write_report(report, folder)
            print(f"evaluation report: {folder / 'report.md'} (+ report.json, {len(self.paths) - 2} plot(s))")
