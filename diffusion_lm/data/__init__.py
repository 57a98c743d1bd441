"""Dialog data: sources, skip accounting, examples, the mix, canvas policy, batching and the DialogDataModule.

The chat types (``Turn``, ``Conversation``, ``ChatTemplate``, ``ValidationPrompt``) live in
:mod:`diffusion_lm.chat` and are re-exported here.
"""

from .batching import DialogBatchSampler, LengthGroupedBatchSampler, SampleKey
from .collate import CanvasPolicy, DiffusionCollator
from ..chat import (
    DEFAULT_VALIDATION_PROMPTS,
    ROLES,
    BadRecord,
    ChatTemplate,
    Conversation,
    Turn,
    ValidationPrompt,
    special_ids,
)
from .datamodule import DialogDataModule
from .examples import ExampleBuilder
from .mix import apportion, build_mix, mix_size
from .skips import SKIP_REASONS, BadRecordError, SkipSummary
from .sources import ADAPTERS, DATASET_PRESETS, DataSource, load_raw, to_conversation

__all__ = [
    "ADAPTERS",
    "BadRecord",
    "BadRecordError",
    "CanvasPolicy",
    "ChatTemplate",
    "Conversation",
    "DATASET_PRESETS",
    "DEFAULT_VALIDATION_PROMPTS",
    "DataSource",
    "DialogBatchSampler",
    "DialogDataModule",
    "DiffusionCollator",
    "ExampleBuilder",
    "LengthGroupedBatchSampler",
    "ROLES",
    "SampleKey",
    "SKIP_REASONS",
    "SkipSummary",
    "Turn",
    "ValidationPrompt",
    "apportion",
    "build_mix",
    "load_raw",
    "mix_size",
    "special_ids",
    "to_conversation",
]
