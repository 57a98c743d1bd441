"""Noise schedules of the absorbing-state (masking) diffusion process, and time samplers.

A schedule is defined by ``alpha(t)``, the probability that a token is still clean at time ``t``
(``alpha(0) = 1``, ``alpha(1) = 0``), and its derivative. Everything else is derived here once:

* ``mask_probability(t) = 1 - alpha(t)``
* ``weight(t) = -alpha'(t) / (1 - alpha(t))``, the continuous-time NELBO weight (MDLM, SUBS).

Schedules are written directly in terms of alpha and alpha' (MDLM wrote the weight as
``sigma'/expm1(sigma)`` and users got the sign wrong, mdlm#9). Subclass :class:`NoiseSchedule`
and pass it by class path (``--model.schedule=my_pkg.MySchedule``) to use your own.
"""

from __future__ import annotations

import importlib
import math

import torch

from .errors import ConfigError

__all__ = [
    "NoiseSchedule",
    "LogLinearSchedule",
    "CosineSchedule",
    "PolynomialSchedule",
    "stratified_times",
    "indexed_times",
]


class NoiseSchedule:
    """Base class: implement :meth:`alpha` and :meth:`alpha_derivative` (tensors in, tensors out).

    ``t`` is a float tensor of times in ``[0, 1]``. The base class derives the mask probability and
    the ELBO weight. Override :meth:`mask_probability` too when ``1 - alpha(t)`` can be computed more
    accurately in closed form (it is used in the weight's denominator).
    """

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still clean at time ``t``."""
        raise NotImplementedError

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha / d t (non-positive for a valid schedule)."""
        raise NotImplementedError

    def mask_probability(self, t: torch.Tensor) -> torch.Tensor:
        """Probability ``1 - alpha(t)`` that a token is masked at time ``t``."""
        return 1.0 - self.alpha(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous-time NELBO weight ``-alpha'(t) / (1 - alpha(t))`` (positive for t > 0)."""
        return -self.alpha_derivative(t) / self.mask_probability(t).clamp_min(torch.finfo(t.dtype).tiny)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def to_config(self) -> dict:
        """A jsonargparse-style ``{class_path, init_args}`` dict that rebuilds this schedule."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(vars(self))}

    @staticmethod
    def from_config(spec: dict) -> "NoiseSchedule":
        """The schedule a :meth:`to_config` dict describes (its class is imported by path)."""
        path = str(spec.get("class_path", ""))
        module_name, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ConfigError(f"schedule class_path {path!r} cannot be imported: {err}") from err
        schedule = cls(**(spec.get("init_args") or {}))
        if not isinstance(schedule, NoiseSchedule):
            raise ConfigError(f"schedule {path!r} is not a diffusion_lm.schedules.NoiseSchedule subclass")
        return schedule


class LogLinearSchedule(NoiseSchedule):
    """``alpha(t) = 1 - t``: the MDLM default. Weight ``1/t``; mask rate equals time."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.ones_like(t)

    def mask_probability(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()


class CosineSchedule(NoiseSchedule):
    """``alpha(t) = cos(pi t / 2)``: masks slowly at first, fast near the end."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(0.5 * math.pi * t)

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def mask_probability(self, t: torch.Tensor) -> torch.Tensor:
        # 1 - cos(x) = 2 sin^2(x/2): no cancellation for small t.
        return 2.0 * torch.sin(0.25 * math.pi * t) ** 2


class PolynomialSchedule(NoiseSchedule):
    """``alpha(t) = 1 - t**exponent``. ``exponent=1`` is log-linear; larger masks later."""

    def __init__(self, exponent: float = 2.0) -> None:
        if exponent <= 0:
            raise ValueError(f"PolynomialSchedule: exponent must be > 0, got {exponent}")
        self.exponent = float(exponent)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t**self.exponent

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        return -self.exponent * t ** (self.exponent - 1.0)

    def mask_probability(self, t: torch.Tensor) -> torch.Tensor:
        return t**self.exponent


def stratified_times(
    global_batch_size: int,
    *,
    rank_offset: int = 0,
    local_batch_size: int | None = None,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Antithetic (stratified) times over the whole global batch, in ``[eps, 1]``.

    One uniform offset ``u`` is shared by every rank (the ``generator`` must be seeded identically on
    all ranks); sample ``i`` of the global batch gets ``(u + i) / G`` and the strata are shuffled so
    that time does not correlate with position in a length-sorted batch. Each rank takes its slice
    ``[rank_offset, rank_offset + local_batch_size)``. Sampling t in ``[eps, 1]`` keeps the ``1/t``
    weight bounded (the 1/t weight of the log-linear schedule explodes near 0).
    """
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
    local = global_batch_size if local_batch_size is None else local_batch_size
    u = torch.rand((), generator=generator, dtype=torch.float64)
    order = torch.randperm(global_batch_size, generator=generator)
    strata = (u + order.to(torch.float64)) / global_batch_size
    t = eps + (1.0 - eps) * strata[rank_offset : rank_offset + local]
    return t.to(device=device, dtype=torch.float32)


_GOLDEN = 0.6180339887498949  # (sqrt(5) - 1) / 2: the Kronecker sequence with the most even spread


def indexed_times(indices: torch.Tensor, *, seed: int = 0, eps: float = 1e-3) -> torch.Tensor:
    """Times in ``[eps, 1]`` that depend only on each example's index (and ``seed``).

    Example ``i`` gets ``frac(c + i * (sqrt(5) - 1) / 2)`` (a Kronecker low-discrepancy sequence with a
    seed-dependent offset ``c``): any run of consecutive indices covers ``[0, 1)`` nearly as evenly as
    stratified sampling, and the time of an example does not depend on which batch, rank or packed
    row it lands in. Validation uses it so that every process count and batch size reports the same
    NELBO for the same checkpoint.
    """
    offset = (seed * _GOLDEN * 7919.0) % 1.0
    frac = torch.remainder(offset + indices.to(torch.float64) * _GOLDEN, 1.0)
    return (eps + (1.0 - eps) * frac).to(torch.float32)
