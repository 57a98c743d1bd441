"""The masked-diffusion sampler (plain torch, no Lightning).

``generate`` answers prompts on a [MASK] canvas, ``infill`` fills [MASK] holes; both take any
denoiser callable ``(input_ids, attention_mask, query) -> logits at query positions`` and a
:class:`SamplerConfig` made of small policies (proposer, scorer, window, selector, remasker,
logits processors). See ``docs/sampling.md``.
"""

from .config import PRESETS, SamplerConfig
from .context import StepContext
from ..denoiser import Denoiser
from ..seeding import row_seed
from .loop import GenerationResult, GenerationStats, RowStats, StepHook, generate, infill
from .metrics import longest_run, repeated_ngram_rate, repetition_summary
from .policies import (
    PROPOSERS,
    REMASKERS,
    SCORERS,
    SELECTORS,
    WINDOWS,
    BlockWindow,
    EntropyScorer,
    FullWindow,
    GreedyProposer,
    MarginScorer,
    NoRemasker,
    Policy,
    ProbabilityScorer,
    Proposer,
    RandomScorer,
    Remasker,
    RemdmRemasker,
    SampleProposer,
    ScheduleSelector,
    Scorer,
    Selector,
    ThresholdSelector,
    Window,
    resolve_policy,
    schedule_counts,
    truncated_log_probs,
)
from .processors import (
    PROCESSORS,
    EosPolicy,
    LogitsProcessor,
    RepetitionGuard,
    SuppressTokens,
    resolve_processor,
)
from .spans import DEFAULT_MASK_SLOTS, flexible_slots, parse_spans, spans_to_ids
from .trajectory import Trajectory, TrajectoryStep, render_trajectory_html, render_trajectory_text

__all__ = [
    "generate", "infill", "SamplerConfig", "PRESETS", "GenerationResult", "GenerationStats", "RowStats",
    "Denoiser", "StepHook", "StepContext", "row_seed",
    "Policy", "Proposer", "GreedyProposer", "SampleProposer", "truncated_log_probs",
    "Scorer", "ProbabilityScorer", "MarginScorer", "EntropyScorer", "RandomScorer",
    "Window", "FullWindow", "BlockWindow",
    "Selector", "ScheduleSelector", "ThresholdSelector", "schedule_counts",
    "Remasker", "NoRemasker", "RemdmRemasker",
    "LogitsProcessor", "EosPolicy", "RepetitionGuard", "SuppressTokens",
    "PROPOSERS", "SCORERS", "WINDOWS", "SELECTORS", "REMASKERS", "PROCESSORS", "resolve_policy",
           "resolve_processor",
    "parse_spans", "spans_to_ids", "flexible_slots", "DEFAULT_MASK_SLOTS",
    "Trajectory", "TrajectoryStep", "render_trajectory_html", "render_trajectory_text",
    "repeated_ngram_rate", "longest_run", "repetition_summary",
]
