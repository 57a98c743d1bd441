"""Sampler policies: proposer, scorer, window, selector and remasker.

One denoising step of :func:`diffusion_lm.sampling.generate` reads:

1. **window** -- which masked slots may be decided now (whole canvas, or one semi-autoregressive block);
2. the denoiser scores those slots; **logits processors** (``processors.py``) edit the logits;
3. **proposer** -- one candidate token per slot (greedy, or sampled);
4. **scorer** -- a confidence per slot, used to rank the slots;
5. **selector** -- how many of the ranked slots to commit (fixed schedule, or confidence threshold);
6. **remasker** -- optionally send a few low-confidence committed tokens back to [MASK].

Every policy is a small class; each family has a registry (name -> class) so configs can name a
policy by string (``"greedy"``) or pass an instance (``SampleProposer(temperature=0.7)``).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, ClassVar, Mapping, Optional, Union

import torch

from ..errors import ConfigError
from ..schedules import NoiseSchedule
from .context import StepContext

__all__ = [
    "Policy",
    "Proposer",
    "GreedyProposer",
    "SampleProposer",
    "truncated_log_probs",
    "Scorer",
    "ProbabilityScorer",
    "MarginScorer",
    "EntropyScorer",
    "RandomScorer",
    "Window",
    "FullWindow",
    "BlockWindow",
    "Selector",
    "ScheduleSelector",
    "ThresholdSelector",
    "schedule_counts",
    "Remasker",
    "NoRemasker",
    "RemdmRemasker",
    "PROPOSERS",
    "SCORERS",
    "WINDOWS",
    "SELECTORS",
    "REMASKERS",
    "resolve_policy",
]


class Policy:
    """Base of all policies: a registry ``name`` and a JSON-able description of the settings."""

    name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., <constructor arguments>}``; :func:`resolve_policy` rebuilds the policy from it."""
        out: dict[str, Any] = {"name": self.name}
        for key, value in vars(self).items():
            if key.startswith("_"):
                continue
            out[key] = value.to_config() if isinstance(value, NoiseSchedule) else value
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    __hash__ = None  # type: ignore[assignment]


