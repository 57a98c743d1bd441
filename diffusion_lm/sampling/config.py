"""SamplerConfig: one typed object that ties the sampler policies together, plus named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from ..errors import ConfigError
from .policies import (
    PROPOSERS,
    REMASKERS,
    SCORERS,
    SELECTORS,
    WINDOWS,
    BlockWindow,
    GreedyProposer,
    Proposer,
    Remasker,
    SampleProposer,
    ScheduleSelector,
    Scorer,
    Selector,
    ThresholdSelector,
    Window,
    resolve_policy,
)
from .processors import EosPolicy, LogitsProcessor, RepetitionGuard, SuppressTokens, resolve_processor

__all__ = ["SamplerConfig", "PRESETS"]


def _quality_proposer() -> dict[str, Any]:
    # A class_path dict rather than an instance: jsonargparse only accepts such defaults for subclass types.
    return {"class_path": f"{SampleProposer.__module__}.SampleProposer", "init_args": {"temperature": 0.7, "top_p": 0.9}}


def _default_processors() -> list[Union[str, LogitsProcessor]]:
    return ["eos", "repetition"]


@dataclass
class SamplerConfig:
    """How to unmask a canvas: the policies of one sampler, each a registry name or an instance.

    The defaults are the ``quality`` preset. Names: proposer ``greedy | sample``; scorer
    ``probability | margin | entropy | random``; window ``full | block``; selector
    ``schedule | threshold``; remasker ``none | remdm``; processors ``eos | repetition | suppress``.

    Args:
        proposer: how a token is chosen per slot.
        scorer: how slots are ranked (on untempered probabilities).
        window: which slots may be committed (whole canvas or semi-autoregressive blocks).
        selector: how many ranked slots are committed per forward pass.
        remasker: whether committed tokens may be re-masked and re-predicted.
        processors: logits processors, applied in order before proposing and ranking.
        suppress_tokens: token ids never proposed (applied before ``processors``).
        stop_on_eos: stop a row once EOS is committed (the rest of its canvas becomes pad).
    """

    proposer: Union[str, Proposer] = field(default_factory=_quality_proposer)
    scorer: Union[str, Scorer] = "probability"
    window: Union[str, Window] = "block"
    selector: Union[str, Selector] = "schedule"
    remasker: Union[str, Remasker] = "none"
    processors: list[Union[str, LogitsProcessor]] = field(default_factory=_default_processors)
    suppress_tokens: list[int] = field(default_factory=list)
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        self.proposer = resolve_policy("proposer", self.proposer, PROPOSERS, Proposer)
        self.scorer = resolve_policy("scorer", self.scorer, SCORERS, Scorer)
        self.window = resolve_policy("window", self.window, WINDOWS, Window)
        self.selector = resolve_policy("selector", self.selector, SELECTORS, Selector)
        self.remasker = resolve_policy("remasker", self.remasker, REMASKERS, Remasker)
        if isinstance(self.processors, (str, LogitsProcessor, Mapping)):
            self.processors = [self.processors]
        self.processors = [resolve_processor(p) for p in (self.processors or [])]
        self.suppress_tokens = [int(t) for t in (self.suppress_tokens or [])]

    # ----------------------------------------------------------------------------------- helpers
    def logits_processors(self, *, eos_policy: bool = True) -> list[LogitsProcessor]:
        """The processors to run, suppression first; ``eos_policy=False`` drops :class:`EosPolicy`."""
        out: list[LogitsProcessor] = [SuppressTokens(self.suppress_tokens)] if self.suppress_tokens else []
        out += [p for p in self.processors if eos_policy or not isinstance(p, EosPolicy)]  # type: ignore[misc]
        return out

    def replace(self, **changes: Any) -> "SamplerConfig":
        """A copy with some fields changed (names or instances, as in the constructor)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (stored in ``diffusion_config.json`` by export); :meth:`from_dict` reverses it."""
        return {
            "proposer": self.proposer.to_dict(),  # type: ignore[union-attr]
            "scorer": self.scorer.to_dict(),  # type: ignore[union-attr]
            "window": self.window.to_dict(),  # type: ignore[union-attr]
            "selector": self.selector.to_dict(),  # type: ignore[union-attr]
            "remasker": self.remasker.to_dict(),  # type: ignore[union-attr]
            "processors": [p.to_dict() for p in self.processors],  # type: ignore[union-attr]
            "suppress_tokens": list(self.suppress_tokens),
            "stop_on_eos": self.stop_on_eos,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamplerConfig":
        """Inverse of :meth:`to_dict`; also accepts ``{"preset": name, **overrides}``."""
        data = dict(data)
        preset = data.pop("preset", None)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown sampler field(s) {sorted(unknown)}; valid: {[f.name for f in dataclasses.fields(cls)]}")
        return cls.preset(preset, **data) if preset else cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SamplerConfig":
        """A named preset (``quality``, ``fast``, ``greedy``), optionally with fields overridden.

        * ``quality``: blocks of 32, sampling at temperature 0.7 / top-p 0.9, one token per forward
          (schedule selector, ``steps`` = canvas), repetition guard and EOS policy on.
        * ``fast``: blocks of 32, greedy, Fast-dLLM threshold 0.9 (several tokens per forward),
          repetition guard and EOS policy on.
        * ``greedy``: deterministic one-token-per-forward decoding (blocks of 32, greedy, schedule),
          repetition guard and EOS policy on; a reproducible reference for evaluation.
        """
        factory = PRESETS.get(str(name).strip().lower())
        if factory is None:
            raise ConfigError(f"unknown sampler preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return factory().replace(**overrides) if overrides else factory()

    @classmethod
    def coerce(cls, sampler: Union[None, str, Mapping[str, Any], "SamplerConfig"]) -> "SamplerConfig":
        """Accept None (the default config), a preset name, a mapping (:meth:`from_dict`) or a config."""
        if sampler is None:
            return cls()
        if isinstance(sampler, SamplerConfig):
            return sampler
        if isinstance(sampler, str):
            return cls.preset(sampler)
        if isinstance(sampler, Mapping):
            return cls.from_dict(sampler)
        raise ConfigError(f"sampler must be a SamplerConfig, a preset name ({', '.join(PRESETS)}) or a mapping, got {type(sampler).__name__}")


PRESETS: dict[str, Any] = {
    "quality": lambda: SamplerConfig(),
    "fast": lambda: SamplerConfig(
        proposer=GreedyProposer(),
        window=BlockWindow(32),
        selector=ThresholdSelector(0.9),
        processors=[EosPolicy(), RepetitionGuard()],
    ),
    "greedy": lambda: SamplerConfig(
        proposer=GreedyProposer(),
        window=BlockWindow(32),
        selector=ScheduleSelector(steps=None),
        processors=[EosPolicy(), RepetitionGuard()],
    ),
}
