"""Weighted mixing of map-style sources with exact proportions.

``datasets.interleave_datasets`` draws the source of every example at random, so its proportions
are only right on average and its size follows from the stopping rule. For sources held on disk we
know every size up front, so the mix is planned instead: the number of examples per source is
apportioned exactly from the weights, and each source contributes whole seeded permutations of its
examples (repeating a small source as often as needed, never sampling one example twice before every
other has been used). Streaming sources use ``interleave_datasets`` (see the data module).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import numpy as np

__all__ = ["apportion", "mix_size", "source_indices", "StoppingStrategy"]

StoppingStrategy = Literal["all_exhausted", "first_exhausted"]


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integer counts proportional to ``weights`` (largest remainder; sums to ``total``)."""
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or (w <= 0).any():
        raise ValueError(f"weights must be positive, got {list(weights)}")
    quotas = total * w / w.sum()
    counts = np.floor(quotas).astype(np.int64)
    remainder = total - int(counts.sum())
    # Ties go to the earlier source, so the split is deterministic.
    order = sorted(range(len(w)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:remainder]:
        counts[i] += 1
    return counts.tolist()


def mix_size(
    sizes: Sequence[int],
    weights: Sequence[float],
    strategy: StoppingStrategy = "all_exhausted",
    total: Optional[int] = None,
) -> int:
    """Examples in the mix: ``total`` if given, else the size at which the stopping rule is met.

    ``all_exhausted``: the smallest mix in which every example of every source appears at least once
    (sources with more weight than data are repeated). ``first_exhausted``: the largest mix in which
    no example appears twice (sources with more data than weight are subsampled).
    """
    if total is not None:
        return int(total)
    w = np.asarray(weights, dtype=np.float64)
    p = w / w.sum()
    ratios = [n / pi for n, pi in zip(sizes, p)]
    if strategy == "all_exhausted":
        return int(math.ceil(max(ratios) - 1e-9))
    return int(math.floor(min(ratios) + 1e-9))


def source_indices(size: int, count: int, seed: int) -> np.ndarray:
    """``count`` indices into a source of ``size`` examples: whole seeded permutations, then part of one."""
    if size <= 0:
        raise ValueError("a source in the mix has no examples")
    rng = np.random.default_rng(seed)
    full, rest = divmod(count, size)
    parts = [rng.permutation(size) for _ in range(full)]
    if rest:
        parts.append(rng.permutation(size)[:rest])
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
