"""The forward masking process and the masked-diffusion NELBO (MDLM / SUBS, continuous time).

Plain torch, no Lightning. The model is any *denoiser*::

    denoiser(input_ids[B, L], attention_mask[B, L], query[B, L] bool) -> logits[N, V] (float32)

returning logits only at the ``query`` positions (row-major order), with the [MASK] column at -inf.
Computing the LM head only at masked positions is what keeps a 256k vocabulary affordable
(dLLM and MDLM materialise full-vocabulary logits at every position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .schedules import NoiseSchedule

__all__ = [
    "Denoiser",
    "NelboOutput",
    "apply_noise",
    "counter_uniform",
    "counter_uniform_at",
    "masked_diffusion_nelbo",
]

_M64 = (1 << 64) - 1


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
    key = _mix64(torch.tensor(_signed((seed * 0x9E3779B97F4A7C15 + step) & _M64), dtype=torch.int64))
    base = _mix64(key.to(keys.device) + keys.to(torch.int64) * _signed(0xD1B54A32D192ED03))
    bits = _mix64(base + positions.to(torch.int64) * _signed(0x9E3779B97F4A7C15))
    return ((bits >> 11) & ((1 << 53) - 1)).to(torch.float64).mul_(2.0**-53).to(torch.float32)


def counter_uniform(seed: int, step: int, rows: torch.Tensor, length: int) -> torch.Tensor:
    """:func:`counter_uniform_at` for whole rows: ``[len(rows), length]`` uniforms keyed by
    ``(seed, step, row index, position)``."""
    pos = torch.arange(length, device=rows.device, dtype=torch.int64)[None, :]
    return counter_uniform_at(seed, step, rows.to(torch.int64)[:, None].expand(-1, length), pos)


class Denoiser(Protocol):
    """Callable returning float32 logits at the query positions (see module docstring)."""

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass
class NelboOutput:
    """Result of :func:`masked_diffusion_nelbo`.

    Attributes:
        loss: ``sum(w(t) * nll * loss_weight) / normalizer``; the quantity to backpropagate.
        seq_nelbo: per-sequence (row, or group when ``groups`` is given) Monte-Carlo NELBO (float64)
            over the ``metric_mask`` positions.
        seq_tokens: per-sequence number of ``metric_mask`` positions (float64).
        weighted_sum: the numerator of ``loss`` (detached), for logging.
        num_masked: number of positions that were masked (and scored) in this call.
    """

    loss: torch.Tensor
    seq_nelbo: torch.Tensor
    seq_tokens: torch.Tensor
    weighted_sum: torch.Tensor
    num_masked: int


def apply_noise(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    mask_probability: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward process: each ``loss_mask`` token independently becomes [MASK] w.p. ``mask_probability``.

    ``mask_probability`` has one entry per row (``[B]``) or per position (``[B, L]``: packed rows hold
    several examples, each with its own time). Tokens outside ``loss_mask`` (the user prompt, batch
    padding) are never masked. The randomness comes from ``uniforms`` (e.g. :func:`counter_uniform`)
    when given, else from ``generator``. Returns ``(noised_ids, masked)``.
    """
    u = uniforms if uniforms is not None else torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    p = mask_probability.to(u.dtype)
    masked = (u < (p.unsqueeze(1) if p.dim() == 1 else p)) & loss_mask.bool()
    return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids), masked


def masked_diffusion_nelbo(
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    mask_id: int,
    *,
    loss_weight: torch.Tensor | None = None,
    metric_mask: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    num_groups: int | None = None,
) -> NelboOutput:
    """Monte-Carlo estimate of the masked-diffusion NELBO for one batch.

    Args:
        denoiser: the model (see module docstring).
        input_ids: clean token ids ``[B, L]``.
        attention_mask: 1 for real tokens, 0 for batch padding.
        loss_mask: positions that are noised (the assistant answer, its end token and filler).
        t: times in ``(0, 1]``: one per row ``[B]``, or one per position ``[B, L]`` (packed rows,
            where every example carries its own time).
        schedule: the noise schedule.
        mask_id: the [MASK] token id.
        loss_weight: per-position weight of the loss (e.g. a lower weight for pad filler).
            Defaults to 1 on ``loss_mask``.
        metric_mask: positions counted in ``seq_nelbo``/``seq_tokens`` (default: ``loss_weight > 0``).
        normalizer: what the weighted sum is divided by. Pass the *global* weight total (all ranks,
            all micro-batches of the optimizer step) so gradients do not depend on how tokens fall
            across ranks (dLLM normalises per device). Defaults to this batch's total.
        generator: RNG for the masks (use a per-rank stream), or
        uniforms: precomputed uniforms ``[B, L]`` for the masks (see :func:`counter_uniform_at`).
        groups: ``[B, L]`` index of the sequence (example) each position belongs to, ``-1`` for none;
            ``seq_nelbo``/``seq_tokens`` are then per group (``num_groups`` entries) instead of per row.
    """
    loss_mask = loss_mask.bool()
    if loss_weight is None:
        loss_weight = loss_mask.float()
    else:
        loss_weight = loss_weight.float() * loss_mask
    if metric_mask is None:
        metric_mask = loss_weight > 0
    metric_mask = metric_mask.bool() & loss_mask
    noised, masked = apply_noise(input_ids, loss_mask, schedule.mask_probability(t), mask_id, generator, uniforms)

    query = masked
    if not bool(masked.any()):
        # Nothing masked: still run the head on one position with zero weight, so every parameter
        # takes part in backward (DDP/ZeRO stalled on such steps in dLLM's old code).
        query = torch.zeros_like(masked)
        query.view(-1)[int(loss_mask.view(-1).float().argmax())] = True

    logits = denoiser(noised, attention_mask, query).float()
    rows, cols = query.nonzero(as_tuple=True)
    nll = F.cross_entropy(logits, input_ids[rows, cols], reduction="none")
    live = masked[rows, cols].float()  # 0 for the placeholder position of an empty step
    weights = schedule.weight(t.float())
    w = (weights[rows] if weights.dim() == 1 else weights[rows, cols]) * live
    contrib = w * nll
    weighted = contrib * loss_weight[rows, cols]
    weighted_sum = weighted.sum()
    if normalizer is None:
        normalizer = loss_weight.sum()
    normalizer = torch.as_tensor(normalizer, dtype=weighted_sum.dtype, device=weighted_sum.device)
    loss = weighted_sum / normalizer.clamp_min(1e-8)

    in_metric = metric_mask[rows, cols].to(torch.float64)
    if groups is None:
        group_of, n_groups, token_groups = rows, input_ids.shape[0], None
    else:
        group_of = groups[rows, cols].clamp_min(0)
        n_groups = int(num_groups) if num_groups is not None else int(groups.max()) + 1
        token_groups = groups
    seq_nelbo = torch.zeros(n_groups, dtype=torch.float64, device=input_ids.device)
    seq_nelbo.index_add_(0, group_of, contrib.detach().to(torch.float64) * in_metric)
    if token_groups is None:
        seq_tokens = metric_mask.sum(dim=1).to(torch.float64)
    else:
        seq_tokens = torch.zeros(n_groups, dtype=torch.float64, device=input_ids.device)
        member = metric_mask & (token_groups >= 0)
        seq_tokens.index_add_(0, token_groups[member], torch.ones_like(token_groups[member], dtype=torch.float64))
    return NelboOutput(
        loss=loss,
        seq_nelbo=seq_nelbo,
        seq_tokens=seq_tokens,
        weighted_sum=weighted_sum.detach(),
        num_masked=int(masked.sum()),
    )
