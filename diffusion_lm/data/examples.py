"""Raw records -> training examples: the (picklable) function ``datasets.map`` runs over every source.

One record gives one example per trained assistant turn (``train_turns``), or nothing. Whatever is
not used is reported, never dropped silently:

* a record that yields no example is a *skipped record* (one row with its ``reason``);
* with ``train_turns: all``, an answer dropped from a record that still yields others is a
  *dropped turn* (a row with ``reason`` and ``partial=True``).

In streaming mode rows cannot be counted up front, so a skip is carried as a key in the ``skipped``
list of the next example of the same source; the collator passes those keys up with the batch and
:class:`~diffusion_lm.data.DialogDataModule` counts them in the main process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Optional, Sequence

from ..chat import BadRecord, ChatTemplate
from .collate import CanvasPolicy
from .skips import BadRecordError
from .sources import DataSource, to_conversation

__all__ = ["ExampleBuilder", "PackRecord", "example_features", "skip_key", "parse_skip_key", "PACKED_COLUMN"]

log = logging.getLogger(__name__)

# Bump when the layout of the produced examples changes: it invalidates the tokenisation cache.
EXAMPLE_FORMAT_VERSION = 2  # 2: special-token spellings in text are plain text

PACKED_COLUMN = "__record"

OUTPUT_COLUMNS = (
    "prompt_ids", "answer_ids", "prompt_length", "answer_length", "language", "source",
    "truncated", "index", "turn", "reason", "partial", "skipped",
)


def example_features():
    """``datasets.Features`` of the rows :class:`ExampleBuilder` produces (fixed dtypes, no inference)."""
    import datasets

    seq = getattr(datasets, "List", None) or datasets.Sequence
    return datasets.Features({
        "prompt_ids": seq(datasets.Value("int32")),
        "answer_ids": seq(datasets.Value("int32")),
        "prompt_length": datasets.Value("int32"),
        "answer_length": datasets.Value("int32"),
        "language": datasets.Value("string"),
        "source": datasets.Value("string"),
        "truncated": datasets.Value("bool"),
        "index": datasets.Value("int64"),
        "turn": datasets.Value("int32"),
        "reason": datasets.Value("string"),
        "partial": datasets.Value("bool"),
        "skipped": seq(datasets.Value("string")),
    })


def skip_key(where: str, reason: str, partial: bool) -> str:
    """The counter key of one skip: ``source/split|reason`` (``|turn:reason`` for a dropped turn)."""
    return f"{where}|{'turn:' if partial else ''}{reason}"


def parse_skip_key(key: str) -> tuple[str, str, bool]:
    """Inverse of :func:`skip_key`: ``(where, reason, partial)``."""
    where, reason = key.rsplit("|", 1)
    partial = reason.startswith("turn:")
    return where, reason[len("turn:"):] if partial else reason, partial


class PackRecord:
    """Wraps a whole raw record into one column, so a stream whose columns are unknown up front can
    be reduced to exactly that column (``select_columns``) before the batched map changes row counts."""

    def __call__(self, record: dict) -> dict:
        return {PACKED_COLUMN: dict(record)}


def _snippet(record: dict, limit: int = 300) -> str:
    try:
        text = json.dumps(record, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(record)
    return text if len(text) <= limit else text[:limit] + "..."


class ExampleBuilder:
    """The batched ``datasets.map`` function for one source and split.

    A class instance, not a closure: it pickles to ``num_proc`` worker processes and DataLoader
    workers, and the tokenisation cache is keyed by :meth:`cache_key` (an explicit fingerprint),
    not by hashing a closure over a tokenizer (which ``datasets`` cannot always hash stably).

    Args:
        template: the chat template (the one code path shared with sampling).
        source: the data source the records come from.
        canvas: canvas policy (answer limit and overflow).
        max_length: longest prompt + canvas; prompts get at most ``max_length - canvas.length``.
        train_turns: ``last`` or ``all`` assistant turns.
        strict: raise :class:`BadRecordError` on the first record or answer that would be dropped.
        split: ``train`` or ``validation`` (for messages and counter keys).
        record_indices: original record index of each row position (after a validation split).
        index_offset: added to row positions (a stream that skipped its validation records).
        stream: carry skips to the next example instead of emitting skip rows.
        packed: records arrive packed in :data:`PACKED_COLUMN` (see :class:`PackRecord`).
    """

    def __init__(
        self,
        template: ChatTemplate,
        source: DataSource,
        canvas: CanvasPolicy,
        max_length: int,
        train_turns: str,
        strict: bool,
        split: str,
        *,
        record_indices: Optional[Sequence[int]] = None,
        index_offset: int = 0,
        stream: bool = False,
        packed: bool = False,
    ) -> None:
        self.template = template
        self.source = source
        self.canvas = canvas
        self.max_length = max_length
        self.max_prompt = max_length - canvas.length
        self.train_turns = train_turns
        self.strict = strict
        self.split = split
        self.label = source.label  # computed once: it checks the file system
        self.where = f"{self.label}/{split}"
        self.record_indices = record_indices
        self.index_offset = index_offset
        self.stream = stream
        self.packed = packed
        self._pending: list[str] = []
        self._warned_error = False

    def cache_key(self) -> str:
        """Everything that decides this builder's output (with the input's own fingerprint, the cache key)."""
        source = {k: v for k, v in dataclasses.asdict(self.source).items() if k not in ("weight",)}
        parts = {
            "version": EXAMPLE_FORMAT_VERSION,
            "template": self.template.fingerprint(),
            "source": source,
            "label": self.label,
            "canvas": dataclasses.asdict(self.canvas),
            "max_length": self.max_length,
            "train_turns": self.train_turns,
            "strict": self.strict,
            "split": self.split,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    # ------------------------------------------------------------------ records
    def _failed(self, err: Exception, index: int) -> list[tuple[str, str]]:
        """The drop of a record that raised something other than :class:`BadRecord`."""
        if self.strict:
            raise err
        if not self._warned_error:  # once per builder (per process): the counts carry the rest
            log.warning("data source %r: record %d could not be converted (%s: %s); counting such records "
                        "as adapter_error", self.label, index, type(err).__name__, err)
            self._warned_error = True
        return [("adapter_error", f"{type(err).__name__}: {err}")]

    def _adapt(self, record: dict, index: int):
        """(conversation, answer turns) of a record, or (None, drops)."""
        try:
            conv = to_conversation(record, self.source, index, label=self.label)
            return conv, conv.answer_indices(self.train_turns)
        except BadRecord as bad:
            return None, [(bad.reason, bad.detail)]
        except Exception as err:  # noqa: BLE001 - a run must not die mid-epoch on one odd record
            return None, self._failed(err, index)

    def _limit(self, targets: Sequence[int], pairs) -> tuple[list[dict], list[tuple[str, str]]]:
        """Apply the prompt limit and the canvas overflow policy to a record's (prompt, answer) pairs."""
        examples, drops = [], []
        for turn, (prompt, answer) in zip(targets, pairs):
            if len(prompt) > self.max_prompt:
                drops.append(("prompt_too_long", f"turn {turn}: {len(prompt)} > {self.max_prompt} tokens"))
                continue
            truncated = False
            if len(answer) > self.canvas.length:
                if self.canvas.overflow == "drop":
                    drops.append(("answer_too_long",
                                  f"turn {turn}: {len(answer)} > canvas {self.canvas.length}"))
                    continue
                answer, truncated = answer[: self.canvas.length], True  # cut: no end token
            examples.append({"prompt_ids": prompt, "answer_ids": answer, "truncated": truncated,
                             "turn": turn})
        return examples, drops

    def record_examples(self, record: dict, index: int) -> tuple[list[dict], list[tuple[str, str]]]:
        """(examples, drops) of one record; ``drops`` are ``(reason, detail)`` of unused answers/records."""
        return self._records_examples([record], [index])[0]

    def _records_examples(self, records: Sequence[dict], indices: Sequence[int]):
        """``record_examples`` for many records, tokenising all their turns in one tokenizer call."""
        adapted = [self._adapt(r, i) for r, i in zip(records, indices)]
        texts = [t.content for conv, targets in adapted if conv is not None
                 for t in conv.turns[: max(targets) + 1]]
        try:
            encoded = self.template.encode_texts(texts)
        except Exception:  # noqa: BLE001 - find the record at fault one by one below
            encoded = None
        results, at = [], 0
        for (conv, targets), index in zip(adapted, indices):
            if conv is None:
                results.append(([], targets))  # targets holds the drops
                continue
            n = max(targets) + 1
            try:
                contents = encoded[at : at + n] if encoded is not None else None
                results.append(self._limit(targets,
                                           self.template.examples(conv.turns, targets, encoded=contents)))
            except Exception as err:  # noqa: BLE001
                results.append(([], self._failed(err, index)))
            at += n
        return results

    def take_pending(self) -> list[str]:
        """Skip keys seen (streaming) since the last example, and forget them."""
        pending, self._pending = self._pending, []
        return pending

    def _index(self, position: int) -> int:
        if self.record_indices is not None:
            return int(self.record_indices[position])
        return position + self.index_offset

    # ------------------------------------------------------------------ datasets.map
    def __call__(self, batch: dict, positions: list[int]) -> dict:
        """The batched ``datasets.map`` entry point (``with_indices=True``)."""
        if self.packed:
            records = list(batch[PACKED_COLUMN])
        else:
            keys = list(batch)
            records = [{k: batch[k][j] for k in keys} for j in range(len(positions))]
        return self.run(records, positions)

    def run(self, records: Sequence[dict], positions: Sequence[int]) -> dict:
        """Columns of :func:`example_features` for ``records`` at row ``positions``."""
        out: dict[str, list] = {k: [] for k in OUTPUT_COLUMNS}

        def emit(prompt=(), answer=(), truncated=False, index=-1, turn=-1, reason="", partial=False,
                 skipped=()):
            out["prompt_ids"].append(list(prompt))
            out["answer_ids"].append(list(answer))
            out["prompt_length"].append(len(prompt))
            out["answer_length"].append(len(answer))
            out["language"].append(self.source.language)
            out["source"].append(self.label)
            out["truncated"].append(truncated)
            out["index"].append(index)
            out["turn"].append(turn)
            out["reason"].append(reason)
            out["partial"].append(partial)
            out["skipped"].append(list(skipped))

        indices = [self._index(p) for p in positions]
        for record, index, (examples, drops) in zip(records, indices,
                                                    self._records_examples(records, indices)):
            if drops and self.strict:
                reason, detail = drops[0]
                raise BadRecordError(self.label, self.split, index, reason, detail, _snippet(record))
            # A record that gave examples loses only the dropped answers (each counted as a turn); one
            # that gave none is one skipped record, counted under its first reason.
            if examples:
                skips = [(reason, True) for reason, _ in drops]
            else:
                skips = [(drops[0][0], False)] if drops else []
            for reason, partial in skips:
                if self.stream:
                    self._pending.append(skip_key(self.where, reason, partial))
                else:
                    emit(index=index, reason=reason, partial=partial)
            for ex in examples:
                emit(ex["prompt_ids"], ex["answer_ids"], ex["truncated"], index, ex["turn"],
                     skipped=self.take_pending())
        return out
