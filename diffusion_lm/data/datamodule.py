"""DialogDataModule: sources -> conversations -> (prompt ids, answer ids) -> mix-stratified, packed batches."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader

from ..errors import ConfigError
from .batching import DialogBatchSampler, KeyedExamples, ResumableLoader
from .collate import CanvasPolicy, DiffusionCollator
from .conversation import Conversation, Turn
from .examples import ExampleBuilder, example_features, parse_skip_key
from .mixing import StoppingStrategy, apportion, mix_size, source_indices
from .sources import DataSource, load_raw
from .streaming import StreamingExamples, rank_stream, tokenised_stream
from .template import ChatTemplate

__all__ = ["DialogDataModule", "ValidationPrompt", "DEFAULT_VALIDATION_PROMPTS", "SkipSummary"]

log = logging.getLogger(__name__)

# Columns only the skip accounting needs; they are dropped once counted.
_ACCOUNTING = ["reason", "partial"]


@dataclass
class ValidationPrompt:
    """A fixed prompt the sampling callback answers at every validation.

    Args:
        text: the user message.
        language: ISO code (samples and their metrics are grouped by it).
        system: optional system message before it.
    """

    text: str
    language: str = "en"
    system: Optional[str] = None

    def conversation(self) -> Conversation:
        """The prompt as a conversation (what ``MaskedDiffusionLM.prompt_ids`` takes)."""
        turns = ([Turn("system", self.system)] if self.system else []) + [Turn("user", self.text)]
        return Conversation(turns, source="validation_prompts", language=self.language)


DEFAULT_VALIDATION_PROMPTS = [
    ValidationPrompt("Hello, how are you?", "en"),
    ValidationPrompt("What is your favorite book?", "en"),
    ValidationPrompt("Tell me about computers.", "en"),
    ValidationPrompt("Привет! Как дела?", "ru"),
    ValidationPrompt("Что ты любишь есть?", "ru"),
    ValidationPrompt("Расскажи мне о деньгах.", "ru"),
]


class SkipSummary:
    """What the pipeline did not use, counted per ``(source/split, reason)``.

    ``records`` counts records that gave no example at all; ``turns`` counts answers dropped from
    records that still gave other examples (``train_turns: all``). Reasons are the keys of
    :data:`~diffusion_lm.data.conversation.SKIP_REASONS`. (A plain class holding two counters, so it
    pickles into DDP spawn processes and DataLoader workers.)
    """

    def __init__(self) -> None:
        self.records: Counter = Counter()
        self.turns: Counter = Counter()

    def add(self, where: str, reason: str, partial: bool = False, n: int = 1) -> bool:
        """Count ``n`` skips; returns True if this ``(where, reason)`` was not seen before."""
        counter = self.turns if partial else self.records
        new = (where, reason) not in counter
        counter[(where, reason)] += n
        return new

    def count(self, reason: Optional[str] = None, where: Optional[str] = None, partial: bool = False) -> int:
        """Skips matching ``reason`` and/or ``where`` (``source/split``, or a source label for both splits)."""
        counter = self.turns if partial else self.records
        return sum(
            n for (w, r), n in counter.items()
            if (reason is None or r == reason) and (where is None or w == where or w.rsplit("/", 1)[0] == where)
        )

    @property
    def total(self) -> int:
        """Total skipped records."""
        return sum(self.records.values())

    def __bool__(self) -> bool:
        return bool(self.records or self.turns)

    def to_dict(self) -> dict:
        """``{"records": {where: {reason: n}}, "turns": {...}}`` (JSON-friendly)."""
        out: dict = {"records": {}, "turns": {}}
        for name, counter in (("records", self.records), ("turns", self.turns)):
            for (where, reason), n in sorted(counter.items()):
                out[name].setdefault(where, {})[reason] = n
        return out

    def describe(self) -> str:
        """Readable per-source, per-reason counts."""
        if not self:
            return "no records skipped"
        lines = [f"{self.total} record(s) skipped:"]
        lines += [f"  {where}: {reason} x{n}" for (where, reason), n in sorted(self.records.items())]
        if self.turns:
            lines.append(f"{sum(self.turns.values())} answer turn(s) dropped from records that gave other examples:")
            lines += [f"  {where}: {reason} x{n}" for (where, reason), n in sorted(self.turns.items())]
        return "\n".join(lines)


def _check_counts(**options: Optional[int]) -> None:
    """One-line errors for counts out of range (before any data is read); None means "default"."""
    minimum = {"num_workers": 0, "max_length": 2}
    for name, value in options.items():
        low = minimum.get(name, 1)
        if value is not None and value < low:
            raise ConfigError(f"data.{name} must be >= {low}, got {value}")


def _column(dataset, name: str):
    """One column as a pyarrow array, in the dataset's row order.

    ``dataset[name]`` is a lazy Column that iterates row by row (~25 s per million rows), and on a
    dataset with an indices mapping (the mix is a ``select`` of its sources) ``datasets`` gathers the
    rows one slice at a time (7 s and +440 MiB for one integer column of the 750k mix,
    docs/BENCHMARKS.md). So the column is taken from the backing Arrow table with the mapping in one
    ``take``. The mapping is ``Dataset._indices`` (a one-column table of row numbers, not a public
    attribute): a ``datasets`` release without it takes the slow path, with the same result.
    """
    column = dataset.data.column(name)
    indices = getattr(dataset, "_indices", False)
    if indices is None:  # no mapping: the backing table is the dataset
        return column
    if indices is not False and indices.num_columns == 1 and indices.num_rows == len(dataset):
        return column.take(indices.column(0))
    return dataset.with_format("arrow")[name]


def pa_value_counts(reasons, partial) -> Counter:
    """``{(reason, partial): count}`` of two aligned Arrow arrays (the skip rows of a split)."""
    import pyarrow as pa

    table = pa.table({"reason": reasons, "partial": partial}).group_by(["reason", "partial"]).aggregate(
        [("reason", "count")])
    return Counter({(r, bool(p)): int(n) for r, p, n in zip(table["reason"].to_pylist(), table["partial"].to_pylist(),
                                                             table["reason_count"].to_pylist())})


def _hash(*parts: Any) -> str:
    """A ``datasets`` fingerprint from strings/ints (valid characters, fixed length)."""
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:32]


class DialogDataModule(pl.LightningDataModule):
    """Builds the bilingual training mix and its batches.

    Args:
        sources: the datasets of the mix (see :class:`DataSource`).
        tokenizer: a tokenizer folder or hub id; default: the model's own (the chat template is
            taken from the LightningModule so training and sampling share one code path).
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
        pack_length: row capacity in tokens for ``packed`` batching (default ``max_length``).
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
        if not sources:
            raise ConfigError("data.sources is empty: give at least one source (path, format, language)")
        _check_counts(batch_size=batch_size, val_batch_size=val_batch_size, max_length=max_length,
                      num_workers=num_workers, num_proc=num_proc, group_batches=group_batches,
                      shuffle_buffer=shuffle_buffer, pad_to_multiple_of=pad_to_multiple_of, pack_length=pack_length)
        self.sources = [s if isinstance(s, DataSource) else DataSource(**s) for s in sources]
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"data.sources have duplicate labels {labels}; give them distinct `name`s")
        self.tokenizer_path = tokenizer
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.max_length = max_length
        self.canvas = canvas if isinstance(canvas, CanvasPolicy) else CanvasPolicy(**canvas)
        if self.canvas.length >= max_length:
            raise ConfigError(
                f"data.canvas.length ({self.canvas.length}) must be smaller than data.max_length ({max_length}): "
                "prompts get max_length - canvas.length tokens"
            )
        if train_turns not in ("last", "all"):
            raise ConfigError(f"data.train_turns must be 'last' or 'all', got {train_turns!r}")
        if total_samples is not None and total_samples <= 0:
            raise ConfigError(f"data.total_samples must be > 0, got {total_samples}")
        self.train_turns = train_turns
        self.total_samples = total_samples
        self.strict = strict
        self.seed = seed
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.validation_prompts = validation_prompts if validation_prompts is not None else list(DEFAULT_VALIDATION_PROMPTS)
        if batching not in ("packed", "padded", "grouped"):
            raise ConfigError(f"data.batching must be packed, padded or grouped, got {batching!r}")
        if group_batches is not None and batching != "grouped":
            raise ConfigError(f"data.group_batches applies to data.batching: grouped only (batching is {batching!r})")
        if pack_length is not None and batching != "packed":
            raise ConfigError(f"data.pack_length applies to data.batching: packed only (batching is {batching!r})")
        if pack_length is not None and pack_length < max_length:
            raise ConfigError(f"data.pack_length ({pack_length}) must be >= data.max_length ({max_length}): "
                              "every example must fit in a row")
        self.batching = batching
        self.stratify = stratify
        self.pack_length = pack_length
        self.group_batches = group_batches if group_batches is not None else (64 if batching == "grouped" else 1)
        self.stopping_strategy = stopping_strategy
        self.shuffle_buffer = shuffle_buffer
        self.cache_dir = cache_dir
        self.pad_to_multiple_of = pad_to_multiple_of
        self.template: Optional[ChatTemplate] = None
        self.skipped = SkipSummary()
        self.train_dataset = None  # map-style mix (datasets.Dataset)
        self.train_stream = None  # streaming mix (datasets.IterableDataset), before rank sharding
        self.val_dataset = None
        self.summary: dict = {}
        self._reported_to: set[int] = set()
        self._stream_skips_seen = False

    # ----------------------------------------------------------------- template
    def resolve_template(self) -> ChatTemplate:
        """The chat template: the LightningModule's when attached to a Trainer, else from ``tokenizer``."""
        if self.template is not None:
            return self.template
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        model_template = getattr(module, "template", None)
        if self.tokenizer_path is not None:
            from ..backbone import load_tokenizer

            self.template = ChatTemplate(load_tokenizer(self.tokenizer_path))
            if model_template is not None and len(self.template.tokenizer) != len(model_template.tokenizer):
                raise ConfigError(
                    f"data.tokenizer={self.tokenizer_path!r} has {len(self.template.tokenizer)} tokens but the model's "
                    f"tokenizer has {len(model_template.tokenizer)}; leave data.tokenizer unset to use the model's."
                )
        elif model_template is not None:
            self.template = model_template
        else:
            raise ConfigError("DialogDataModule needs a tokenizer: set data.tokenizer or attach it to a MaskedDiffusionLM")
        return self.template

    def _check_model_length(self) -> None:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        limit = getattr(module, "max_length", None)
        if isinstance(limit, int) and self.max_length > limit:
            raise ConfigError(
                f"data.max_length={self.max_length} exceeds the backbone's {limit} positions; lower data.max_length"
            )

    # ------------------------------------------------------------ preprocessing
    def _builder(self, source: DataSource, split: str, **kwargs) -> ExampleBuilder:
        return ExampleBuilder(
            self.resolve_template(), source, self.canvas, self.max_length, self.train_turns, self.strict, split, **kwargs
        )

    def _count_and_keep(self, processed, where: str, fingerprint: str):
        """Count the skip rows of a processed split by reason, and return the examples only."""
        import pyarrow.compute as pc

        # Counted in Arrow: Python lists of a 750k-row column cost ~60 bytes a row and seconds.
        reasons = _column(processed, "reason")
        skipped = pc.not_equal(reasons, "")
        if pc.any(skipped).as_py():
            partial = _column(processed, "partial").filter(skipped)
            counts = pa_value_counts(reasons.filter(skipped), partial)
            for (reason, part), n in counts.items():
                self.skipped.add(where, reason, part, n=n)
            keep = np.flatnonzero(~skipped.to_numpy(zero_copy_only=False))
            processed = processed.select(keep, new_fingerprint=_hash(fingerprint, "kept"))
        return processed.remove_columns(_ACCOUNTING)

    def _process(self, raw, source: DataSource, split: str, record_indices=None):
        """Raw records of one split -> examples; tokenisation is cached by ``datasets`` (file-backed data)."""
        builder = self._builder(source, split, record_indices=record_indices)
        fingerprint = _hash(raw._fingerprint, builder.cache_key())
        num_proc = self.num_proc if self.num_proc and self.num_proc > 1 and len(raw) >= self.num_proc else None
        processed = raw.map(
            builder,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            features=example_features(),
            num_proc=num_proc,
            new_fingerprint=fingerprint,
            desc=f"tokenising {source.label} ({split})",
        )
        return self._count_and_keep(processed, builder.where, fingerprint)

    def _setup_map_source(self, raw, source: DataSource):
        n = len(raw)
        if n == 0:
            raise ConfigError(f"data source {source.label!r} ({source.path}) has no records")
        n_val = source.num_val(n)
        raw_train, raw_val, train_idx, val_idx = raw, None, None, None
        if n_val:
            # A fixed-seed held-out set per source; sorted indices keep reads in file order.
            perm = np.random.default_rng(self.seed).permutation(n)
            val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
            raw_train = raw.select(train_idx, new_fingerprint=_hash(raw._fingerprint, "train", self.seed, n_val))
            raw_val = raw.select(val_idx, new_fingerprint=_hash(raw._fingerprint, "validation", self.seed, n_val))
        train = self._process(raw_train, source, "train", train_idx)
        val = self._process(raw_val, source, "validation", val_idx) if raw_val is not None else None
        return train, val

    def _setup_stream_source(self, raw, source: DataSource):
        import datasets

        n_val = source.num_val(2**62)  # a count (fractions are refused for streaming sources)
        val = None
        if n_val:
            records = list(raw.take(n_val))  # the first n_val records: a fixed set, no seed needed
            builder = self._builder(source, "validation")
            out = builder.run(records, range(len(records)))
            processed = datasets.Dataset.from_dict(out, features=example_features())
            val = self._count_and_keep(processed, builder.where, _hash(source.label, "stream-validation"))
        builder = self._builder(source, "train", stream=True, packed=True, index_offset=n_val)
        columns = [c for c in example_features() if c not in _ACCOUNTING]
        train = tokenised_stream(raw, builder, n_val).select_columns(columns)
        # Read up to the first usable example now: a source that yields none would otherwise make
        # the endless, interleaved training stream spin without producing a batch.
        first = next(iter(train.take(1)), None)
        seen = builder.take_pending()  # the real iteration meets and counts these again
        if first is None:
            for key in seen:
                self.skipped.add(*parse_skip_key(key))
            raise ConfigError(
                f"streaming data source {source.label!r}: no record after the first {n_val} gave a training "
                f"example\n{self.skipped.describe()}"
            )
        return train, val

    def setup(self, stage: Optional[str] = None) -> None:
        """Load, split, tokenise and mix every source (once), then report what was kept and skipped."""
        if self.train_dataset is None and self.train_stream is None:
            self._build()
        if stage in (None, "fit") and self.train_stream is not None and self.total_samples is None:
            max_steps = getattr(self.trainer, "max_steps", None) if self.trainer is not None else None
            if max_steps == -1:
                raise ConfigError(
                    "a streaming training mix has no end: set data.total_samples (examples per epoch) or trainer.max_steps"
                )
        self._report()

    def _build(self) -> None:
        import datasets

        self.resolve_template()
        self._check_model_length()
        trains, vals, info = [], [], []
        for source in self.sources:
            raw = load_raw(source, cache_dir=self.cache_dir, strict=self.strict,
                           on_skip=lambda reason, n, label=source.label: self.skipped.add(f"{label}/train", reason, n=n))
            if source.streaming:
                train, val = self._setup_stream_source(raw, source)
            else:
                train, val = self._setup_map_source(raw, source)
                if len(train) == 0:
                    raise ConfigError(
                        f"data source {source.label!r}: every training record was skipped\n{self.skipped.describe()}"
                    )
            trains.append(train)
            if val is not None and len(val):
                vals.append(val)
            info.append({"name": source.label, "path": source.path, "format": source.format,
                         "language": source.language, "weight": source.weight, "streaming": source.streaming,
                         "validation_examples": len(val) if val is not None else 0})

        weights = [s.weight for s in self.sources]
        if any(s.streaming for s in self.sources):
            streams = [t if s.streaming else t.to_iterable_dataset() for s, t in zip(self.sources, trains)]
            total = sum(weights)
            self.train_stream = streams[0] if len(streams) == 1 else datasets.interleave_datasets(
                streams, probabilities=[w / total for w in weights], seed=self.seed,
                stopping_strategy=self.stopping_strategy,
            )
            counts = [None] * len(trains)
        else:
            size = mix_size([len(t) for t in trains], weights, self.stopping_strategy, self.total_samples)
            counts = apportion(size, weights)
            picks, offset = [], 0
            for i, (train, count) in enumerate(zip(trains, counts)):
                picks.append(source_indices(len(train), count, self.seed + i) + offset)
                offset += len(train)
            combined = trains[0] if len(trains) == 1 else datasets.concatenate_datasets(trains)
            self.train_dataset = combined.select(
                np.concatenate(picks),
                new_fingerprint=_hash(*(t._fingerprint for t in trains), *counts, self.seed, "mix"),
            )
        for entry, train, count in zip(info, trains, counts):
            entry["train_examples"] = count
            entry["available_examples"] = len(train) if count is not None else None
        self.val_dataset = (vals[0] if len(vals) == 1 else datasets.concatenate_datasets(vals)) if vals else None
        self.summary = self._summary(info)

    # ----------------------------------------------------------------- reporting
    def _summary(self, info: list[dict]) -> dict:
        streaming = self.train_stream is not None
        per_language: Counter = Counter()
        per_source: dict[str, Any] = {}
        for entry in info:
            per_source[entry["name"]] = entry["train_examples"]
            if entry["train_examples"] is not None:
                per_language[entry["language"]] += entry["train_examples"]
        return {
            "sources": info,
            "streaming": streaming,
            "train_examples": self.total_samples if streaming else len(self.train_dataset),
            "validation_examples": len(self.val_dataset) if self.val_dataset is not None else 0,
            "per_language": dict(per_language),
            "per_source": per_source,
            "skipped": self.skipped.to_dict(),
            "skipped_records": self.skipped.total,
            "max_length": self.max_length,
            "canvas": asdict(self.canvas),
            "train_turns": self.train_turns,
            "total_samples": self.total_samples,
            "stopping_strategy": self.stopping_strategy,
            "seed": self.seed,
        }

    def describe(self, skipped: bool = True) -> str:
        """A human-readable summary of the mix (and of the skipped records)."""
        s = self.summary
        lines = [f"training mix: {s['train_examples'] if s['train_examples'] is not None else 'endless stream'} examples"
                 f" ({'streaming' if s['streaming'] else 'map-style'}), {s['validation_examples']} validation examples"]
        for entry in s["sources"]:
            share = entry["train_examples"] if entry["train_examples"] is not None else f"weight {entry['weight']}"
            lines.append(f"  {entry['name']} [{entry['language']}]: {share} train, {entry['validation_examples']} validation")
        if skipped:
            lines.append(self.skipped.describe())
        return "\n".join(lines)

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
        pack = (self.pack_length or self.max_length) if self.batching == "packed" else None
        return DiffusionCollator(self.resolve_template().pad_id, self.canvas, seed=self.seed,
                                 pad_to_multiple_of=self.pad_to_multiple_of, pack_length=pack,
                                 max_width=max(self.max_length, pack or 0))

    def row_lengths(self, dataset) -> np.ndarray:
        """Width of each example once collated (prompt + answer region), for length sorting."""
        prompt = _column(dataset, "prompt_length").to_numpy().astype(np.int64)
        answer = _column(dataset, "answer_length").to_numpy().astype(np.int64)
        region = answer if self.canvas.mode == "none" else np.maximum(answer, self.canvas.length)
        return prompt + region

    def _strata(self, dataset) -> Optional[np.ndarray]:
        """The source of each example as an int (the strata of a stratified batch order)."""
        if not self.stratify:
            return None
        return np.asarray(_column(dataset, "source").combine_chunks().dictionary_encode().indices)

    def _trained_batches(self) -> int:
        """Training batches the fit loop has completed in the current epoch (what a checkpoint covers)."""
        loop = getattr(getattr(self.trainer, "fit_loop", None), "epoch_loop", None)
        return int(loop.batch_progress.current.processed) if loop is not None else 0

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        rank, world = self._rank_world()
        if shuffle and len(dataset) < batch_size * world:
            raise ConfigError(
                f"the training mix has {len(dataset)} examples, fewer than one global batch "
                f"({batch_size} x {world} ranks); lower data.batch_size or add data"
            )
        sampler = DialogBatchSampler(
            self.row_lengths(dataset),
            batch_size,
            strata=self._strata(dataset) if shuffle else None,
            rank=rank,
            world_size=world,
            shuffle=shuffle,
            drop_last=shuffle,
            seed=self.seed,
            group_batches=self.group_batches if shuffle else 1,
        )
        kwargs = dict(batch_sampler=sampler, collate_fn=self.collator(), num_workers=self.num_workers,
                      persistent_workers=self.num_workers > 0)
        if shuffle:
            return ResumableLoader(KeyedExamples(dataset.with_format(None)), progress=self._trained_batches, **kwargs)
        return DataLoader(KeyedExamples(dataset.with_format(None)), **kwargs)

    def train_dataloader(self) -> DataLoader:
        if self.train_stream is None:
            return self._loader(self.train_dataset, self.batch_size, shuffle=True)
        rank, world = self._rank_world()
        per_rank = self.total_samples // world if self.total_samples is not None else None
        if per_rank is not None and per_rank < self.batch_size:
            raise ConfigError(f"data.total_samples={self.total_samples} gives {per_rank} examples per rank, "
                              f"fewer than one batch of {self.batch_size}")
        stream = rank_stream(self.train_stream, rank=rank, world_size=world, per_rank=per_rank,
                             seed=self.seed, buffer_size=self.shuffle_buffer)
        return DataLoader(
            StreamingExamples(stream, per_rank),
            batch_size=self.batch_size,
            drop_last=True,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self):
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.val_batch_size, shuffle=False)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Batches of the fixed validation prompts (for ``diffusion-lm predict``)."""
        convs = [p.conversation() for p in self.validation_prompts]
        return DataLoader(convs, batch_size=self.val_batch_size, collate_fn=list)
