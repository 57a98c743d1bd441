"""SamplerConfig: one typed object that ties the sampler policies together, plus named presets.

:meth:`SamplerConfig.resolve` is the one construction path from what a user gives -- a preset, a
``--sampler`` YAML file or inline mapping, single flags (``--steps``, ``--temperature``, ...) and an
export's stored presets -- to a config; the commands, the server, the validation callback and the
sampler itself (:meth:`SamplerConfig.coerce`) go through it. :func:`check_options` is the one place
that validates the generation flags.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..errors import ConfigError
from ..files import read_utf8
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

__all__ = ["OPTION_RULES", "PRESETS", "SamplerConfig", "SamplerSpec", "check_options", "load_sampler_spec"]

# A sampler as a command gives it (``--sampler``, the type jsonargparse reads): a preset name, a YAML/JSON
# file or inline YAML mapping, or a mapping of SamplerConfig fields (optionally with a "preset" key).
SamplerSpec = Union[str, dict, None]

# Generation options given as flags (command line, server requests): name -> (valid?, what is expected).
OPTION_RULES = {
    "steps": (lambda v: v >= 1, "must be >= 1 (forward passes for the whole canvas)"),
    "canvas_length": (lambda v: v >= 1, "must be >= 1 (answer slots per prompt)"),
    "block_size": (lambda v: v >= 1, "must be >= 1"),
    "batch_size": (lambda v: v >= 1, "must be >= 1"),
    "top_k": (lambda v: v >= 1, "must be >= 1"),
    "temperature": (lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "threshold": (lambda v: v > 0, "must be > 0 (e.g. 0.9; above 1 commits one token per forward)"),
    "default_slots": (lambda v: v >= 1, "must be >= 1"),
    "guidance": (lambda v: math.isfinite(v) and v >= 0,
                 "must be a finite number >= 0 (classifier-free guidance scale; 0 = none)"),
}


def check_options(**values: Any) -> None:
    """A one-line :class:`ConfigError` (``--name must be ..., got value``) for the first option of
    :data:`OPTION_RULES` out of range; None means "not given"."""
    for name, value in values.items():
        if value is None:
            continue
        ok, what = OPTION_RULES[name]
        if not ok(value):
            raise ConfigError(f"--{name} {what}, got {value}")



def _quality_proposer() -> dict[str, Any]:
    # A class_path dict rather than an instance: jsonargparse only accepts such defaults for subclass types.
    return {"class_path": f"{SampleProposer.__module__}.SampleProposer",
            "init_args": {"temperature": 0.7, "top_p": 0.9}}


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
        guidance: classifier-free guidance scale ``w`` (:mod:`~diffusion_lm.sampling.guidance`): the
            logits become ``cond + w * (cond - uncond)``, ``uncond`` from the same canvas with the prompt
            masked, both in one batched forward; 0 (default) is the unguided sampler exactly.
        vectorized: run the per-step work after the forward as tensor ops over all rows and slots
            (:mod:`~diffusion_lm.sampling.fast`; same ids as the plain step) where the policies allow
            it; False runs the plain per-row step (``step.py``) always.
    """

    proposer: Union[str, Proposer] = field(default_factory=_quality_proposer)
    scorer: Union[str, Scorer] = "probability"
    window: Union[str, Window] = "block"
    selector: Union[str, Selector] = "schedule"
    remasker: Union[str, Remasker] = "none"
    processors: list[Union[str, LogitsProcessor]] = field(default_factory=_default_processors)
    suppress_tokens: list[int] = field(default_factory=list)
    stop_on_eos: bool = True
    guidance: float = 0.0
    vectorized: bool = True

    def __post_init__(self) -> None:
        check_options(guidance=self.guidance)
        self.guidance = float(self.guidance)
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
        # type: ignore[misc]
        out += [p for p in self.processors if eos_policy or not isinstance(p, EosPolicy)]
        return out

    def replace(self, **changes: Any) -> "SamplerConfig":
        """A copy with some fields changed (names or instances, as in the constructor)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (stored in ``diffusion_config.json`` by export); :meth:`from_dict` reverses
        it."""
        return {
            "proposer": self.proposer.to_dict(),  # type: ignore[union-attr]
            "scorer": self.scorer.to_dict(),  # type: ignore[union-attr]
            "window": self.window.to_dict(),  # type: ignore[union-attr]
            "selector": self.selector.to_dict(),  # type: ignore[union-attr]
            "remasker": self.remasker.to_dict(),  # type: ignore[union-attr]
            "processors": [p.to_dict() for p in self.processors],  # type: ignore[union-attr]
            "suppress_tokens": list(self.suppress_tokens),
            "stop_on_eos": self.stop_on_eos,
            "guidance": self.guidance,
            "vectorized": self.vectorized,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamplerConfig":
        """Inverse of :meth:`to_dict`; also accepts ``{"preset": name, **overrides}``."""
        data = dict(data)
        preset = data.pop("preset", None)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown sampler field(s) {sorted(unknown)}; valid: "
                              f"{[f.name for f in dataclasses.fields(cls)]}")
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
    def coerce(cls, sampler: Union[SamplerSpec, Mapping[str, Any], "SamplerConfig"]) -> "SamplerConfig":
        """Accept None (the default config), a preset name, a mapping (:meth:`from_dict`) or a config
        (``resolve(sampler=sampler)``)."""
        return cls.resolve(sampler=sampler)

    @classmethod
    def resolve(
        cls,
        preset: Optional[str] = None,
        sampler: Union[SamplerSpec, Mapping[str, Any], "SamplerConfig"] = None,
        *,
        steps: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        block_size: Optional[int] = None,
        threshold: Optional[float] = None,
        guidance: Optional[float] = None,
        stored: Optional[Mapping[str, Any]] = None,
    ) -> "SamplerConfig":
        """The sampler a user asked for: ``preset`` (default ``quality``, or the stored default), then
        the ``sampler`` file/mapping on top of it, then the individual flags on top of both.

        * ``steps``: the schedule selector with that many forward passes for the canvas;
        * ``threshold``: the threshold selector (Fast-dLLM) at that confidence;
        * ``temperature`` / ``top_p`` / ``top_k``: the sampling proposer (``temperature=0``: greedy);
        * ``block_size``: semi-autoregressive blocks of that size;
        * ``guidance``: the classifier-free guidance scale;
        * ``stored``: an export's sampler defaults (``{"default_preset": ..., "presets": {name:
          to_dict()}}``); a preset name then means the stored copy.
        """
        check_options(steps=steps, temperature=temperature, top_p=top_p, top_k=top_k, block_size=block_size,
                      threshold=threshold, guidance=guidance)
        config = _base_config(preset, load_sampler_spec(sampler), stored or {})
        changes = _flag_changes(config, steps=steps, temperature=temperature, top_p=top_p, top_k=top_k,
                                block_size=block_size, threshold=threshold)
        if guidance is not None:
            changes["guidance"] = guidance
        return config.replace(**changes) if changes else config


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


