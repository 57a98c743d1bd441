"""Metrics: the NELBO / perplexity bound in float64 (torchmetrics, distributed-synced), per language;
grouped means of any per-example figure (per language and per source); reference metrics (exact
match, chrF)."""

from __future__ import annotations

import math
import re
import unicodedata
import warnings
from collections import Counter
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torchmetrics import Metric

__all__ = ["NelboMetric", "LanguageNelbo", "RatioMetric", "GroupedMeans", "chrf", "exact_match",
           "normalize_text"]


def _group_key(label: str) -> str:
    """A ModuleDict key for a group label (keys may not contain dots or be empty)."""
    return "g_" + re.sub(r"[^0-9A-Za-z_]", lambda m: f"_{ord(m.group()):x}_", label)


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
    """One :class:`NelboMetric` overall and one per language, and one per data source when ``update``
    is given sources (labelled ``src:<source>``), added as they appear in the data.

    Distributed-safe: before computing, every rank learns the languages every other rank has seen (an
    all-gather of their names) and adds the ones it lacks, so all ranks hold the same metrics and sync
    them in the same (sorted) order. Examples without a language count in the overall figure only.
    """

    def __init__(self, languages: Iterable[str] = ()) -> None:
        super().__init__()
        self.overall = NelboMetric()
        self.per_language = torch.nn.ModuleDict()
        self.labels: dict[str, str] = {}  # ModuleDict key -> group label
        for lang in sorted(set(languages)):
            self._metric(lang)

    @property
    def languages(self) -> list[str]:
        """The group labels seen so far (languages, and ``src:<source>`` labels), sorted."""
        return sorted(self.labels.values())

    def _metric(self, lang: str) -> NelboMetric:
        key = _group_key(lang)
        if key not in self.per_language:
            self.per_language[key] = NelboMetric().to(self.overall.nelbo.device)
            self.labels[key] = lang
        return self.per_language[key]

    def update(self, seq_nelbo: torch.Tensor, seq_tokens: torch.Tensor, languages: list[str],
               sources: Optional[list[str]] = None) -> None:
        """Add per-example NELBO sums and token counts; ``languages`` (and optional ``sources``) name
        each example's groups."""
        self.overall.update(seq_nelbo, seq_tokens)
        groups = [[lg] for lg in languages]
        if sources is not None:
            groups = [g + ([f"src:{src}"] if src else []) for g, src in zip(groups, sources)]
        for label in sorted({lg for g in groups for lg in g if lg}):
            sel = torch.tensor([i for i, g in enumerate(groups) if label in g], device=seq_nelbo.device)
            self._metric(label).update(seq_nelbo[sel], seq_tokens[sel])

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
        metrics = [("", self.overall)] + [(f"_{lang}", self._metric(lang)) for lang in self.languages]
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


