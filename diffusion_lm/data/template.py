"""Former home of the chat template: it is :mod:`diffusion_lm.chat`'s; this module keeps the old
imports working."""

from ..chat import DEFAULT_ROLE_HEADERS, ChatTemplate, special_ids

__all__ = ["ChatTemplate", "DEFAULT_ROLE_HEADERS", "special_ids"]
