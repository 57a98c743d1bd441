"""Answer metrics for generated answers (token-id level; pure Python, no tokenizer needed).

Looping (cyclic repetition) is the main failure of encoder-based diffusion chat models, so the
measures here look at it from several sides: how many n-grams repeat (:func:`repeated_ngram_rate`),
how varied the answer is (:func:`distinct_n`, Li et al. 2016, "A Diversity-Promoting Objective
Function for Neural Conversation Models"), the longest stretch of one repeated unit
(:func:`longest_repeat`) and whether the answer loops at all (:func:`is_looping`). Every function
takes any sequence of hashable units (token ids, or words of a decoded text).
"""

from __future__ import annotations

from typing import Hashable, Iterable, Optional, Sequence

__all__ = ["ANSWER_METRICS", "answer_metrics", "distinct_n", "is_looping", "longest_repeat", "longest_run",
           "repeated_ngram_rate", "repetition_summary"]

# Names of :func:`answer_metrics`' values, in report order.
ANSWER_METRICS = ("length", "empty", "eos_position", "ended", "distinct1", "distinct2", "rep3", "longest_run",
                  "longest_repeat", "looping")


def repeated_ngram_rate(ids: Sequence[int], n: int = 3) -> float:
    """Fraction of the answer's n-grams that already occurred earlier in the same answer.

    ``[a b a b a b]`` with ``n=2`` has n-grams ab, ba, ab, ba, ab: the last three are repeats -> 0.6.
    An answer shorter than ``n`` has no n-grams and scores 0.0.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[int, ...]] = set()
    total = repeats = 0
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i : i + n])
        total += 1
        if gram in seen:
            repeats += 1
        else:
            seen.add(gram)
    return repeats / total if total else 0.0


def longest_run(ids: Sequence[int]) -> int:
    """Length of the longest run of one identical token (``[a a a b b]`` -> 3; empty -> 0)."""
    best = run = 0
    prev = object()
    for t in ids:
        run = run + 1 if t == prev else 1
        prev = t
        best = max(best, run)
    return best


def repetition_summary(answers: Iterable[Sequence[int]], ns: Sequence[int] = (2, 3, 4)) -> dict[str, float]:
    """Means over answers: ``rep{n}`` (repeated n-gram rate) for each ``n`` and ``max_run`` (longest run)."""
    answers = [list(a) for a in answers]
    if not answers:
        return {**{f"rep{n}": 0.0 for n in ns}, "max_run": 0.0}
    out = {f"rep{n}": sum(repeated_ngram_rate(a, n) for a in answers) / len(answers) for n in ns}
    out["max_run"] = sum(longest_run(a) for a in answers) / len(answers)
    return out


def distinct_n(units: Sequence[Hashable], n: int) -> float:
    """Distinct-n: unique n-grams over all n-grams of the answer (Li et al. 2016).

    ``[a b a b]``: distinct-1 = 2/4 = 0.5, distinct-2 = |{ab, ba}| / 3 = 0.667. An answer shorter than
    ``n`` has no n-gram and scores 1.0 (nothing repeats); an empty answer is counted by ``empty``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_repeat(units: Sequence[Hashable], max_period: int = 16) -> int:
    """Units covered by the longest tandem repeat: a block of ``p <= max_period`` units followed directly
    by at least one copy of itself (a partial last copy counts). ``[x a b a b a y]`` -> 5 (``a b a b a``);
    ``[a a a]`` -> 3; an answer without any immediate repeat -> 0.

    A run of one token (:func:`longest_run`) is the ``p = 1`` case; loops of a phrase ("I am a bot. I am a
    bot.") are the longer periods.
    """
    n, best = len(units), 0
    for p in range(1, min(max_period, n // 2) + 1):
        run = 0  # positions i with units[i] == units[i - p], consecutive
        for i in range(p, n):
            run = run + 1 if units[i] == units[i - p] else 0
            if run >= p:  # one whole copy of the block: it covers run + p units
                best = max(best, run + p)
    return best


def is_looping(units: Sequence[Hashable], min_copies: int = 3, min_units: int = 4,
               max_period: int = 16) -> bool:
    """Whether the answer loops: some block of at most ``max_period`` units repeats back to back so that
    at least ``min_copies`` copies cover at least ``min_units`` units (``[the the the the]``, ``[I am I am
    I am]``). Two copies of a word ("very very") or a phrase are ordinary text and do not count."""
    n = len(units)
    for p in range(1, min(max_period, n // max(min_copies, 1)) + 1):
        need = max(p * (min_copies - 1), min_units - p)  # matches beyond the first copy
        run = 0
        for i in range(p, n):
            run = run + 1 if units[i] == units[i - p] else 0
            if run >= need:
                return True
    return False


def answer_metrics(units: Sequence[Hashable], eos_position: Optional[int] = None) -> dict[str, float]:
    """One answer's figures (see :data:`ANSWER_METRICS`): ``length`` (units), ``empty`` (1.0 for no unit),
    ``eos_position`` (index of the end token in the canvas; NaN when the answer never ended), ``ended``
    (1.0 when it did), ``distinct1``/``distinct2``, ``rep3`` (repeated 3-gram rate), ``longest_run`` (one
    token), ``longest_repeat`` (tandem repeat, units) and ``looping`` (1.0 or 0.0)."""
    units = list(units)
    return {
        "length": float(len(units)),
        "empty": float(not units),
        "eos_position": float("nan") if eos_position is None else float(eos_position),
        "ended": float(eos_position is not None),
        "distinct1": distinct_n(units, 1),
        "distinct2": distinct_n(units, 2),
        "rep3": repeated_ngram_rate(units, 3),
        "longest_run": float(longest_run(units)),
        "longest_repeat": float(longest_repeat(units)),
        "looping": float(is_looping(units)),
    }
