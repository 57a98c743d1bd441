"""The masked-diffusion NELBO: the any-order AR identity, prompt protection, global normalisation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from diffusion_lm.objective import apply_noise, masked_diffusion_nelbo
from diffusion_lm.schedules import LogLinearSchedule, stratified_times

MASK = 0


class ToyDenoiser(torch.nn.Module):
    """A fixed function of the noised input: logits_i = base_i + sum_j [z_j clean] * T[i, j, z_j]."""

    def __init__(self, length: int, vocab: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base = torch.nn.Parameter(torch.randn(length, vocab, generator=g, dtype=torch.float64))
        self.pair = torch.nn.Parameter(torch.randn(length, length, vocab, vocab, generator=g,
                                                   dtype=torch.float64))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def full_logits(self, z: torch.Tensor) -> torch.Tensor:
        b, length = z.shape
        clean = (z != MASK).double()  # [B, L]
        # contrib[b, i, v] = sum_j clean[b, j] * pair[i, j, z[b, j], v]
        picked = self.pair[:, torch.arange(length)[None, :].expand(b, -1), z]  # [L(i), B, L(j), V]
        contrib = (picked * clean[None, :, :, None]).sum(dim=2).permute(1, 0, 2)  # [B, L, V]
        logits = self.base[None] + contrib
        logits[..., MASK] = float("-inf")
        return logits

    def forward(self, input_ids, attention_mask, query):
        self.calls.append((input_ids.clone(), query.clone()))
        return self.full_logits(input_ids)[query]


def exact_any_order_nll(model: ToyDenoiser, x: torch.Tensor) -> float:
    """Average over all orderings of -sum_k log p(x_sigma(k) | x_sigma(<k)), by enumeration."""
    length = x.numel()
    total, count = 0.0, 0
    for order in itertools.permutations(range(length)):
        z = torch.full_like(x, MASK)
        nll = 0.0
        for pos in order:
            logp = torch.log_softmax(model.full_logits(z[None])[0, pos], dim=-1)
            nll -= logp[x[pos]].item()
            z[pos] = x[pos]
        total += nll
        count += 1
    return total / count


def test_nelbo_equals_any_order_autoregressive_nll():
    torch.manual_seed(0)
    length, vocab = 4, 6
    model = ToyDenoiser(length, vocab)
    x = torch.tensor([3, 1, 5, 2])
    exact = exact_any_order_nll(model, x)

    n = 40_000
    ids = x[None].expand(n, -1).clone()
    ones = torch.ones(n, length, dtype=torch.long)
    t = stratified_times(n, eps=1e-4, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        out = masked_diffusion_nelbo(model, ids, ones, ones.bool(), t, LogLinearSchedule(), MASK,
                                     generator=torch.Generator().manual_seed(2))
    samples = out.seq_nelbo
    estimate = samples.mean().item()
    stderr = samples.std().item() / math.sqrt(n)
    assert abs(estimate - exact) < 4 * stderr + 1e-3, (estimate, exact, stderr)
    # and the estimator is not trivially loose: a wrong weight (1 instead of 1/t) is far off
    assert abs((samples * t).mean().item() - exact) > 10 * stderr


def test_prompt_tokens_never_masked_or_scored():
    model = ToyDenoiser(8, 6)
    ids = torch.randint(1, 6, (64, 8))
    loss_mask = torch.zeros(64, 8, dtype=torch.bool)
    loss_mask[:, 5:] = True  # answer = last 3 tokens
    t = torch.ones(64)  # everything in the answer is masked at t = 1
    masked_diffusion_nelbo(model, ids, torch.ones_like(ids), loss_mask, t, LogLinearSchedule(), MASK)
    noised, query = model.calls[-1]
    assert torch.equal(noised[:, :5], ids[:, :5])
    assert not query[:, :5].any()
    assert query[:, 5:].all()
    assert (noised[:, 5:] == MASK).all()


def test_apply_noise_rate_follows_schedule():
    ids = torch.randint(1, 50, (200, 100))
    p = torch.full((200,), 0.3)
    _, masked = apply_noise(ids, torch.ones_like(ids, dtype=torch.bool), p, MASK,
                            torch.Generator().manual_seed(0))
    assert masked.float().mean().item() == pytest.approx(0.3, abs=0.01)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_global_normalisation_matches_single_big_batch():
    """Micro-batches / ranks with the global normaliser give the whole batch's gradient."""
    length = 6
    model = ToyDenoiser(length, 7)
    ids = torch.randint(1, 7, (8, length))
    loss_mask = torch.zeros(8, length, dtype=torch.bool)
    lengths = [1, 2, 1, 3, 5, 6, 4, 2]  # uneven answer lengths across "ranks"
    for i, n in enumerate(lengths):
        loss_mask[i, length - n:] = True
    attn = torch.ones_like(ids)
    t = torch.linspace(0.3, 1.0, 8)
    sched = LogLinearSchedule()

    # same masks in both runs: noise once with a fixed generator per row
    def run(rows, normalizer):
        g = torch.Generator().manual_seed(5)
        # draw for the whole batch, then slice, so both runs see identical masks
        u = torch.rand(8, length, generator=g)
        keep = (u < t[:, None]) & loss_mask
        sub = {"ids": ids[rows], "lm": keep[rows]}
        return masked_diffusion_nelbo(
            model, sub["ids"], attn[rows], sub["lm"], torch.ones(len(rows)), sched, MASK,
            loss_weight=loss_mask[rows].float(), normalizer=normalizer,
        )

    total = loss_mask.sum().float()  # answer tokens of the whole global batch
    model.zero_grad()
    run(list(range(8)), total).loss.backward()
    whole = _grads(model).clone()

    model.zero_grad()
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
        run(rows, total).loss.backward()
    torch.testing.assert_close(_grads(model), whole)

    # per-device normalisation (dLLM's bug) gives a different gradient
    model.zero_grad()
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
        (run(rows, loss_mask[rows].sum().float()).loss / 2).backward()
    assert not torch.allclose(_grads(model), whole)


def test_step_with_nothing_masked_still_touches_every_parameter():
    model = ToyDenoiser(5, 6)
    ids = torch.randint(1, 6, (2, 5))
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    out = masked_diffusion_nelbo(model, ids, torch.ones_like(ids), loss_mask, torch.full((2,), 1e-9),
                                 LogLinearSchedule(), MASK)
    assert out.num_masked == 0
    out.loss.backward()
    assert out.loss.item() == 0.0
    for p in model.parameters():
        assert p.grad is not None
