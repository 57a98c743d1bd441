"""Dialog data: sources, the chat template, canvas policy, batching and the DialogDataModule."""

from .collate import CanvasPolicy, DiffusionCollator, LengthGroupedBatchSampler
from .conversation import ROLES, BadRecord, Conversation, Turn
from .datamodule import DEFAULT_VALIDATION_PROMPTS, DialogDataModule, SkipSummary, ValidationPrompt
from .sources import ADAPTERS, DataSource, load_raw, to_conversation
from .template import ChatTemplate, special_ids

__all__ = [
    "ADAPTERS",
    "BadRecord",
    "CanvasPolicy",
    "ChatTemplate",
    "Conversation",
    "DEFAULT_VALIDATION_PROMPTS",
    "DataSource",
    "DialogDataModule",
    "DiffusionCollator",
    "LengthGroupedBatchSampler",
    "ROLES",
    "SkipSummary",
    "Turn",
    "ValidationPrompt",
    "load_raw",
    "special_ids",
    "to_conversation",
]
