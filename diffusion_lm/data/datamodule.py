"""DialogDataModule: the Lightning face of the data pipeline (hooks only).

Sources -> conversations -> (prompt ids, answer ids) -> the mix is :func:`~diffusion_lm.data.mix.build_mix`;
batches are :mod:`~diffusion_lm.data.loaders`'. This module checks the ``data.*`` options, receives the
model's chat template through :meth:`DialogDataModule.connect` (``MaskedDiffusionLM.setup`` calls it:
the data never reads the Trainer's model), builds the mix once, reports it to the loggers, counts the
skips streaming batches carry, and saves the data summary in checkpoints.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from ..backbone import load_tokenizer
from ..chat import DEFAULT_VALIDATION_PROMPTS, ChatTemplate, ValidationPrompt
from ..errors import ConfigError
from .collate import CanvasPolicy, DiffusionCollator
from .examples import parse_skip_key
from .loaders import map_loader, stream_loader
from .mix import MixSettings, StoppingStrategy, build_mix, describe_mix
from .skips import SkipSummary
from .sources import DataSource

# ValidationPrompt, DEFAULT_VALIDATION_PROMPTS and SkipSummary: importable from here as before.
__all__ = ["DialogDataModule", "ValidationPrompt", "DEFAULT_VALIDATION_PROMPTS", "SkipSummary"]

log = logging.getLogger(__name__)


def _check_options(sources: list, *, batch_size: int, val_batch_size: Optional[int], max_length: int,
                   canvas: CanvasPolicy, train_turns: str, total_samples: Optional[int], num_workers: int,
                   num_proc: Optional[int], batching: str, pack_length: Optional[int],
                   group_batches: Optional[int], shuffle_buffer: int, pad_to_multiple_of: int) -> None:
    """One-line errors for ``data.*`` options out of range or in conflict, before any data is read."""
    if not sources:
        raise ConfigError("data.sources is empty: give at least one source (path, format, language)")
    minimum = {"num_workers": 0, "max_length": 2}
    counts = dict(batch_size=batch_size, val_batch_size=val_batch_size, max_length=max_length,
                  num_workers=num_workers, num_proc=num_proc, group_batches=group_batches,
                  shuffle_buffer=shuffle_buffer, pad_to_multiple_of=pad_to_multiple_of,
                  pack_length=pack_length)
    for name, value in counts.items():
        low = minimum.get(name, 1)
        if value is not None and value < low:
            raise ConfigError(f"data.{name} must be >= {low}, got {value}")
    if canvas.length >= max_length:
        raise ConfigError(
            f"data.canvas.length ({canvas.length}) must be smaller than data.max_length ({max_length}): "
            "prompts get max_length - canvas.length tokens"
        )
    if train_turns not in ("last", "all"):
        raise ConfigError(f"data.train_turns must be 'last' or 'all', got {train_turns!r}")
    if total_samples is not None and total_samples <= 0:
        raise ConfigError(f"data.total_samples must be > 0, got {total_samples}")
    _check_batching(batching, max_length, pack_length, group_batches)


def _check_batching(batching: str, max_length: int, pack_length: Optional[int],
                    group_batches: Optional[int]) -> None:
    if batching not in ("packed", "padded", "grouped"):
        raise ConfigError(f"data.batching must be packed, padded or grouped, got {batching!r}")
    if group_batches is not None and batching != "grouped":
        raise ConfigError("data.group_batches applies to data.batching: grouped only (batching is "
                          f"{batching!r})")
    if pack_length is not None and batching != "packed":
        raise ConfigError(f"data.pack_length applies to data.batching: packed only "
                          f"(batching is {batching!r})")
    if pack_length is not None and pack_length < max_length:
        raise ConfigError(f"data.pack_length ({pack_length}) must be >= data.max_length ({max_length}): "
                          "every example must fit in a row")


class DialogDataModule(pl.LightningDataModule):
    """Builds the bilingual training mix and its batches.

    Args:
        sources: the datasets of the mix (see :class:`DataSource`).
        tokenizer: a tokenizer folder or hub id; default: the model's own (the model hands its chat
            template over with :meth:`connect`, so training and sampling share one code path).
        batch_size: examples per rank per optimizer step.
        val_batch_size: examples per rank per validation step (default ``batch_size``).
        max_length: longest prompt + answer canvas in tokens; prompts get ``max_length - canvas.length``.
        canvas: the end-token and filler policy of the answer region.
        train_turns: ``last`` assistant turn only, or ``all`` assistant turns (each with its context).
        total_samples: size of the training mix (e.g. 750000), apportioned over the sources by
            weight; default: set by ``stopping_strategy``. For streaming mixes: examples per epoch.
        strict: raise on the first bad record (naming source, split and record index) instead of
            counting it.
        seed: seed of the validation split, mixing and shuffling.
        num_workers: DataLoader workers.
        num_proc: processes for tokenisation (``datasets.map``).
        validation_prompts: fixed prompts for the sampling callback (default: English + Russian).
        batching: how examples become rows. ``packed`` (default): each batch is a random sample of
            the mix, packed into rows of ``pack_length`` tokens with per-example attention (no
            padding, no length bias). ``padded``: the same random batches, one example per row,
            padded to the longest. ``grouped``: windows of ``group_batches`` batches sorted by length
            (little padding, but each batch is then one length class, which correlates with
            language, source and task and slows learning: see docs/data.md).
        stratify: every training batch holds each source in its mix share (+-1 example), so an
            equal English/Russian mix is equal in every step, not only per epoch; otherwise batches
            are uniform samples (shares vary binomially).
        pack_length: row capacity in tokens for ``packed`` batching (default: each batch's longest
            example, so rows are never wider than padded rows; a larger value packs more per row at
            a higher attention cost per token).
        group_batches: length grouping window in global batches, for ``grouped`` batching only
            (default 64).
        stopping_strategy: mix size when ``total_samples`` is unset: ``all_exhausted`` (every
            example of every source at least once; small sources repeat) or ``first_exhausted``
            (no example twice; large sources are subsampled).
        shuffle_buffer: buffer size of the streaming shuffle.
        cache_dir: ``datasets`` cache folder (default: ``HF_DATASETS_CACHE``).
        pad_to_multiple_of: batch width rounding (tensor-core friendly shapes).
    """

    def __init__(
        self,
        sources: list[DataSource],
        tokenizer: Optional[str] = None,
        batch_size: int = 16,
        val_batch_size: Optional[int] = None,
        max_length: int = 512,
        canvas: CanvasPolicy = CanvasPolicy(),
        train_turns: Literal["last", "all"] = "last",
        total_samples: Optional[int] = None,
        strict: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        num_proc: Optional[int] = None,
        validation_prompts: Optional[list[ValidationPrompt]] = None,
        batching: Literal["packed", "padded", "grouped"] = "packed",
        stratify: bool = True,
        pack_length: Optional[int] = None,
        group_batches: Optional[int] = None,
        stopping_strategy: StoppingStrategy = "all_exhausted",
        shuffle_buffer: int = 10_000,
        cache_dir: Optional[str] = None,
        pad_to_multiple_of: int = 8,
    ) -> None:
        super().__init__()
        canvas = canvas if isinstance(canvas, CanvasPolicy) else CanvasPolicy(**canvas)
        _check_options(sources, batch_size=batch_size, val_batch_size=val_batch_size, max_length=max_length,
                       canvas=canvas, train_turns=train_turns, total_samples=total_samples,
                       num_workers=num_workers, num_proc=num_proc, batching=batching, pack_length=pack_length,
                       group_batches=group_batches, shuffle_buffer=shuffle_buffer,
                       pad_to_multiple_of=pad_to_multiple_of)
        self.sources = [s if isinstance(s, DataSource) else DataSource(**s) for s in sources]
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"data.sources have duplicate labels {labels}; give them distinct `name`s")
        self.tokenizer_path = tokenizer
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.max_length = max_length
        self.canvas = canvas
        self.train_turns = train_turns
        self.total_samples = total_samples
        self.strict = strict
        self.seed = seed
        self.num_workers = num_workers
        self.num_proc = num_proc
        if validation_prompts is None:
            validation_prompts = list(DEFAULT_VALIDATION_PROMPTS)
        self.validation_prompts = validation_prompts
        self.batching = batching
        self.stratify = stratify
        self.pack_length = pack_length
        default_group = 64 if batching == "grouped" else 1
        self.group_batches = group_batches if group_batches is not None else default_group
        self.stopping_strategy = stopping_strategy
        self.shuffle_buffer = shuffle_buffer
        self.cache_dir = cache_dir
        self.pad_to_multiple_of = pad_to_multiple_of
        self.template: Optional[ChatTemplate] = None
        self.model_max_length: Optional[int] = None  # the model's positions, once connected
        self.skipped = SkipSummary()
        self.train_dataset = None  # map-style mix (datasets.Dataset)
        self.train_stream = None  # streaming mix (datasets.IterableDataset), before rank sharding
        self.val_dataset = None
        self.summary: dict = {}
        self._stage: Optional[str] = None
        self._setup_called = False
        self._reported_to: set[int] = set()
        self._stream_skips_seen = False

    # ----------------------------------------------------------------- the model's template
    def connect(self, template: ChatTemplate, max_length: Optional[int] = None) -> None:
        """Take the model's chat template and sequence limit (``MaskedDiffusionLM.setup`` calls this).

        With ``data.tokenizer`` set the data keeps its own template, which must have the model's
        vocabulary; ``data.max_length`` must fit in the model's ``max_length`` positions. A ``setup``
        that waited for the template builds the mix now.
        """
        if self.tokenizer_path is not None:
            own = self.resolve_template()
            if len(own.tokenizer) != len(template.tokenizer):
                raise ConfigError(
                    f"data.tokenizer={self.tokenizer_path!r} has {len(own.tokenizer)} tokens but the model's "
                    f"tokenizer has {len(template.tokenizer)}; leave data.tokenizer unset to use the model's."
                )
        else:
            self.template = template
        if max_length is not None and self.max_length > max_length:
            raise ConfigError(
                f"data.max_length={self.max_length} exceeds the backbone's {max_length} positions; lower "
                "data.max_length"
            )
        self.model_max_length = max_length
        if self._setup_called:
            self._prepare()

    def resolve_template(self) -> ChatTemplate:
        """The chat template: the connected model's, else one from ``data.tokenizer``."""
        if self.template is not None:
            return self.template
        if self.tokenizer_path is None:
            raise ConfigError("DialogDataModule needs a tokenizer: set data.tokenizer or attach it to a "
                              "MaskedDiffusionLM")
        self.template = ChatTemplate(load_tokenizer(self.tokenizer_path))
        return self.template

    # ----------------------------------------------------------------- setup
    def setup(self, stage: Optional[str] = None) -> None:
        """Load, split, tokenise and mix every source (once), then report what was kept and skipped.

        Without ``data.tokenizer`` the mix waits for the model's template (:meth:`connect`, called by
        ``MaskedDiffusionLM.setup`` right after this hook) or for the first dataloader.
        """
        self._stage, self._setup_called = stage, True
        if self.template is not None or self.tokenizer_path is not None:
            self._prepare()

    def _prepare(self) -> None:
        if self.train_dataset is None and self.train_stream is None:
            mix = build_mix(self.sources, self.resolve_template(), self.settings, self.skipped)
            self.train_dataset, self.train_stream = mix.train_dataset, mix.train_stream
            self.val_dataset = mix.val_dataset
            self.summary = mix.summary
        if self._stage in (None, "fit") and self.train_stream is not None and self.total_samples is None:
            if getattr(self.trainer, "max_steps", None) == -1:
                raise ConfigError(
                    "a streaming training mix has no end: set data.total_samples (examples per epoch) or "
                    "trainer.max_steps"
                )
        self._report()

    def _ready(self) -> None:
        if self.train_dataset is None and self.train_stream is None:
            self._prepare()

    @property
    def settings(self) -> MixSettings:
        """The options that decide the examples and the mix."""
        return MixSettings(canvas=self.canvas, max_length=self.max_length, train_turns=self.train_turns,
                           strict=self.strict, seed=self.seed, total_samples=self.total_samples,
                           stopping_strategy=self.stopping_strategy, num_proc=self.num_proc,
                           cache_dir=self.cache_dir)

    # ----------------------------------------------------------------- reporting
    def describe(self, skipped: bool = True) -> str:
        """A human-readable summary of the mix (and of the skipped records)."""
        return describe_mix(self.summary, self.skipped if skipped else None)

    def _report(self) -> None:
        """Log the summary (python logger) and, once per Trainer, to the Trainer's loggers."""
        trainer = self.trainer
        key = id(trainer) if trainer is not None else None
        if key in self._reported_to:
            return
        self._reported_to.add(key)
        log.info("data: %s", self.describe(skipped=False))
        if self.skipped:
            log.warning("data: %s", self.skipped.describe())
        for logger in getattr(trainer, "loggers", None) or []:
            logger.log_hyperparams({"data_summary": self.summary})
            experiment = getattr(logger, "experiment", None)
            if callable(getattr(experiment, "add_text", None)):  # TensorBoard: a readable text panel
                experiment.add_text("data/summary", "```\n" + self.describe() + "\n```")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the skips a streaming batch carries (they were found in a worker process)."""
        if isinstance(batch, dict) and "skipped" in batch:
            for key in batch.pop("skipped"):
                where, reason, partial = parse_skip_key(key)
                if self.skipped.add(where, reason, partial):
                    log.warning("data: skipping %s from %s (counted; summary at the end)",
                                "answers" if partial else "records", f"{where}: {reason}")
            self._stream_skips_seen = True
            if self.summary:
                self.summary["skipped"] = self.skipped.to_dict()
                self.summary["skipped_records"] = self.skipped.total
        return batch

    def teardown(self, stage: str) -> None:
        if self._stream_skips_seen:
            log.warning("data (%s): %s", stage, self.skipped.describe())
            self._stream_skips_seen = False

    def state_dict(self) -> dict:
        """Saved in checkpoints: the data summary (export reads it as the training data summary)."""
        return {"summary": self.summary} if self.summary else {}

    def load_state_dict(self, state_dict: dict) -> None:
        # A summary built by this run's setup describes the data actually used; keep it.
        if not self.summary and "summary" in state_dict:
            self.summary = state_dict["summary"]

    # ----------------------------------------------------------- dataloaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def collator(self) -> DiffusionCollator:
        """The batch collator of this data module's ``batching``."""
        return DiffusionCollator(self.resolve_template().pad_id, self.canvas, seed=self.seed,
                                 pad_to_multiple_of=self.pad_to_multiple_of, pack=self.batching == "packed",
                                 pack_length=self.pack_length,
                                 max_width=max(self.max_length, self.pack_length or 0))

    def _trained_batches(self) -> int:
        """Training batches the fit loop has completed in the current epoch (what a checkpoint covers)."""
        loop = getattr(getattr(self.trainer, "fit_loop", None), "epoch_loop", None)
        return int(loop.batch_progress.current.processed) if loop is not None else 0

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        rank, world = self._rank_world()
        return map_loader(dataset, batch_size, shuffle=shuffle, rank=rank, world=world, canvas=self.canvas,
                          collator=self.collator(), stratify=self.stratify, seed=self.seed,
                          group_batches=self.group_batches, num_workers=self.num_workers,
                          progress=self._trained_batches)

    def train_dataloader(self) -> DataLoader:
        self._ready()
        if self.train_stream is None:
            return self._loader(self.train_dataset, self.batch_size, shuffle=True)
        rank, world = self._rank_world()
        return stream_loader(self.train_stream, self.batch_size, rank=rank, world=world,
                             total_samples=self.total_samples, seed=self.seed,
                             shuffle_buffer=self.shuffle_buffer, collator=self.collator(),
                             num_workers=self.num_workers)

    def val_dataloader(self):
        self._ready()
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.val_batch_size, shuffle=False)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Batches of the fixed validation prompts (for ``diffusion-lm predict``)."""
        convs = [p.conversation() for p in self.validation_prompts]
        return DataLoader(convs, batch_size=self.val_batch_size, collate_fn=list)
