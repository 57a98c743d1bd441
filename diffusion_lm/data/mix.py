"""The training mix: sources -> tokenised examples -> one weighted mix and a validation set.

:func:`build_mix` does the whole job without a Trainer (the data module calls it from ``setup``):
every source is read (:func:`~diffusion_lm.data.sources.load_raw`), split into train and validation
records, turned into examples by :class:`~diffusion_lm.data.examples.ExampleBuilder` (cached by
``datasets``; what is dropped is counted in a :class:`~diffusion_lm.data.skips.SkipSummary`), and
mixed by weight.

Map-style sources are mixed with exact proportions. ``datasets.interleave_datasets`` draws the
source of every example at random, so its proportions are only right on average and its size
follows from the stopping rule. For sources held on disk we know every size up front, so the mix is
planned instead: the number of examples per source is apportioned exactly from the weights, and
each source contributes whole seeded permutations of its examples (repeating a small source as
often as needed, never sampling one example twice before every other has been used). Streaming
sources use ``interleave_datasets`` (:mod:`~diffusion_lm.data.streaming`).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..chat import ChatTemplate
from ..errors import ConfigError
from .collate import CanvasPolicy
from .examples import ExampleBuilder, example_features, parse_skip_key
from .skips import SkipSummary
from .sources import DataSource, load_raw
from .streaming import tokenised_stream

__all__ = ["Mix", "MixSettings", "StoppingStrategy", "apportion", "build_mix", "describe_mix", "mix_size",
           "source_indices"]

StoppingStrategy = Literal["all_exhausted", "first_exhausted"]


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integer counts proportional to ``weights`` (largest remainder; sums to
    ``total``)."""
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or (w <= 0).any():
        raise ValueError(f"weights must be positive, got {list(weights)}")
    quotas = total * w / w.sum()
    counts = np.floor(quotas).astype(np.int64)
    remainder = total - int(counts.sum())
    # Ties go to the earlier source, so the split is deterministic.
    order = sorted(range(len(w)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:remainder]:
        counts[i] += 1
    return counts.tolist()


def mix_size(
    sizes: Sequence[int],
    weights: Sequence[float],
    strategy: StoppingStrategy = "all_exhausted",
    total: Optional[int] = None,
) -> int:
    """Examples in the mix: ``total`` if given, else the size at which the stopping rule is met.

    ``all_exhausted``: the smallest mix in which every example of every source appears at least once
    (sources with more weight than data are repeated). ``first_exhausted``: the largest mix in which
    no example appears twice (sources with more data than weight are subsampled).
    """
    if total is not None:
        return int(total)
    w = np.asarray(weights, dtype=np.float64)
    p = w / w.sum()
    ratios = [n / pi for n, pi in zip(sizes, p)]
    if strategy == "all_exhausted":
        return int(math.ceil(max(ratios) - 1e-9))
    return int(math.floor(min(ratios) + 1e-9))


def source_indices(size: int, count: int, seed: int) -> np.ndarray:
    """``count`` indices into a source of ``size`` examples: whole seeded permutations, then part of one."""
    if size <= 0:
        raise ValueError("a source in the mix has no examples")
    rng = np.random.default_rng(seed)
    full, rest = divmod(count, size)
    parts = [rng.permutation(size) for _ in range(full)]
    if rest:
        parts.append(rng.permutation(size)[:rest])
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------------------------ building the mix
# Columns only the skip accounting needs; they are dropped once counted.
_ACCOUNTING = ["reason", "partial"]


def column(dataset, name: str):
    """One column as a pyarrow array, in the dataset's row order.

    ``dataset[name]`` is a lazy Column that iterates row by row (~25 s per million rows), and on a
    dataset with an indices mapping (the mix is a ``select`` of its sources) ``datasets`` gathers the
    rows one slice at a time (7 s and +440 MiB for one integer column of the 750k mix,
    docs/BENCHMARKS.md). So the column is taken from the backing Arrow table with the mapping in one
    ``take``. The mapping is ``Dataset._indices`` (a one-column table of row numbers, not a public
    attribute): a ``datasets`` release without it takes the slow path, with the same result.
    """
    table_column = dataset.data.column(name)
    indices = getattr(dataset, "_indices", False)
    if indices is None:  # no mapping: the backing table is the dataset
        return table_column
    if indices is not False and indices.num_columns == 1 and indices.num_rows == len(dataset):
        return table_column.take(indices.column(0))
    return dataset.with_format("arrow")[name]


def value_counts(reasons, partial) -> Counter:
    """``{(reason, partial): count}`` of two aligned Arrow arrays (the skip rows of a split)."""
    table = pa.table({"reason": reasons, "partial": partial}).group_by(["reason", "partial"]).aggregate(
        [("reason", "count")])
    return Counter({(r, bool(p)): int(n) for r, p, n in zip(table["reason"].to_pylist(),
                                                             table["partial"].to_pylist(),
                                                             table["reason_count"].to_pylist())})


def _hash(*parts: Any) -> str:
    """A ``datasets`` fingerprint from strings/ints (valid characters, fixed length)."""
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:32]