# ------------------------------------------------------------------------------- grouped figures
class RatioMetric(Metric):
    """Weighted means of several named figures: ``sum(value * weight) / sum(weight)`` per name.

    Sums are float64 and summed across processes (``dist_reduce_fx="sum"``). A figure with no weight
    computes to NaN (e.g. the EOS position when no answer ended).
    """

    full_state_update = False

    def __init__(self, names: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.names = list(names)
        k = len(self.names)
        self.add_state("sums", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weights", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, weights: torch.Tensor) -> None:
        """``values`` and ``weights``: ``[B, K]`` (one row per example, one column per name). NaN
        values carry no weight."""
        values = values.to(self.sums.device, torch.float64).reshape(-1, len(self.names))
        weights = weights.to(self.sums.device, torch.float64).reshape(-1, len(self.names))
        weights = torch.where(torch.isnan(values), torch.zeros_like(weights), weights)
        self.sums += (torch.nan_to_num(values) * weights).sum(dim=0)
        self.weights += weights.sum(dim=0)

    def compute(self) -> torch.Tensor:
        out = self.sums / self.weights
        return torch.where(self.weights > 0, out, torch.full_like(out, float("nan")))


class GroupedMeans(torch.nn.Module):
    """:class:`RatioMetric` s overall and per group (a language ``en``, a source ``src:chatterbot``, ...),
    added as groups appear.

    Distributed-safe as :class:`LanguageNelbo`: before computing, every rank learns the group labels
    the others have seen (an all-gather of the names) and adds the ones it lacks, so all ranks sync the
    same metrics in the same (sorted) order.

    Args:
        names: the figures (columns of ``update``'s values).
    """

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.overall = RatioMetric(self.names)
        self.groups = torch.nn.ModuleDict()
        self.labels: dict[str, str] = {}

    def _metric(self, label: str) -> RatioMetric:
        key = _group_key(label)
        if key not in self.groups:
            self.groups[key] = RatioMetric(self.names).to(self.overall.sums.device)
            self.labels[key] = label
        return self.groups[key]

    def update(self, rows: Sequence[Mapping[str, float]], groups: Sequence[Sequence[str]],
               weights: Sequence[Mapping[str, float]] | None = None) -> None:
        """One ``{name: value}`` mapping per example (missing names count as NaN: no weight), the group
        labels each example belongs to (e.g. ``["en", "src:chatterbot"]``), and optional
        per-example weights (default 1)."""
        if not rows:
            return
        values = torch.tensor([[float(r.get(n, float("nan"))) for n in self.names] for r in rows],
                              dtype=torch.float64)
        if weights is None:
            w = torch.ones_like(values)
        else:
            w = torch.tensor([[float(x.get(n, 1.0)) for n in self.names] for x in weights],
                             dtype=torch.float64)
        self.overall.update(values, w)
        for label in sorted({g for gs in groups for g in gs if g}):
            sel = torch.tensor([i for i, gs in enumerate(groups) if label in gs])
            self._metric(label).update(values[sel], w[sel])

    def _gather_groups(self) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        seen: list = [None] * dist.get_world_size()
        dist.all_gather_object(seen, sorted(self.labels.values()))
        for labels in seen:
            for label in labels:
                self._metric(label)

    def compute(self, prefix: str = "") -> dict[str, float]:
        """``{prefix<name>: overall, prefix<name>_<group>: per group}`` (as ``val/nelbo_en``); NaN
        figures are left out."""
        self._gather_groups()
        out: dict[str, float] = {}
        parts = [("", self.overall)] + [("_" + self.labels[k], self.groups[k])
                                        for k in sorted(self.groups, key=lambda k: self.labels[k])]
        for label, metric in parts:
            with warnings.catch_warnings():  # a group absent on this rank was never updated here
                warnings.filterwarnings("ignore", message=".*before the ``update`` method.*")
                values = metric.compute().tolist()  # a collective: every rank calls it
            for name, value in zip(self.names, values):
                if not math.isnan(value):
                    out[f"{prefix}{name}{label}"] = value
        return out

    def reset(self) -> None:
        self.overall.reset()
        for metric in self.groups.values():
            metric.reset()


# ------------------------------------------------------------------------------ reference metrics
def normalize_text(text: str) -> str:
    """NFC, whitespace runs to one space, stripped: what exact match compares."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def exact_match(prediction: str, reference: str, normalize: bool = True) -> float:
    """1.0 when the prediction equals the reference (after :func:`normalize_text` unless
    ``normalize=False``), else 0.0."""
    if normalize:
        prediction, reference = normalize_text(prediction), normalize_text(reference)
    return float(prediction == reference)


def _char_ngrams(text: str, n: int) -> Counter:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf(prediction: str, reference: str, order: int = 6, beta: float = 2.0) -> float:
    """Sentence chrF in [0, 100] (Popović 2015, "chrF: character n-gram F-score for automatic MT
    evaluation"): ``CHRP`` and ``CHRR`` are the arithmetic means of the character n-gram precisions
    and recalls for n = 1..``order``, and ``chrF = (1 + b^2) CHRP CHRR / (b^2 CHRP + CHRR)``.

    Whitespace is removed before counting (as the paper's and sacreBLEU's default). Orders that one
    side is too short to have are left out of the means (sacreBLEU's effective order), so short
    answers are not punished for lacking 6-grams. An empty prediction scores 0 (100 when the
    reference is empty too).
    """
    hyp = "".join(prediction.split())
    ref = "".join(reference.split())
    if not hyp or not ref:
        return 100.0 if hyp == ref else 0.0
    precisions, recalls = [], []
    for n in range(1, order + 1):
        h, r = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        if not h or not r:
            break
        match = sum((h & r).values())
        precisions.append(match / sum(h.values()))
        recalls.append(match / sum(r.values()))
    chrp, chrr = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    b2 = beta * beta
    if chrp + chrr == 0:
        return 0.0
    return 100.0 * (1 + b2) * chrp * chrr / (b2 * chrp + chrr)
