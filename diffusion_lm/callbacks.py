"""Lightning callbacks: :class:`ValidationSampling` answers fixed prompts at every validation.

The NELBO says how well the model denoises; it does not say whether the answers loop, end too early
or switch language. ``ValidationSampling`` generates answers for the data module's fixed
``validation_prompts`` (English and Russian by default) and records, per validation:

* a JSONL row per prompt in ``<log dir>/val_samples.jsonl``: step, prompt, language, answer,
  repeated 3-gram rate, longest run of one token, answer length, NFE, tokens per forward;
* a table of the samples as TensorBoard text (when a ``TensorBoardLogger`` is attached; other
  loggers are skipped);
* scalar aggregates through ``pl_module.log``: per language the means of every answer metric of
  :func:`~diffusion_lm.sampling.metrics.answer_metrics` (``val_samples/<metric>_<lang>``: ``length``,
  ``empty``, ``eos_position``, ``ended``, ``distinct1``, ``distinct2``, ``rep3``, ``longest_run``,
  ``longest_repeat``, ``looping``; ``len_<lang>`` is kept as the old name of ``length``), and overall
  ``val_samples/rep3``, ``val_samples/looping``, ``val_samples/nfe``, ``val_samples/tokens_per_forward``.

Distributed runs: every rank generates the same answers (same prompts, same seed). A sharded model
(FSDP) needs every rank in each forward pass, and ``trainer.log_dir`` is a broadcast, so nothing that
may communicate sits inside a rank-0-only branch; only the file and TensorBoard writes are rank 0's.
Every rank logs the same scalar keys (averaged over ranks; the values agree anyway).

.. code-block:: yaml

    trainer:
      callbacks:
        - class_path: diffusion_lm.callbacks.ValidationSampling
          init_args: {preset: quality, canvas_length: 32, every_n_validations: 1}
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from .chat import DEFAULT_VALIDATION_PROMPTS, ValidationPrompt
from .errors import ConfigError
from .sampling.config import SamplerConfig
from .sampling.metrics import ANSWER_METRICS, answer_metrics

__all__ = ["BatchComposition", "ValidationSampling"]

log = logging.getLogger(__name__)


class ValidationSampling(Callback):
    """Generate answers for fixed validation prompts at the end of validation and log them.

    Args:
        preset: sampler preset (``quality``, the default, ``fast`` or ``greedy``).
        sampler: a SamplerConfig on top of the preset: a YAML file (``configs/sampler/fast.yaml``),
            a mapping of fields (``{preset: fast, window: full}``), or (from Python) a :class:`SamplerConfig`.
        canvas_length: answer slots (default: the model's ``canvas_length``).
        every_n_validations: sample at the 1st validation and then every n-th (sanity checks don't count).
        max_prompts: at most this many prompts, taken round-robin over languages (default: all).
        seed: sampling seed (fixed, so samples of successive validations are comparable).
        filename: JSONL file in the run's log dir (``trainer.log_dir``, else ``default_root_dir``).
        prompts: prompts to use instead of the data module's ``validation_prompts``
            (``ValidationPrompt(text, language)`` objects or ``{text, language}`` mappings).
        batch_size: prompts decoded together.
    """

    def __init__(
        self,
        preset: Optional[str] = None,
        sampler: Union[str, dict, None] = None,
        canvas_length: Optional[int] = None,
        every_n_validations: int = 1,
        max_prompts: Optional[int] = None,
        seed: int = 0,
        filename: str = "val_samples.jsonl",
        prompts: Optional[list[dict]] = None,
        batch_size: int = 16,
    ) -> None:
        super().__init__()
        if every_n_validations < 1:
            raise ConfigError("ValidationSampling.every_n_validations must be >= 1, got "
                              f"{every_n_validations}")
        if max_prompts is not None and max_prompts < 1:
            raise ConfigError(f"ValidationSampling.max_prompts must be >= 1 or null, got {max_prompts}")
        if canvas_length is not None and canvas_length < 1:
            raise ConfigError(f"ValidationSampling.canvas_length must be >= 1, got {canvas_length}")
        if batch_size < 1:
            raise ConfigError(f"ValidationSampling.batch_size must be >= 1, got {batch_size}")
        self.sampler: SamplerConfig = SamplerConfig.resolve(preset, sampler)
        self.preset = preset
        self.canvas_length = canvas_length
        self.every_n_validations = every_n_validations
        self.max_prompts = max_prompts
        self.seed = seed
        self.filename = filename
        self.prompts = [self._as_prompt(p) for p in prompts] if prompts is not None else None
        self.batch_size = batch_size
        self.validations = 0
        self.path: Optional[Path] = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _as_prompt(p: Any) -> ValidationPrompt:
        if isinstance(p, ValidationPrompt):
            return p
        if isinstance(p, dict):
            return ValidationPrompt(**p)
        if isinstance(p, str):
            return ValidationPrompt(p)
        raise ConfigError(f"ValidationSampling.prompts: expected {{text, language}} mappings, got "
                          f"{type(p).__name__}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _select_prompts(self, trainer: pl.Trainer) -> list:
        prompts = self.prompts
        if prompts is None:
            prompts = getattr(getattr(trainer, "datamodule", None), "validation_prompts", None)
        if prompts is None:
            self._warn_once("prompts", "ValidationSampling: the data module has no validation_prompts; "
                                       "using the default English and Russian prompts")
            prompts = DEFAULT_VALIDATION_PROMPTS
        prompts = [self._as_prompt(p) for p in prompts]
        if self.max_prompts is None or len(prompts) <= self.max_prompts:
            return prompts
        by_lang: dict[str, list] = defaultdict(list)
        for p in prompts:
            by_lang[p.language].append(p)
        chosen: list = []
        while len(chosen) < self.max_prompts:  # round-robin, so every language keeps samples
            for queue in by_lang.values():
                if queue and len(chosen) < self.max_prompts:
                    chosen.append(queue.pop(0))
        return chosen

    @staticmethod
    def _log_dir(trainer: pl.Trainer) -> str:
        # trainer.log_dir broadcasts from rank 0: call it on every rank, never inside a rank-0 branch.
        return trainer.log_dir or trainer.default_root_dir

    # -------------------------------------------------------------------------------------- hooks
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if (self.validations - 1) % self.every_n_validations:
            return
        self.path = Path(self._log_dir(trainer)) / self.filename
        rows = self.sample(trainer, pl_module)
        if not rows:
            return
        for key, value in self.aggregate(rows).items():
            # Every rank logs the same keys (they come from the prompts' languages, not from the
            # generated text), so the mean over ranks is a safe collective here.
            pl_module.log(f"val_samples/{key}", value, on_step=False, on_epoch=True, sync_dist=True)
        if trainer.is_global_zero:
            self._write_jsonl(rows)
            self._write_tensorboard(trainer, rows)

    # ---------------------------------------------------------------------------------- the work
    def sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict]:
        """Generate the answers and return one row per prompt (no logging)."""
        prompts = self._select_prompts(trainer)
        canvas = self.canvas_length or int(pl_module.hparams.canvas_length)
        kept, convs = [], []
        for p in prompts:
            conv = p.conversation()
            problem = pl_module.length_problem(f"the prompt {p.text[:40]!r}", len(pl_module.prompt_ids(conv)),
                                               canvas)
            if problem is not None:
                self._warn_once(f"long:{p.text}", f"ValidationSampling: skipping {problem}")
                continue
            kept.append(p)
            convs.append(conv)
        if not kept:
            return []
        result = pl_module.generate(convs, sampler=self.sampler, canvas_length=canvas, seed=self.seed,
                                    max_batch_size=self.batch_size)
        rows = []
        eos = pl_module.template.eos_id
        for p, conv, ids, seq, text, stats in zip(kept, convs, result.ids, result.sequences, result.texts,
                                                  result.row_stats):
            answer = seq[len(pl_module.prompt_ids(conv)):]
            figures = answer_metrics(ids, answer.index(eos) if eos in answer else None)
            rows.append({
                "step": int(trainer.global_step),
                "epoch": int(trainer.current_epoch),
                "prompt": p.text,
                "language": p.language,
                "answer": text,
                **{k: (None if math.isnan(v) else round(v, 6)) for k, v in figures.items()},
                "nfe": stats.nfe,
                "tokens": stats.tokens,
                "tokens_per_forward": round(stats.tokens_per_forward, 6),
                "seconds": round(stats.seconds, 4),
            })
        return rows

    @staticmethod
    def aggregate(rows: Sequence[dict]) -> dict[str, float]:
        """Scalars: per language the mean of each answer metric (``<metric>_<lang>``; ``len_<lang>`` too,
        the old name of ``length``; a metric no answer has, as the EOS position when none ended, is left
        out); overall rep3, looping share, NFE per answer and tokens per forward (total committed
        tokens over total row forwards)."""

        def mean(group: Sequence[dict], key: str) -> Optional[float]:
            values = [r[key] for r in group if r.get(key) is not None]
            return sum(values) / len(values) if values else None

        out: dict[str, float] = {}
        by_lang: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_lang[r["language"]].append(r)
        for lang, group in sorted(by_lang.items()):
            for key in ANSWER_METRICS:
                value = mean(group, key)
                if value is not None:
                    out[f"{key}_{lang}"] = value
            out[f"len_{lang}"] = out[f"length_{lang}"]
        n = len(rows)
        out["rep3"] = sum(r["rep3"] for r in rows) / n
        out["looping"] = sum(r["looping"] for r in rows) / n
        out["nfe"] = sum(r["nfe"] for r in rows) / n
        forwards = sum(r["nfe"] for r in rows)
        out["tokens_per_forward"] = sum(r["tokens"] for r in rows) / forwards if forwards else 0.0
        return out

    def _write_jsonl(self, rows: Sequence[dict]) -> None:
        assert self.path is not None
        os.makedirs(self.path.parent, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    @staticmethod
    def table(rows: Sequence[dict]) -> str:
        """The samples as a Markdown table (TensorBoard renders it)."""

        def cell(value: Any) -> str:
            return str(value).replace("|", "\\|").replace("\n", "<br>") or " "

        lines = ["| lang | prompt | answer | rep3 | run | loop | len | nfe | tok/fwd |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {cell(r['language'])} | {cell(r['prompt'])} | {cell(r['answer'])} | "
                         f"{r['rep3']:.2f} | {int(r['longest_run'])} | {'yes' if r['looping'] else 'no'} | "
                         f"{int(r['length'])} | {r['nfe']} | {r['tokens_per_forward']:.2f} |")
        return "\n".join(lines)

    def _write_tensorboard(self, trainer: pl.Trainer, rows: Sequence[dict]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return  # another logger (or none): the JSONL file and the scalars still record the samples
        text = self.table(rows)
        for logger in loggers:
            try:
                logger.experiment.add_text("val_samples", text, global_step=int(trainer.global_step))
            except Exception as err:  # a logger problem must not stop training
                self._warn_once("tensorboard", f"ValidationSampling: could not write TensorBoard text: {err}")


class BatchComposition(Callback):
    """What the training batches are made of: padding and language shares, per step and in sum.

    Every training step logs ``data/share_<lang>`` (the share of the batch's examples in each
    language of the mix). At the end of ``fit`` it logs and prints, per language, the mean share,
    its standard deviation over batches, and the binomial standard deviation
    ``sqrt(p (1 - p) / batch)`` that uniformly drawn batches would show: a spread far above it
    means batches are skewed (e.g. length-grouped batching sorting one language together); a
    mix-stratified batch order keeps it near zero. ``MaskedDiffusionLM`` adds this callback unless
    ``trainer.callbacks`` has one. The padding share is logged by the module (``train/padding_share``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0
        self.examples = 0
        self.sums: dict[str, float] = defaultdict(float)
        self.squares: dict[str, float] = defaultdict(float)
        self.report: dict[str, float] = {}

    def _languages(self, trainer: pl.Trainer) -> list[str]:
        summary = getattr(getattr(trainer, "datamodule", None), "summary", None) or {}
        return sorted(summary.get("per_language") or {})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        languages = batch.get("language") if isinstance(batch, dict) else None
        if not languages:
            return
        n = len(languages)
        self.batches += 1
        self.examples += n
        for lang in self._languages(trainer) or sorted(set(languages)):
            share = languages.count(lang) / n
            self.sums[lang] += share
            self.squares[lang] += share * share
            pl_module.log(f"data/share_{lang}", share, on_step=True, on_epoch=False, batch_size=n)

    def summary(self) -> dict[str, float]:
        """``share_<lang>_mean``, ``share_<lang>_std`` and ``share_<lang>_binomial_std`` per language."""
        if not self.batches:
            return {}
        out: dict[str, float] = {}
        size = self.examples / self.batches
        for lang in sorted(self.sums):
            mean = self.sums[lang] / self.batches
            var = max(self.squares[lang] / self.batches - mean * mean, 0.0)
            out[f"share_{lang}_mean"] = mean
            out[f"share_{lang}_std"] = math.sqrt(var)
            out[f"share_{lang}_binomial_std"] = math.sqrt(mean * (1 - mean) / size)
        return out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report = self.summary()
        if not self.report or not trainer.is_global_zero:
            return
        lines = [f"batch composition over {self.batches} training batches (this rank):"]
        for lang in sorted(self.sums):
            r = self.report
            lines.append(f"  {lang}: share {r[f'share_{lang}_mean']:.3f} +- {r[f'share_{lang}_std']:.3f} per "
                         f"batch (uniform batches: +- {r[f'share_{lang}_binomial_std']:.3f})")
        log.info("\n".join(lines))
        for logger in trainer.loggers:
            logger.log_metrics({f"data/{k}": v for k, v in self.report.items()}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "examples": self.examples, "sums": dict(self.sums),
                "squares": dict(self.squares)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches = int(state_dict.get("batches", 0))
        self.examples = int(state_dict.get("examples", 0))
        self.sums = defaultdict(float, state_dict.get("sums", {}))
        self.squares = defaultdict(float, state_dict.get("squares", {}))