@dataclass
class MixSettings:
    """How examples are made and mixed (the ``data.*`` options of :class:`DialogDataModule` that
    decide the data, not the batches)."""

    canvas: CanvasPolicy = field(default_factory=CanvasPolicy)
    max_length: int = 512
    train_turns: str = "last"
    strict: bool = False
    seed: int = 0
    total_samples: Optional[int] = None
    stopping_strategy: StoppingStrategy = "all_exhausted"
    num_proc: Optional[int] = None
    cache_dir: Optional[str] = None


@dataclass
class Mix:
    """A built mix: ``train_dataset`` (map-style) or ``train_stream`` (streaming, before rank
    sharding), the validation examples of every source (or None) and the data ``summary``."""

    train_dataset: Any
    train_stream: Any
    val_dataset: Any
    summary: dict


class _SourceBuilder:
    """Raw records of one source -> (train, validation) examples, counting skips."""

    def __init__(self, template: ChatTemplate, settings: MixSettings, skipped: SkipSummary) -> None:
        self.template = template
        self.settings = settings
        self.skipped = skipped

    def examples(self, source: DataSource, split: str, **kwargs: Any) -> ExampleBuilder:
        st = self.settings
        return ExampleBuilder(self.template, source, st.canvas, st.max_length, st.train_turns, st.strict,
                              split, **kwargs)

    def count_and_keep(self, processed, where: str, fingerprint: str):
        """Count the skip rows of a processed split by reason, and return the examples only."""
        # Counted in Arrow: Python lists of a 750k-row column cost ~60 bytes a row and seconds.
        reasons = column(processed, "reason")
        skipped = pc.not_equal(reasons, "")
        if pc.any(skipped).as_py():
            partial = column(processed, "partial").filter(skipped)
            for (reason, part), n in value_counts(reasons.filter(skipped), partial).items():
                self.skipped.add(where, reason, part, n=n)
            keep = np.flatnonzero(~skipped.to_numpy(zero_copy_only=False))
            processed = processed.select(keep, new_fingerprint=_hash(fingerprint, "kept"))
        return processed.remove_columns(_ACCOUNTING)

    def process(self, raw, source: DataSource, split: str, record_indices=None):
        """Raw records of one split -> examples; tokenisation is cached by ``datasets`` (file-backed data)."""
        builder = self.examples(source, split, record_indices=record_indices)
        fingerprint = _hash(raw._fingerprint, builder.cache_key())
        num_proc = self.settings.num_proc
        num_proc = num_proc if num_proc and num_proc > 1 and len(raw) >= num_proc else None
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
        return self.count_and_keep(processed, builder.where, fingerprint)

    def map_source(self, raw, source: DataSource):
        n = len(raw)
        if n == 0:
            raise ConfigError(f"data source {source.label!r} ({source.path}) has no records")
        n_val, seed = source.num_val(n), self.settings.seed
        raw_train, raw_val, train_idx, val_idx = raw, None, None, None
        if n_val:
            # A fixed-seed held-out set per source; sorted indices keep reads in file order.
            perm = np.random.default_rng(seed).permutation(n)
            val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
            raw_train = raw.select(train_idx, new_fingerprint=_hash(raw._fingerprint, "train", seed, n_val))
            raw_val = raw.select(val_idx, new_fingerprint=_hash(raw._fingerprint, "validation", seed, n_val))
        train = self.process(raw_train, source, "train", train_idx)
        val = self.process(raw_val, source, "validation", val_idx) if raw_val is not None else None
        if len(train) == 0:
            raise ConfigError(
                f"data source {source.label!r}: every training record was skipped\n{self.skipped.describe()}"
            )
        return train, val

    def _stream_validation(self, raw, source: DataSource, n_val: int):
        import datasets

        records = list(raw.take(n_val))  # the first n_val records: a fixed set, no seed needed
        builder = self.examples(source, "validation")
        out = builder.run(records, range(len(records)))
        processed = datasets.Dataset.from_dict(out, features=example_features())
        return self.count_and_keep(processed, builder.where, _hash(source.label, "stream-validation"))

    def stream_source(self, raw, source: DataSource):
        n_val = source.num_val(2**62)  # a count (fractions are refused for streaming sources)
        val = self._stream_validation(raw, source, n_val) if n_val else None
        builder = self.examples(source, "train", stream=True, packed=True, index_offset=n_val)
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


