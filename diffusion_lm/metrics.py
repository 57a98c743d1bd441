"""Metrics: the NELBO / perplexity bound in float64 (torchmetrics, distributed-synced), per language."""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
from torchmetrics import Metric

__all__ = ["NelboMetric", "LanguageNelbo"]


class NelboMetric(Metric):
    """NELBO per answer token and its perplexity bound ``exp(NELBO / tokens)``.

    Sums are kept in float64: a bf16/fp32 running sum over a large validation set drifts.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nelbo", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, seq_nelbo: torch.Tensor, seq_tokens: torch.Tensor) -> None:
        self.nelbo += seq_nelbo.to(torch.float64).sum()
        self.tokens += seq_tokens.to(torch.float64).sum()

    def compute(self) -> torch.Tensor:
        """NELBO per token (NaN when no token was seen)."""
        if float(self.tokens) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.nelbo / self.tokens

    def perplexity(self) -> torch.Tensor:
        """Upper bound on the per-token perplexity."""
        return torch.exp(self.compute())


class LanguageNelbo(torch.nn.Module):
    """One :class:`NelboMetric` overall and one per language, added as languages appear in the data.

    Distributed-safe: before computing, every rank learns the languages every other rank has seen (an
    all-gather of their names) and adds the ones it lacks, so all ranks hold the same metrics and sync
    them in the same (sorted) order. Examples without a language count in the overall figure only.
    """

    def __init__(self, languages: Iterable[str] = ()) -> None:
        super().__init__()
        self.overall = NelboMetric()
        self.per_language = torch.nn.ModuleDict()
        for lang in sorted(set(languages)):
            self._metric(lang)

    @property
    def languages(self) -> list[str]:
        return sorted(self.per_language.keys())

    def _metric(self, lang: str) -> NelboMetric:
        if lang not in self.per_language:
            self.per_language[lang] = NelboMetric().to(self.overall.nelbo.device)
        return self.per_language[lang]

    def update(self, seq_nelbo: torch.Tensor, seq_tokens: torch.Tensor, languages: list[str]) -> None:
        self.overall.update(seq_nelbo, seq_tokens)
        for lang in sorted({lg for lg in languages if lg}):
            sel = torch.tensor([i for i, lg in enumerate(languages) if lg == lang], device=seq_nelbo.device)
            self._metric(lang).update(seq_nelbo[sel], seq_tokens[sel])

    def _gather_languages(self) -> None:
        """Add the languages other ranks have seen (a collective: every rank calls it)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        seen: list = [None] * dist.get_world_size()
        dist.all_gather_object(seen, self.languages)
        for names in seen:
            for lang in names:
                self._metric(lang)

    def compute(self, prefix: str) -> dict[str, float]:
        """``{prefix/nelbo, prefix/ppl_bound, prefix/nelbo_<lang>, prefix/ppl_bound_<lang>}``."""
        self._gather_languages()
        out = {}
        metrics = [("", self.overall)] + [(f"_{lang}", self.per_language[lang]) for lang in self.languages]
        for name, metric in metrics:
            with warnings.catch_warnings():  # a language absent from this split was never updated
                warnings.filterwarnings("ignore", message=".*before the ``update`` method.*")
                value = float(metric.compute())  # every rank calls compute: it is a collective
            if math.isnan(value):
                continue
            out[f"{prefix}/nelbo{name}"] = value
            out[f"{prefix}/ppl_bound{name}"] = math.exp(min(value, 50.0))
        return out

    def reset(self) -> None:
        self.overall.reset()
        for metric in self.per_language.values():
            metric.reset()
