"""Whole columns of the mix are read in Arrow (one gather), in the dataset's row order, also through
``select`` and ``concatenate_datasets`` mappings."""

from __future__ import annotations

import datasets
import numpy as np

from diffusion_lm.data.mix import column as _column


def test_a_column_follows_selects_and_concatenations():
    a = datasets.Dataset.from_dict({"x": list(range(10)), "s": [f"a{i}" for i in range(10)]})
    b = datasets.Dataset.from_dict({"x": list(range(100, 120)), "s": [f"b{i}" for i in range(20)]})
    rng = np.random.default_rng(0)
    kept_a = a.select(rng.permutation(10)[:7])
    kept_b = b.select(np.sort(rng.permutation(20)[:15]))
    mix = datasets.concatenate_datasets([kept_a, kept_b]).select(rng.integers(0, 22, 40))
    for ds in (a, kept_a, kept_b, mix, mix.select(range(5, 30))):
        for name in ("x", "s"):
            assert _column(ds, name).to_pylist() == list(ds[name]), name
