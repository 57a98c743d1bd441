"""The one in-memory type every data source is converted to: a role-tagged conversation."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ROLES", "Turn", "Conversation", "BadRecord"]

ROLES = ("system", "user", "assistant")


class BadRecord(ValueError):
    """A source record that cannot become a training example; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    content: str


@dataclass
class Conversation:
    """A dialog plus where it came from (for per-source and per-language metrics)."""

    turns: list[Turn]
    source: str = ""
    language: str = ""
    index: int = -1
    meta: dict = field(default_factory=dict)

    def validate(self) -> "Conversation":
        """Raise :class:`BadRecord` unless this is a usable dialog ending with an assistant answer."""
        if len(self.turns) < 2:
            # dLLM's chat template crashed on dialogs with fewer than two messages.
            raise BadRecord("too_few_turns", f"{len(self.turns)} turn(s)")
        for turn in self.turns:
            if turn.role not in ROLES:
                raise BadRecord("unknown_role", repr(turn.role))
            if not isinstance(turn.content, str):
                raise BadRecord("non_string_content", type(turn.content).__name__)
            if not turn.content.strip():
                raise BadRecord("empty_content", f"empty {turn.role} message")
        if not any(t.role == "assistant" for t in self.turns):
            raise BadRecord("no_assistant_turn")
        if self.turns[-1].role != "assistant":
            raise BadRecord("last_turn_not_assistant", f"last role is {self.turns[-1].role!r}")
        if not any(t.role == "user" for t in self.turns):
            raise BadRecord("no_user_turn")
        return self
