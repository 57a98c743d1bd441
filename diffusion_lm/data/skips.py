"""Skip accounting: every record or answer the pipeline cannot use is counted under a reason.

The reasons are the keys of :data:`SKIP_REASONS` (the same names appear in logs,
``DialogDataModule.summary`` and ``docs/data.md``), so nothing is lost silently. A record that yields
no example is a *skipped record*; with ``train_turns: all`` an answer dropped from a record that still
yields others is a *dropped turn*. Adapters and the conversation check raise
:class:`~diffusion_lm.chat.BadRecord`; ``strict`` mode raises :class:`BadRecordError` instead of
counting.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

from ..errors import ConfigError

__all__ = ["SKIP_REASONS", "BadRecordError", "SkipSummary"]

# reason -> what it means. Order: record shape, then message fields, then dialog structure, then length.
SKIP_REASONS: dict[str, str] = {
    "non_utf8": "the record's line in a JSON Lines file is not valid UTF-8 (strict mode names the byte "
                "offset)",
    "missing_column": "the record has no field holding the messages (or the prompt/response column)",
    "malformed_messages": "the messages field is not a list of message objects",
    "empty_conversation": "the message list is empty (or a chatterbot dialog has no answered line)",
    "missing_role": "a message has no role field, or its role is null",
    "unknown_role": "a role name that maps to none of system/user/assistant (extend it with `role_map`)",
    "missing_content": "a message has no content field, or its content is null",
    "non_string_content": "a message content that is not a string (a number, a list of parts, ...)",
    "empty_content": "a message whose content is empty or only whitespace",
    "no_assistant_turn": "the dialog has no assistant message to train on",
    "last_turn_not_assistant": "the dialog ends with a non-assistant message (nothing answers it)",
    "no_user_turn": "the dialog has no user message before its assistant answer(s)",
    "prompt_too_long": "the prompt is longer than max_length - canvas.length tokens",
    "answer_too_long": "the answer plus its end token is longer than canvas.length (overflow: drop)",
    "adapter_error": "an unexpected error while converting the record (its message is logged once)",
}


class BadRecordError(ConfigError):
    """Raised in ``strict`` mode on the first bad record, naming the source, split and record index."""

    def __init__(self, source: str, split: str, index: int, reason: str, detail: str = "",
                 record: str = "") -> None:
        self.source, self.split, self.index, self.reason, self.detail, self.record = (
            source, split, index, reason, detail, record)
        message = f"bad record {index} in data source {source!r} ({split}): {reason}"
        if detail:
            message += f" ({detail})"
        if record:
            message += f"; record: {record}"
        super().__init__(message + ". Fix the record, or set data.strict=false to skip and count such "
                                   "records.")

    def __reduce__(self):
        return (type(self), (self.source, self.split, self.index, self.reason, self.detail, self.record))


class SkipSummary:
    """What the pipeline did not use, counted per ``(source/split, reason)``.

    ``records`` counts records that gave no example at all; ``turns`` counts answers dropped from
    records that still gave other examples (``train_turns: all``). Reasons are the keys of
    :data:`SKIP_REASONS`. (A plain class holding two counters, so it
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
        """Skips matching ``reason`` and/or ``where`` (``source/split``, or a source label for both
        splits)."""
        counter = self.turns if partial else self.records
        return sum(
            n for (w, r), n in counter.items()
            if (reason is None or r == reason)
            and (where is None or w == where or w.rsplit("/", 1)[0] == where)
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
            lines.append(f"{sum(self.turns.values())} answer turn(s) dropped from records that gave other "
                         "examples:")
            lines += [f"  {where}: {reason} x{n}" for (where, reason), n in sorted(self.turns.items())]
        return "\n".join(lines)
