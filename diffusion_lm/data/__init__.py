"""Dialog data: sources, the chat template, canvas policy, batching and the DialogDataModule."""

from .batching import DialogBatchSampler, LengthGroupedBatchSampler, SampleKey
from .collate import CanvasPolicy, DiffusionCollator
from .conversation import ROLES, SKIP_REASONS, BadRecord, BadRecordError, Conversation, Turn
from .datamodule import DEFAULT_VALIDATION_PROMPTS, DialogDataModule, SkipSummary, ValidationPrompt
from .examples import ExampleBuilder
from .mixing import apportion, mix_size
from .sources import ADAPTERS, DATASET_PRESETS, DataSource, load_raw, to_conversation
from .template import ChatTemplate, special_ids

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
    "load_raw",
    "mix_size",
    "special_ids",
    "to_conversation",
]
