"""Former home of the conversation types: they are :mod:`diffusion_lm.chat`'s (and the skip reasons
:mod:`diffusion_lm.data.skips`'); this module keeps the old imports working."""

from ..chat import ROLES, BadRecord, Conversation, Turn
from .skips import SKIP_REASONS, BadRecordError

__all__ = ["ROLES", "SKIP_REASONS", "Turn", "Conversation", "BadRecord", "BadRecordError"]
