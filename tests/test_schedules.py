"""Schedules: boundary values, monotonicity, the ELBO weight vs. a finite-difference derivative,
and a user's own schedule picked up by class path from YAML."""

from __future__ import annotations

import pytest
import torch

from diffusion_lm.schedules import (
    CosineSchedule,
    LogLinearSchedule,
    NoiseSchedule,
    PolynomialSchedule,
    stratified_times,
)

BUILTINS = [LogLinearSchedule(), CosineSchedule(), PolynomialSchedule(0.5), PolynomialSchedule(2.0),
            PolynomialSchedule(3.0)]


class SqrtSchedule(NoiseSchedule):
    """A user's schedule, defined outside the package: alpha(t) = 1 - sqrt(t)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def alpha(self, t):
        return 1.0 - t.sqrt()

    def alpha_derivative(self, t):
        return -0.5 / t.sqrt()


@pytest.mark.parametrize("schedule", BUILTINS + [SqrtSchedule()], ids=repr)
def test_boundaries_and_monotone(schedule):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    a = schedule.alpha(t)
    assert a[0].item() == pytest.approx(1.0, abs=1e-12)
    assert a[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.all(a[1:] <= a[:-1])
    p = schedule.mask_probability(t)
    torch.testing.assert_close(p, 1 - a, atol=1e-12, rtol=0)


@pytest.mark.parametrize("schedule", BUILTINS + [SqrtSchedule()], ids=repr)
def test_weight_matches_finite_difference(schedule):
    t = torch.linspace(0.02, 0.98, 97, dtype=torch.float64)
    h = 1e-6
    d_alpha = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.alpha_derivative(t), d_alpha, rtol=1e-5, atol=1e-7)
    expected = -d_alpha / (1 - schedule.alpha(t))
    w = schedule.weight(t)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-7)
    assert torch.all(w > 0)


def test_loglinear_weight_is_one_over_t():
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0])
    torch.testing.assert_close(LogLinearSchedule().weight(t), 1 / t)


def test_cosine_mask_probability_is_accurate_near_zero():
    # 1 - cos(x) cancels catastrophically in float32 for tiny t; the closed form does not.
    t = torch.tensor([1e-4], dtype=torch.float32)
    exact = 1 - torch.cos(0.5 * torch.pi * t.double())
    assert CosineSchedule().mask_probability(t).double().item() == pytest.approx(exact.item(), rel=1e-3)


def test_stratified_times_cover_strata_and_split_over_ranks():
    g = 16
    full = stratified_times(g, eps=0.0, generator=torch.Generator().manual_seed(3))
    # one sample per stratum [k/G, (k+1)/G)
    strata = torch.sort((full * g).floor().long()).values
    assert strata.tolist() == list(range(g))
    parts = [
        stratified_times(g, rank_offset=r * 4, local_batch_size=4, eps=0.0,
                         generator=torch.Generator().manual_seed(3))
        for r in range(4)
    ]
    torch.testing.assert_close(torch.cat(parts), full)
    eps_t = stratified_times(1000, eps=0.01, generator=torch.Generator().manual_seed(0))
    assert eps_t.min() >= 0.01 and eps_t.max() <= 1.0


def test_custom_schedule_from_yaml_by_class_path(tmp_path, messages_jsonl):
    from diffusion_lm.cli import DiffusionLMCLI

    from .conftest import tiny_cli_args

    config = tmp_path / "schedule.yaml"
    config.write_text(
        "model:\n  schedule:\n    class_path: tests.test_schedules.SqrtSchedule\n    init_args:\n      "
        "scale: 2.0\n"
    )
    cli = DiffusionLMCLI(args=["--config", str(config)] + tiny_cli_args(tmp_path, messages_jsonl), run=False)
    assert isinstance(cli.model.schedule, SqrtSchedule)
    assert cli.model.schedule.scale == 2.0
    # and from the command line
    cli = DiffusionLMCLI(args=tiny_cli_args(tmp_path, messages_jsonl,
                                            "--model.schedule=tests.test_schedules.SqrtSchedule"), run=False)
    assert isinstance(cli.model.schedule, SqrtSchedule)