# ----------------------------------------------------------------------------------------- proposers
class Proposer(Policy):
    """Chooses one candidate token for every queried slot from its (processed) logits."""

    def __call__(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """``logits``: ``[N, V]`` float32 -> ``[N]`` token ids."""
        raise NotImplementedError


class GreedyProposer(Proposer):
    """Argmax token. Deterministic and cheapest; use with the ``fast`` threshold preset or when the
    model is well calibrated. Greedy decoding is one known cause of loops: pair it with the
    repetition guard."""

    name = "greedy"

    def __call__(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return logits.argmax(dim=-1)


def truncated_log_probs(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    max_candidates: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 log-probabilities over the truncated candidate slice of each row.

    The top ``K = top_k`` (or ``max_candidates`` when ``top_k`` is None) logits are taken in float32,
    only that ``[N, K]`` slice is promoted to float64, tempered, and cut to the top-p nucleus
    (temperature first, then top-p, as in Hugging Face). Sampling the float32 Gumbel/categorical
    lowers the effective temperature (Zheng et al. 2024, fixed in ReMDM/BD3-LM/DUO), while float64
    over the whole vocabulary costs more than the forward pass at mmBERT's ~256k vocabulary.

    Returns:
        ``(log_probs, token_ids)``: ``[N, K]`` float64 (``-inf`` outside the nucleus) and the ``[N, K]``
        vocabulary ids of the slice, sorted by decreasing logit.
    """
    if temperature <= 0:
        raise ConfigError("temperature must be > 0 for sampling (use the greedy proposer for 0), got "
                          f"{temperature}")
    k = min(logits.shape[-1], top_k if top_k is not None else max_candidates)
    values, token_ids = logits.topk(k, dim=-1)  # float32, sorted descending
    log_probs = (values.to(torch.float64) / temperature).log_softmax(dim=-1)
    if top_p < 1.0:
        probs = log_probs.exp()
        # Keep a token while the mass strictly before it is below top_p: the first is always kept.
        keep = (probs.cumsum(dim=-1) - probs) < top_p
        log_probs = log_probs.masked_fill(~keep, float("-inf")).log_softmax(dim=-1)
    return log_probs, token_ids


class SampleProposer(Proposer):
    """Samples from the tempered, top-k/top-p truncated distribution (float64 on the slice only).

    Use for open-ended chat: temperature > 0 is one of the remedies for looping. ``temperature=0``
    falls back to greedy. ``max_candidates`` bounds the float64 slice when ``top_k`` is None
    (the mass outside the top 1024 tokens of a trained LM is negligible).
    """

    name = "sample"

    def __init__(
        self,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: float = 1.0,
        max_candidates: int = 1024,
    ) -> None:
        if temperature < 0:
            raise ConfigError(f"sample proposer: temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ConfigError(f"sample proposer: top_k must be >= 1 or None, got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ConfigError(f"sample proposer: top_p must be in (0, 1], got {top_p}")
        if max_candidates < 1:
            raise ConfigError(f"sample proposer: max_candidates must be >= 1, got {max_candidates}")
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = float(top_p)
        self.max_candidates = int(max_candidates)

    def __call__(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        log_probs, token_ids = truncated_log_probs(
            logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            max_candidates=self.max_candidates,
        )
        # Gumbel-max in float64 with per-row generators: row i's noise depends only on row i.
        k = log_probs.shape[-1]
        noise = [
            torch.rand((n, k), dtype=torch.float64, generator=g, device=log_probs.device)
            for n, g in zip(ctx.rows_counts, ctx.generators)
        ]
        u = torch.cat(noise).clamp_(min=torch.finfo(torch.float64).tiny)
        choice = (log_probs - torch.log(-torch.log(u))).argmax(dim=-1, keepdim=True)
        return token_ids.gather(-1, choice).squeeze(-1)


# ------------------------------------------------------------------------------------------- scorers
class Scorer(Policy):
    """Confidence of each proposed token, used to rank masked slots (higher = commit sooner).

    Scores are computed on the processed, *untempered* float32 distribution: ranking on tempered
    probabilities ties at low temperature and silently becomes left-to-right (Dream #56/#72).

    ``position_decay`` (lambda, default 0 = off) makes ranking explicitly position-aware: the score
    of a slot at distance ``d`` from the nearest prompt or committed token is scaled by
    ``exp(-lambda * (d - 1))`` (divided by it for negative scores, so farther is always lower).
    Slots far from decoded context otherwise fall back to frequent tokens and copies (a loop cause).
    """

    def __init__(self, position_decay: float = 0.0) -> None:
        if position_decay < 0:
            raise ConfigError(f"{self.name} scorer: position_decay must be >= 0, got {position_decay}")
        self.position_decay = float(position_decay)

    def score(self, logits: torch.Tensor, proposals: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """``[N]`` raw confidence of ``proposals`` under ``logits``."""
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, proposals: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        scores = self.score(logits, proposals, ctx).float()
        if self.position_decay > 0:
            weight = torch.exp(-self.position_decay * (ctx.query_distance().float() - 1).clamp_min(0))
            scores = torch.where(scores >= 0, scores * weight, scores / weight)
        return scores


class ProbabilityScorer(Scorer):
    """Probability of the proposed token (LLaDA/MDLM "low-confidence remasking"). The default; its
    values are calibrated probabilities, so the threshold selector's ``tau`` has a meaning."""

    name = "probability"

    def score(self, logits: torch.Tensor, proposals: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        log_probs = logits.float().log_softmax(dim=-1)
        return log_probs.gather(-1, proposals[:, None]).squeeze(-1).exp()


class MarginScorer(Scorer):
    """``p(proposal) - max p(other token)`` (top1 - top2 for greedy proposals). Prefers slots where
    the model is decided between its two best guesses; robust when the vocabulary is flat."""

    name = "margin"

    def score(self, logits: torch.Tensor, proposals: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        probs = logits.float().softmax(dim=-1)
        top = probs.topk(min(2, probs.shape[-1]), dim=-1)
        p_prop = probs.gather(-1, proposals[:, None]).squeeze(-1)
        if top.values.shape[-1] < 2:
            return p_prop
        other = torch.where(top.indices[:, 0] == proposals, top.values[:, 1], top.values[:, 0])
        return p_prop - other


class EntropyScorer(Scorer):
    """Negative entropy of the slot's distribution (Dream's default). Ranks whole-distribution
    certainty rather than one token's mass; independent of which token was proposed."""

    name = "entropy"

    def score(self, logits: torch.Tensor, proposals: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        probs = logits.float().softmax(dim=-1)
        return -torch.special.entr(probs).sum(dim=-1)


class RandomScorer(Scorer):
    """Uniform random order (the MDLM ancestral sampler's order). A baseline for ablations; never
    better than confidence ordering for chat."""

    name = "random"

    def score(self, logits: torch.Tensor, proposals: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        parts = [torch.rand(n, generator=g, device=logits.device)
                 for n, g in zip(ctx.rows_counts, ctx.generators)]
        return torch.cat(parts)


# ------------------------------------------------------------------------------------------- windows
class Window(Policy):
    """Which masked slots may be committed this step."""

    def __call__(self, editable: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``editable``, ``masked``: ``[b, w]`` bool -> ``(window_id [b], in_window [b, w])``.

        ``window_id`` changes when a row moves to its next window (the selector then plans anew).
        """
        raise NotImplementedError


class FullWindow(Window):
    """The whole canvas at once. Fine for short canvases and infilling; over long answers one big
    window floods EOS and repeats (LLaDA #39: GSM8K 65 with block 32 vs 19.6 with block 512)."""

    name = "full"

    def __call__(self, editable: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(editable.shape[0], dtype=torch.long, device=editable.device), editable.clone()


class BlockWindow(Window):
    """Semi-autoregressive blocks of ``block_size`` editable slots, left to right: nothing outside the
    current block is committed, and a row moves on only when its block is fully committed. The
    recommended baseline for chat answers (~32)."""

    name = "block"

    def __init__(self, block_size: int = 32) -> None:
        if block_size < 1:
            raise ConfigError(f"block window: block_size must be >= 1, got {block_size}")
        self.block_size = int(block_size)

    def __call__(self, editable: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        big = editable.shape[1] + 1
        rank = editable.long().cumsum(dim=1) - 1  # index of each editable slot among the row's editable slots
        block = torch.where(editable, rank // self.block_size, torch.full_like(rank, big))
        current = torch.where(masked, block, torch.full_like(block, big)).min(dim=1).values
        return current, editable & (block == current[:, None])


# ----------------------------------------------------------------------------------------- selectors
def schedule_counts(n: int, steps: int, schedule: Optional[NoiseSchedule] = None) -> list[int]:
    """Tokens to commit at each of ``steps`` steps so that all ``n`` slots are committed.

    Step ``s`` (1-based) goes from time ``t_{s-1} = 1 - (s-1)/S`` to ``t_s = 1 - s/S``; the expected
    number of clean tokens at time ``t`` is ``n * alpha(t)``, so

        k_s = floor(n * alpha(t_s)) - floor(n * alpha(t_{s-1}))

    For the log-linear schedule (``alpha(t) = 1 - t``, the default) this is
    ``floor(n*s/S) - floor(n*(s-1)/S)``: every step commits ``floor(n/S)`` or ``ceil(n/S)`` tokens and
    the counts sum to exactly ``n``. Other schedules can give zero-count steps; those are dropped
    (a forward pass that commits nothing is wasted), so the plan may be shorter than ``steps``.
    """
    if n < 0 or steps < 1:
        raise ConfigError(f"schedule_counts needs n >= 0 and steps >= 1, got n={n}, steps={steps}")
    if schedule is None:
        cumulative = [n * s // steps for s in range(steps + 1)]
    else:
        t = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
        alpha = schedule.alpha(t).clamp(0.0, 1.0)
        cumulative = [math.floor(float(a) * n + 1e-9) for a in alpha]
        cumulative[0], cumulative[-1] = 0, n
    counts = [b - a for a, b in zip(cumulative, cumulative[1:])]
    return [c for c in counts if c > 0]


class Selector(Policy):
    """How many of the ranked slots of a window to commit at each step."""

    def plan(self, window_slots: int, total_slots: int) -> Optional[list[int]]:
        """Called when a row enters a window with ``window_slots`` masked slots (``total_slots``
        editable slots in the whole row); returns a per-step plan (or None)."""
        return None

    def quota(self, scores_desc: list[float], plan: Optional[list[int]], step: int,
              carry: int) -> tuple[int, bool]:
        """``(k, exact)`` for one row: commit the ``k`` best slots. ``scores_desc`` are the row's
        candidate scores sorted high to low; ``step`` counts steps in the current window; ``carry``
        is the number of slots the remasker re-opened since the previous step. ``exact=True`` means
        ``k`` must be met even if the repetition guard would rather skip a slot."""
        raise NotImplementedError


class ScheduleSelector(Selector):
    """Fixed count per step from the noise schedule (LLaDA/MDLM style). Predictable cost: ``steps``
    forward passes for the whole canvas, split over windows in proportion to their size
    (``ceil(steps * window_slots / total_slots)``, at least 1, at most one slot per step). Use for
    quality runs (``steps = canvas``: one token per forward) and for controlled comparisons.

    Args:
        steps: forward passes for the whole canvas; None = one per slot.
        schedule: noise schedule whose expected counts are followed (default log-linear, uniform).
    """

    name = "schedule"

    def __init__(self, steps: Optional[int] = None, schedule: Optional[NoiseSchedule] = None) -> None:
        if steps is not None and steps <= 0:
            raise ConfigError("schedule selector: steps must be >= 1 (or None for one step per slot), got "
                              f"{steps}")
        self.steps = steps
        self.schedule = schedule

    def plan(self, window_slots: int, total_slots: int) -> list[int]:
        if self.steps is None:
            steps = window_slots
        else:
            steps = math.ceil(self.steps * window_slots / max(total_slots, 1))
        steps = max(1, min(steps, window_slots))
        return schedule_counts(window_slots, steps, self.schedule)

    def quota(self, scores_desc: list[float], plan: Optional[list[int]], step: int,
              carry: int) -> tuple[int, bool]:
        n = len(scores_desc)
        if plan is None or step >= len(plan):
            return n, True  # past the plan (only after remasking): finish the window
        return min(n, plan[step] + carry), True


class ThresholdSelector(Selector):
    """Fast-dLLM's confidence threshold: commit every slot with score >= ``threshold``, at least one.
    Adaptive cost (Fast-dLLM reports ~3 tokens per forward at 7-8B with no loss); small models are
    less calibrated, so measure. ``threshold`` above every possible score gives one token per step."""

    name = "threshold"

    def __init__(self, threshold: float = 0.9) -> None:
        self.threshold = float(threshold)

    def quota(self, scores_desc: list[float], plan: Optional[list[int]], step: int,
              carry: int) -> tuple[int, bool]:
        return max(1, sum(1 for s in scores_desc if s >= self.threshold)), False


# ----------------------------------------------------------------------------------------- remaskers
class Remasker(Policy):
    """Optionally sends committed answer tokens back to [MASK] so they are predicted again."""

    def start_row(self, total_slots: int) -> dict[str, int]:
        """Per-row mutable state (e.g. the remaining budget)."""
        return {}

    def choose(self, candidates: list[tuple[int, float]], state: dict[str, int],
               generator: torch.Generator) -> list[int]:
        """Positions to re-mask among ``candidates`` = ``(position, confidence at commit)`` of the row's
        committed tokens in the current window (never prompt tokens, never this step's commits)."""
        return []


class NoRemasker(Remasker):
    """Never re-mask (committed tokens are final). The default; one forward per committed batch of tokens."""

    name = "none"


class RemdmRemasker(Remasker):
    """ReMDM-style remasking (Wang et al. 2025, "Remasking Discrete Diffusion Models with
    Inference-Time Scaling", confidence variant): with probability ``probability`` per step, re-mask up
    to ``max_per_step`` of the lowest-confidence committed tokens of the current window whose
    confidence at commit time was below ``max_confidence``. A per-row ``budget`` (default: one eighth
    of the row's slots, at least 1) bounds the total, so generation always terminates. Costs extra
    forward passes; use it when greedy/threshold decoding locks in early mistakes (loops)."""

    name = "remdm"

    def __init__(
        self,
        probability: float = 0.25,
        max_per_step: int = 1,
        budget: Optional[int] = None,
        max_confidence: float = 0.9,
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ConfigError(f"remdm remasker: probability must be in [0, 1], got {probability}")
        if max_per_step < 1:
            raise ConfigError(f"remdm remasker: max_per_step must be >= 1, got {max_per_step}")
        if budget is not None and budget < 0:
            raise ConfigError(f"remdm remasker: budget must be >= 0 or None, got {budget}")
        self.probability = float(probability)
        self.max_per_step = int(max_per_step)
        self.budget = budget
        self.max_confidence = float(max_confidence)

    def start_row(self, total_slots: int) -> dict[str, int]:
        budget = self.budget if self.budget is not None else max(1, total_slots // 8)
        return {"left": int(budget)}

    def choose(self, candidates: list[tuple[int, float]], state: dict[str, int],
               generator: torch.Generator) -> list[int]:
        eligible = sorted((c, p) for p, c in candidates if c < self.max_confidence)
        if not eligible or state["left"] <= 0:
            return []
        draw = torch.rand((), dtype=torch.float64, generator=generator, device=generator.device)
        if float(draw) >= self.probability:
            return []
        take = min(self.max_per_step, state["left"], len(eligible))
        state["left"] -= take
        return [p for _, p in eligible[:take]]


# ---------------------------------------------------------------------------------------- registries
PROPOSERS: dict[str, type[Proposer]] = {"greedy": GreedyProposer, "sample": SampleProposer}
SCORERS: dict[str, type[Scorer]] = {
    "probability": ProbabilityScorer,
    "margin": MarginScorer,
    "entropy": EntropyScorer,
    "random": RandomScorer,
}
WINDOWS: dict[str, type[Window]] = {"full": FullWindow, "block": BlockWindow}
SELECTORS: dict[str, type[Selector]] = {"schedule": ScheduleSelector, "threshold": ThresholdSelector}
REMASKERS: dict[str, type[Remasker]] = {"none": NoRemasker, "remdm": RemdmRemasker}


def resolve_policy(kind: str, spec: Union[str, Mapping[str, Any], Policy], registry: Mapping[str, type],
                   base: type) -> Any:
    """Build a policy from a registry name, a ``{"name": ..., **kwargs}`` mapping, or pass an instance
    through.

    Raises:
        ConfigError: unknown name (the message lists the valid ones) or a wrong type.
    """
    if isinstance(spec, base):
        return spec
    kwargs: dict[str, Any] = {}
    if isinstance(spec, Mapping) and "class_path" in spec:  # jsonargparse / YAML style
        cls = _import_class(str(spec["class_path"]), kind)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(f"{kind} class_path {spec['class_path']!r} is not a {base.__name__} subclass")
        try:
            return cls(**dict(spec.get("init_args") or {}))
        except TypeError as err:
            raise ConfigError(f"bad arguments for {kind} {spec['class_path']!r}: {err}") from None
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if name is None:
            raise ConfigError(f"{kind} given as a mapping needs a 'name' key (one of: "
                              f"{', '.join(registry)}), got {dict(spec)}")
        spec = name
    if isinstance(spec, str):
        cls = registry.get(spec.strip().lower())
        if cls is None:
            raise ConfigError(f"unknown {kind} {spec!r}; valid names: {', '.join(registry)}")
        if kind == "selector" and isinstance(kwargs.get("schedule"), Mapping):
            kwargs["schedule"] = NoiseSchedule.from_config(kwargs["schedule"])
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ConfigError(f"bad arguments for {kind} {spec!r}: {err}") from None
    raise ConfigError(f"{kind} must be a name ({', '.join(registry)}) or a {base.__name__} instance, got "
                      f"{type(spec).__name__}")


def _import_class(class_path: str, kind: str) -> Any:
    """``package.module.Class`` -> the class (a bare class name is looked up in this module)."""
    module_name, _, cls_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name or __name__), cls_name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{kind} class_path {class_path!r} cannot be imported") from None

