"""The one in-memory type every data source is converted to: a role-tagged conversation.

It also defines the *skip reasons*: every record or answer the pipeline cannot use is counted under
one of the keys of :data:`SKIP_REASONS` (the same names appear in logs, ``DialogDataModule.summary``
and ``docs/data.md``), so nothing is lost silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError

__all__ = ["ROLES", "SKIP_REASONS", "Turn", "Conversation", "BadRecord", "BadRecordError"]

ROLES = ("system", "user", "assistant")

# reason -> what it means. Order: record shape, then message fields, then dialog structure, then length.
SKIP_REASONS: dict[str, str] = {
    "non_utf8": "the record's line in a JSON Lines file is not valid UTF-8 (strict mode names the byte offset)",
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


class BadRecord(ValueError):
    """A source record (or one answer of it) that cannot become a training example.

    ``reason`` is a key of :data:`SKIP_REASONS` (the counter key); ``detail`` says what was found.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep reason/detail when raised inside a datasets.map worker process
        return (type(self), (self.reason, self.detail))


class BadRecordError(ConfigError):
    """Raised in ``strict`` mode on the first bad record, naming the source, split and record index."""

    def __init__(self, source: str, split: str, index: int, reason: str, detail: str = "", record: str = "") -> None:
        self.source, self.split, self.index, self.reason, self.detail, self.record = (
            source, split, index, reason, detail, record)
        message = f"bad record {index} in data source {source!r} ({split}): {reason}"
        if detail:
            message += f" ({detail})"
        if record:
            message += f"; record: {record}"
        super().__init__(message + ". Fix the record, or set data.strict=false to skip and count such records.")

    def __reduce__(self):
        return (type(self), (self.source, self.split, self.index, self.reason, self.detail, self.record))


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    content: str


@dataclass
class Conversation:
    """A dialog plus where it came from (for per-source and per-language metrics).

    Args:
        turns: the messages in order.
        source: label of the data source (``DataSource.label``).
        language: ISO code of the source; metrics are split by it.
        index: record index inside the source (``-1`` when not from a source).
        meta: free-form extras.
    """

    turns: list[Turn]
    source: str = ""
    language: str = ""
    index: int = -1
    meta: dict = field(default_factory=dict)

    def validate(self) -> "Conversation":
        """Raise :class:`BadRecord` unless this is a usable dialog ending with an assistant answer.

        Dialogs with fewer than two messages are rejected here with a counted reason instead of
        reaching the template (dLLM's chat template crashed on them).
        """
        if not self.turns:
            raise BadRecord("empty_conversation")
        for i, turn in enumerate(self.turns):
            if turn.role not in ROLES:
                raise BadRecord("unknown_role", f"message {i} has role {turn.role!r}")
            if turn.content is None:
                raise BadRecord("missing_content", f"message {i} ({turn.role})")
            if not isinstance(turn.content, str):
                raise BadRecord("non_string_content", f"message {i} ({turn.role}) is {type(turn.content).__name__}")
            if not turn.content.strip():
                raise BadRecord("empty_content", f"message {i} ({turn.role})")
        if not any(t.role == "assistant" for t in self.turns):
            raise BadRecord("no_assistant_turn", f"roles: {[t.role for t in self.turns]}")
        if self.turns[-1].role != "assistant":
            raise BadRecord("last_turn_not_assistant", f"last role is {self.turns[-1].role!r}")
        if not any(t.role == "user" for t in self.turns):
            raise BadRecord("no_user_turn", f"roles: {[t.role for t in self.turns]}")
        return self

    def answer_indices(self, which: str = "all") -> list[int]:
        """Indices of the assistant turns to train on: every one preceded by a user turn, or the ``last``."""
        seen_user, targets = False, []
        for i, turn in enumerate(self.turns):
            seen_user = seen_user or turn.role == "user"
            if turn.role == "assistant" and seen_user:
                targets.append(i)
        return targets[-1:] if which == "last" else targets

    @property
    def first_user_text(self) -> Optional[str]:
        """The first user message (handy for logging samples)."""
        return next((t.content for t in self.turns if t.role == "user"), None)
