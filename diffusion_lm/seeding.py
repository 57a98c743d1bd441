"""Seeds and counter-based random streams: the one place that turns ids into randomness.

Plain Python and torch (no Lightning). Every random draw of the project that must not depend on
the process, rank, batch or packing it happens in is keyed here:

* :func:`stable_seed` -- a 32-bit seed from integers/strings (training times and dropout per step);
* :func:`row_seed` -- the sampler's per-row generator seed (splitmix64 of the base seed and the row);
* :func:`counter_uniform_at` -- the objective's mask noise, a pure function of
  ``(seed, step, example key, position)``.
"""

from __future__ import annotations

import numbers
import secrets
import zlib
from typing import Any, Sequence, Union

import torch

from .errors import ConfigError

__all__ = ["Seed", "counter_uniform", "counter_uniform_at", "row_seed", "row_seeds", "splitmix64",
           "stable_seed"]

MASK64 = (1 << 64) - 1

# A sampler's seed: one base seed for all rows, one seed per row, or None (a fresh random base seed).
Seed = Union[None, int, Sequence[int]]


def stable_seed(*parts: Any) -> int:
    """A stable 32-bit seed from integers/strings (Python's hash() is salted per process for str)."""
    return zlib.crc32(",".join(str(p) for p in parts).encode())


def splitmix64(x: int) -> int:
    """One step of splitmix64 on a Python int (64-bit wrapping)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, row: int) -> int:
    """The 63-bit generator seed of row ``row`` under base ``seed`` (well mixed: nearby seeds and rows
    give unrelated streams)."""
    return splitmix64(splitmix64(seed & MASK64) ^ row) >> 1


def row_seeds(seed: Seed, n: int) -> tuple[Union[int, list[int]], list[int]]:
    """``(seed as reported, generator seed of each of n rows)``: a base seed keys rows by index (None
    draws one); a list keys each row by its own seed as row 0 of a one-row call."""
    if seed is None or isinstance(seed,
                                  numbers.Integral) or (isinstance(seed, torch.Tensor) and seed.dim() == 0):
        base = secrets.randbits(63) if seed is None else int(seed)
        return base, [row_seed(base, i) for i in range(n)]
    if isinstance(seed, (str, bytes)) or not isinstance(seed, (Sequence, torch.Tensor)):
        raise ConfigError("seed must be an int, a list of ints (one per row) or None, got "
                          f"{type(seed).__name__}")
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ConfigError(f"seed is a list of {len(seeds)} seeds for {n} rows; give one seed per row")
    return seeds, [row_seed(s, 0) for s in seeds]


def _signed(c: int) -> int:
    """A 64-bit constant as a signed int64 (torch has no uint64 arithmetic)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping multiply; logical shifts emulated by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _signed(0xBF58476D1CE4E5B9)
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _signed(0x94D049BB133111EB)
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def counter_uniform_at(seed: int, step: int, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) that depend only on ``(seed, step, key, position)``, elementwise.

    ``keys`` and ``positions`` are int tensors of one shape (e.g. ``[B, L]``: the global index of the
    example each token belongs to, and the token's position inside that example). A counter-based
    stream: the mask of a token does not depend on the rank, micro-batch, row or packed neighbours it
    lands with, so N ranks (or N micro-batches, or packed rows) train exactly like one process with
    the whole batch, and every rank still draws different masks (MDLM seeded every rank alike).
    """
    key = _mix64(torch.tensor(_signed((seed * 0x9E3779B97F4A7C15 + step) & MASK64), dtype=torch.int64))
    base = _mix64(key.to(keys.device) + keys.to(torch.int64) * _signed(0xD1B54A32D192ED03))
    bits = _mix64(base + positions.to(torch.int64) * _signed(0x9E3779B97F4A7C15))
    return ((bits >> 11) & ((1 << 53) - 1)).to(torch.float64).mul_(2.0**-53).to(torch.float32)


def counter_uniform(seed: int, step: int, rows: torch.Tensor, length: int) -> torch.Tensor:
    """:func:`counter_uniform_at` for whole rows: ``[len(rows), length]`` uniforms keyed by
    ``(seed, step, row index, position)``."""
    pos = torch.arange(length, device=rows.device, dtype=torch.int64)[None, :]
    return counter_uniform_at(seed, step, rows.to(torch.int64)[:, None].expand(-1, length), pos)
