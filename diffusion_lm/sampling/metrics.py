"""Repetition metrics for generated answers (token-id level; pure Python, no tokenizer needed)."""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["repeated_ngram_rate", "longest_run", "repetition_summary"]


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