def _source_info(source: DataSource, val) -> dict:
    return {"name": source.label, "path": source.path, "format": source.format, "language": source.language,
            "weight": source.weight, "streaming": source.streaming,
            "validation_examples": len(val) if val is not None else 0}


def _combine(sources: Sequence[DataSource], trains: list, settings: MixSettings):
    """``(train_dataset, train_stream, examples taken per source)``: the weighted mix of the sources."""
    import datasets

    weights = [s.weight for s in sources]
    if any(s.streaming for s in sources):
        streams = [t if s.streaming else t.to_iterable_dataset() for s, t in zip(sources, trains)]
        total = sum(weights)
        stream = streams[0] if len(streams) == 1 else datasets.interleave_datasets(
            streams, probabilities=[w / total for w in weights], seed=settings.seed,
            stopping_strategy=settings.stopping_strategy,
        )
        return None, stream, [None] * len(trains)
    size = mix_size([len(t) for t in trains], weights, settings.stopping_strategy, settings.total_samples)
    counts = apportion(size, weights)
    picks, offset = [], 0
    for i, (train, count) in enumerate(zip(trains, counts)):
        picks.append(source_indices(len(train), count, settings.seed + i) + offset)
        offset += len(train)
    combined = trains[0] if len(trains) == 1 else datasets.concatenate_datasets(trains)
    dataset = combined.select(
        np.concatenate(picks),
        new_fingerprint=_hash(*(t._fingerprint for t in trains), *counts, settings.seed, "mix"),
    )
    return dataset, None, counts


def _summary(info: list[dict], mix: Mix, settings: MixSettings, skipped: SkipSummary) -> dict:
    streaming = mix.train_stream is not None
    per_language: Counter = Counter()
    per_source: dict[str, Any] = {}
    for entry in info:
        per_source[entry["name"]] = entry["train_examples"]
        if entry["train_examples"] is not None:
            per_language[entry["language"]] += entry["train_examples"]
    return {
        "sources": info,
        "streaming": streaming,
        "train_examples": settings.total_samples if streaming else len(mix.train_dataset),
        "validation_examples": len(mix.val_dataset) if mix.val_dataset is not None else 0,
        "per_language": dict(per_language),
        "per_source": per_source,
        "skipped": skipped.to_dict(),
        "skipped_records": skipped.total,
        "max_length": settings.max_length,
        "canvas": asdict(settings.canvas),
        "train_turns": settings.train_turns,
        "total_samples": settings.total_samples,
        "stopping_strategy": settings.stopping_strategy,
        "seed": settings.seed,
    }


def build_mix(sources: Sequence[DataSource], template: ChatTemplate, settings: MixSettings,
              skipped: Optional[SkipSummary] = None) -> Mix:
    """Load, split, tokenise and mix ``sources`` with ``template``; skips are counted in ``skipped``."""
    import datasets

    skipped = skipped if skipped is not None else SkipSummary()
    builder = _SourceBuilder(template, settings, skipped)
    trains, vals, info = [], [], []
    for source in sources:
        def on_skip(reason: str, n: int, label: str = source.label) -> None:
            skipped.add(f"{label}/train", reason, n=n)

        raw = load_raw(source, cache_dir=settings.cache_dir, strict=settings.strict, on_skip=on_skip)
        train, val = (builder.stream_source if source.streaming else builder.map_source)(raw, source)
        trains.append(train)
        if val is not None and len(val):
            vals.append(val)
        info.append(_source_info(source, val))
    train_dataset, train_stream, counts = _combine(sources, trains, settings)
    for entry, train, count in zip(info, trains, counts):
        entry["train_examples"] = count
        entry["available_examples"] = len(train) if count is not None else None
    val_dataset = (vals[0] if len(vals) == 1 else datasets.concatenate_datasets(vals)) if vals else None
    mix = Mix(train_dataset, train_stream, val_dataset, {})
    mix.summary = _summary(info, mix, settings, skipped)
    return mix


def describe_mix(summary: dict, skipped: Optional[SkipSummary] = None) -> str:
    """A human-readable summary of a mix (and of the skipped records, when given)."""
    s = summary
    size = s["train_examples"] if s["train_examples"] is not None else "endless stream"
    lines = [f"training mix: {size} examples ({'streaming' if s['streaming'] else 'map-style'}), "
             f"{s['validation_examples']} validation examples"]
    for entry in s["sources"]:
        share = entry["train_examples"]
        share = share if share is not None else f"weight {entry['weight']}"
        lines.append(f"  {entry['name']} [{entry['language']}]: {share} train, "
                     f"{entry['validation_examples']} validation")
    if skipped is not None:
        lines.append(skipped.describe())
    return "\n".join(lines)
