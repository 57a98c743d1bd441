"""Log-likelihood of a continuation given a prefix, by Monte Carlo over the masked-diffusion ELBO.

A masked-diffusion model has no exact likelihood; its ELBO is a lower bound (MDLM, Sahoo et al. 2024,
eq. 10; LLaDA, Nie et al. 2025, eq. 3):

    log p(c | x) >= E_t E_{c_t} [ w(t) * sum over masked positions i of log p_theta(c_i | x, c_t) ]

with ``c_t`` the continuation with each token masked with probability ``1 - alpha(t)`` and
``w(t) = -alpha'(t) / (1 - alpha(t))``. In continuous time this bound does not depend on the schedule
(MDLM, section 3.2), and written in the number ``l`` of masked tokens of an ``L``-token continuation it
reads (LLaDA, eq. 6)

    log p(c | x) >= E_{l ~ U{1..L}} E_{l positions} [ (L / l) * sum_{masked i} log p_theta(c_i | x, c_l) ]

which has a much lower variance than drawing a Bernoulli mask per token at a time ``t``: at small
``t`` that masks almost nothing and weighs it by ``1/t``. :func:`continuation_elbo` averages
``samples`` draws whose mask ratios are antithetic (stratified): ``r_k = (k + u) / K`` for one
uniform ``u``, ``l_k = ceil(r_k L)``, positions drawn at random, all from a generator with a fixed
seed, so the same request always gets the same number. With a one-token continuation every draw is
the exact ``log p(c | x, [MASK])``; with more tokens the estimate converges to the ELBO, which equals
the average over orderings of the any-order autoregressive log-likelihood.

Plain torch: any :class:`~diffusion_lm.denoiser.Denoiser`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .denoiser import Denoiser
from .errors import ConfigError

__all__ = ["ElboEstimate", "continuation_elbo"]


@dataclass
class ElboEstimate:
    """What :func:`continuation_elbo` returns.

    Attributes:
        loglik: the Monte-Carlo ELBO (a lower bound of ``log p(continuation | prefix)``, in nats).
        stderr: its standard error over the samples.
        greedy: whether every continuation token is the argmax at its slot when the whole continuation
            is masked (one forward; lm-evaluation-harness's ``is_greedy``, approximated for a model that
            decodes in any order).
    """

    loglik: float
    stderr: float
    greedy: bool


@torch.no_grad()
def continuation_elbo(
    denoiser: Denoiser,
    prefix: Sequence[int],
    continuation: Sequence[int],
    *,
    mask_id: int,
    samples: int = 64,
    seed: int = 0,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> ElboEstimate:
    """Monte-Carlo ELBO of ``continuation`` after ``prefix`` (token ids), see the module docstring.

    ``samples`` draws (stratified mask counts, random positions, a generator seeded with ``seed``)
    go through the denoiser ``batch_size`` rows at a time; the prefix is never masked.
    """
    if samples < 1:
        raise ConfigError(f"mc_samples must be >= 1, got {samples}")
    if not continuation:
        raise ConfigError("the continuation is empty: nothing to score")
    if mask_id in prefix or mask_id in continuation:
        raise ConfigError(f"the text to score contains the mask id {mask_id}")
    p, n = len(prefix), len(continuation)
    ids = torch.tensor(list(prefix) + list(continuation), dtype=torch.long)
    target = ids[p:]
    gen = torch.Generator().manual_seed(int(seed))
    shift = torch.rand((), generator=gen, dtype=torch.float64)
    ratio = (torch.arange(samples, dtype=torch.float64) + shift) / samples
    counts = (ratio * n).ceil().clamp(1, n).long()  # l_k in {1..L}, stratified over the draws
    # The l_k positions of lowest rank in a random permutation: l_k positions uniformly at random.
    ranks = torch.rand(samples, n, generator=gen).argsort(dim=1).argsort(dim=1)
    masked = ranks < counts[:, None]
    weight = n / counts.double()
    values = torch.zeros(samples, dtype=torch.float64)
    for lo in range(0, samples, batch_size):
        rows = slice(lo, min(samples, lo + batch_size))
        m = masked[rows]
        x = ids.repeat(m.shape[0], 1)
        x[:, p:][m] = mask_id
        query = torch.zeros_like(x, dtype=torch.bool)
        query[:, p:] = m
        logits = denoiser(x.to(device), torch.ones_like(x).to(device), query.to(device))
        logp = torch.log_softmax(logits.double(), dim=-1)
        picked = logp.gather(1, target.expand_as(m)[m].to(logp.device)[:, None])[:, 0].cpu()
        per_row = torch.zeros(m.shape[0], dtype=torch.float64).index_add_(0, m.nonzero()[:, 0], picked)
        values[rows] = weight[rows] * per_row
    full = ids[None].clone()
    full[0, p:] = mask_id
    query = torch.zeros_like(full, dtype=torch.bool)
    query[0, p:] = True
    greedy = denoiser(full.to(device), torch.ones_like(full).to(device), query.to(device)).argmax(-1).cpu()
    stderr = float(values.std() / samples**0.5) if samples > 1 else float("nan")
    return ElboEstimate(float(values.mean()), stderr, bool(torch.equal(greedy, target)))