# ------------------------------------------------------------------------------------- resolving
def load_sampler_spec(spec: Union[SamplerSpec, Mapping[str, Any],
                                  SamplerConfig]) -> Union[None, str, dict, SamplerConfig]:
    """``--sampler``: a YAML/JSON file, an inline YAML mapping (``{preset: fast, window: full}``), a
    preset name, a mapping, or a :class:`SamplerConfig`; returned as a name, mapping or config."""
    if spec is None or isinstance(spec, (SamplerConfig, dict)):
        return spec
    if isinstance(spec, Mapping):
        return dict(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"--sampler must be a YAML file, an inline mapping or a preset name, "
                          f"got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise ConfigError("--sampler is empty; give a YAML file (configs/sampler/fast.yaml) or a preset name")
    path = Path(text).expanduser()
    if path.is_file():
        data, where = _yaml(read_utf8(path, f"--sampler {text}"), f"--sampler {text}: not valid YAML"), text
    elif text.endswith((".yaml", ".yml", ".json")) or os.sep in text:
        raise ConfigError(f"--sampler {text!r}: no such file")
    else:
        data, where = _yaml(text, f"--sampler {text!r}: neither a file nor valid inline YAML"), "--sampler"
    if data is None:
        raise ConfigError(f"{where}: empty sampler config")
    if not isinstance(data, (str, dict)):
        raise ConfigError(f"{where}: a sampler config must be a mapping of SamplerConfig fields (or a preset "
                          f"name), got {type(data).__name__}")
    return data


def _yaml(text: str, problem: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{problem} ({str(err).splitlines()[0]})") from None


def _stored_preset(name: str, stored: Mapping[str, Any]) -> SamplerConfig:
    """A preset by name: the stored copy (an export's) when there is one, else the built-in."""
    key = str(name).strip().lower()
    presets = stored.get("presets") or {}
    if key in presets and key in PRESETS:
        return SamplerConfig.from_dict(presets[key])
    return SamplerConfig.preset(key)


def _base_config(preset: Optional[str], spec: Union[None, str, dict, SamplerConfig],
                 stored: Mapping[str, Any]) -> SamplerConfig:
    """The preset with the ``--sampler`` file or mapping on top (before the single flags)."""
    if isinstance(spec, SamplerConfig):
        if preset is not None:
            raise ConfigError("give either --preset or a SamplerConfig, not both")
        return spec
    spec = {"preset": spec} if isinstance(spec, str) else dict(spec or {})  # a bare preset name
    inner = spec.pop("preset", None)
    if preset is not None and inner is not None and str(preset).strip().lower() != str(inner).strip().lower():
        raise ConfigError(f"--preset {preset} and the --sampler config's preset {inner!r} disagree; give one")
    name = preset or inner
    if name is None:
        default = stored.get("default_preset")
        name = default if default in PRESETS else "quality"
    config = _stored_preset(name, stored)
    if not spec:
        return config
    unknown = set(spec) - set(config.to_dict())
    if unknown:
        raise ConfigError(f"unknown sampler field(s) {sorted(unknown)}; valid: {sorted(config.to_dict())}")
    return config.replace(**spec)


def _proposer_for(current: Proposer, temperature: Optional[float], top_p: Optional[float],
                  top_k: Optional[int]) -> Proposer:
    """The proposer after ``--temperature`` / ``--top_p`` / ``--top_k`` (temperature 0 and no cut: greedy)."""
    if isinstance(current, SampleProposer):
        base = {"temperature": current.temperature, "top_k": current.top_k, "top_p": current.top_p,
                "max_candidates": current.max_candidates}
    elif temperature is None:
        raise ConfigError("--top_p/--top_k only apply when sampling, and this sampler's proposer is greedy; "
                          "add --temperature T (e.g. 0.7)")
    else:
        base = {"temperature": 1.0, "top_k": None, "top_p": 1.0, "max_candidates": 1024}
    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    base.update({k: v for k, v in given.items() if v is not None})
    if base["temperature"] == 0 and base["top_k"] is None and base["top_p"] == 1.0:
        return GreedyProposer()
    return SampleProposer(**base)


def _flag_changes(config: SamplerConfig, *, steps: Optional[int], temperature: Optional[float],
                  top_p: Optional[float], top_k: Optional[int], block_size: Optional[int],
                  threshold: Optional[float]) -> dict[str, Any]:
    """The fields the single flags replace."""
    changes: dict[str, Any] = {}
    if steps is not None and threshold is not None:
        raise ConfigError("--steps (fixed number of forwards) and --threshold (confidence threshold) choose "
                          "different selectors; give one of them")
    if steps is not None:
        changes["selector"] = ScheduleSelector(steps=steps,
                                               schedule=getattr(config.selector, "schedule", None))
    if threshold is not None:
        changes["selector"] = ThresholdSelector(threshold)
    if block_size is not None:
        changes["window"] = BlockWindow(block_size)
    if temperature is not None or top_p is not None or top_k is not None:
        # type: ignore[arg-type]
        changes["proposer"] = _proposer_for(config.proposer, temperature, top_p, top_k)
    return changes
