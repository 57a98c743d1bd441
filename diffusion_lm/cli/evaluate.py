"""``diffusion-lm eval``: run lm-evaluation-harness tasks on a checkpoint or export (the model is
:class:`diffusion_lm.eval_harness.DiffusionLMEval`, registered as ``diffusion_lm``)."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from ..errors import ConfigError
from .common import open_output

__all__ = ["BUNDLED_TASKS", "eval_command"]

# The repository's local task YAMLs (their data paths are relative to the repository root).
BUNDLED_TASKS = os.path.join("evals", "tasks")


def eval_command(
    model: str,
    tasks: list[str],
    include_path: Optional[str] = None,
    builtin_tasks: bool = True,
    mc_samples: int = 64,
    seed: int = 1234,
    format: str = "chat",
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: int = 32,
    device: Optional[str] = None,
    output: Optional[str] = None,
) -> None:
    """Evaluate a masked-diffusion model with lm-evaluation-harness (needs `pip install diffusion-lm[eval]`).

    Log-likelihoods are Monte-Carlo ELBO estimates (--mc_samples draws, antithetic times, fixed --seed);
    generation tasks use the model's greedy sampler. Example, offline on the bundled smoke-test task
    (run from the repository root):

        diffusion-lm eval --model runs/demo/last.ckpt --tasks diffusion_lm_toy_mc --builtin_tasks false

    Args:
        model: a .ckpt checkpoint of `diffusion-lm fit` or a `diffusion-lm export` folder.
        tasks: lm_eval task names (repeat the flag for several).
        include_path: a folder of extra task YAMLs (default: the repository's evals/tasks when run from
            the repository root).
        builtin_tasks: also index lm_eval's own task collection (thousands of YAMLs: false starts faster
            when only --include_path tasks are run).
        mc_samples: Monte-Carlo draws per log-likelihood request.
        seed: seed of the draws (and of lm_eval's few-shot sampling).
        format: chat (context = user message, continuation = answer) or raw (plain token stream).
        num_fewshot: few-shot examples per prompt (default: the task's).
        limit: evaluate only this many documents per task (or a fraction if < 1).
        batch_size: rows per forward pass of the Monte-Carlo draws.
        device: cpu or cuda (default: cuda when available).
        output: write lm_eval's results (JSON) to this file.
    """
    if mc_samples < 1:
        raise ConfigError(f"--mc_samples must be >= 1, got {mc_samples}")
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise ConfigError("diffusion-lm eval needs lm-evaluation-harness: pip install 'diffusion-lm[eval]'") \
            from None
    from ..eval_harness import DiffusionLMEval

    lm = DiffusionLMEval(model, mc_samples=mc_samples, seed=seed, format=format, batch_size=batch_size,
                         device=device)
    if include_path is None and os.path.isdir(BUNDLED_TASKS):
        include_path = BUNDLED_TASKS
    if include_path is not None and not os.path.isdir(include_path):
        raise ConfigError(f"--include_path {include_path!r}: no such folder of task YAMLs")
    if not include_path and not builtin_tasks:
        raise ConfigError("--builtin_tasks false needs --include_path: there would be no task to run")
    manager = TaskManager(include_path=include_path or None, include_defaults=builtin_tasks)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {unknown} (with --include_path {include_path})")
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False)
    print(make_table(results))
    if output is not None:
        with open_output(output) as handle:
            handle.write(json.dumps({"results": results["results"], "config": results.get("config")},
                                    indent=2, ensure_ascii=False, default=str) + "\n")
        print(f"wrote {output}", file=sys.stderr)
