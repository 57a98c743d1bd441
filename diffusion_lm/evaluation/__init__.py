"""Evaluation: tasks (chat, code FIM, bridging, span edits), sampler sweeps and reports.

``diffusion-lm test`` runs a suite through the :class:`EvaluationSuite` callback; ``diffusion-lm
sweep`` runs the sweeps on a checkpoint or export folder. Task file schemas: ``docs/evaluation.md``.
"""

from .report import markdown, write_report
from .suite import SWEEP_FACTORS, EvaluationSuite, evaluate, run_sweep, sweep_samplers
from .tasks import (
    TASK_KINDS,
    TaskResult,
    TaskSpec,
    bridge_nelbo,
    edit_figures,
    fim_figures,
    parses,
    read_task,
    run_task,
)

__all__ = ["EvaluationSuite", "SWEEP_FACTORS", "TASK_KINDS", "TaskResult", "TaskSpec", "bridge_nelbo",
           "edit_figures", "evaluate", "fim_figures", "markdown", "parses", "read_task", "run_sweep",
           "run_task", "sweep_samplers", "write_report"]
