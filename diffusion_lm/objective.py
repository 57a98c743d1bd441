"""The forward masking process and the masked-diffusion NELBO (MDLM / SUBS, continuous time).

Plain torch, no Lightning. The model is any *denoiser* (:mod:`diffusion_lm.denoiser`): logits
only at the queried (masked) positions, with the [MASK] column at -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .denoiser import Denoiser
from .schedules import NoiseSchedule
from .seeding import counter_uniform, counter_uniform_at

__all__ = [
    "Denoiser",
    "NelboOutput",
    "apply_noise",
    "counter_uniform",
    "counter_uniform_at",
    "masked_diffusion_nelbo",
    "masked_token_accuracy",
]

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
    u = uniforms if uniforms is not None else torch.rand(input_ids.shape, generator=generator,
                                                         device=input_ids.device)
    p = mask_probability.to(u.dtype)
    masked = (u < (p.unsqueeze(1) if p.dim() == 1 else p)) & loss_mask.bool()
    return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids), masked


def masked_diffusion_nelbo(
    denoiser: Denoiser,
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
        denoiser: the model (:class:`~diffusion_lm.denoiser.Denoiser`).
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
    noised, masked = apply_noise(input_ids, loss_mask, schedule.mask_probability(t), mask_id, generator,
                                 uniforms)

    query = _query_positions(masked, loss_mask)
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

    seq_nelbo, seq_tokens = _per_sequence(contrib.detach(), rows, cols, metric_mask, groups, num_groups)
    return NelboOutput(
        loss=loss,
        seq_nelbo=seq_nelbo,
        seq_tokens=seq_tokens,
        weighted_sum=weighted_sum.detach(),
        num_masked=int(masked.sum()),
    )


def _query_positions(masked: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The positions whose logits are computed: the masked ones. When nothing is masked, one
    position of ``loss_mask`` (it gets zero weight), so every parameter still takes part in backward
    (DDP/ZeRO stalled on such steps in dLLM's old code)."""
    if bool(masked.any()):
        return masked
    query = torch.zeros_like(masked)
    query.view(-1)[int(loss_mask.view(-1).float().argmax())] = True
    return query


def _per_sequence(contrib: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, metric_mask: torch.Tensor,
                  groups: torch.Tensor | None, num_groups: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """NELBO sums and token counts (float64) per row, or per group (example) of ``groups``."""
    in_metric = metric_mask[rows, cols].to(torch.float64)
    device = metric_mask.device
    if groups is None:
        seq_nelbo = torch.zeros(metric_mask.shape[0], dtype=torch.float64, device=device)
        seq_nelbo.index_add_(0, rows, contrib.to(torch.float64) * in_metric)
        return seq_nelbo, metric_mask.sum(dim=1).to(torch.float64)
    n_groups = int(num_groups) if num_groups is not None else int(groups.max()) + 1
    seq_nelbo = torch.zeros(n_groups, dtype=torch.float64, device=device)
    seq_nelbo.index_add_(0, groups[rows, cols].clamp_min(0), contrib.to(torch.float64) * in_metric)
    member = metric_mask & (groups >= 0)
    seq_tokens = torch.zeros(n_groups, dtype=torch.float64, device=device)
    seq_tokens.index_add_(0, groups[member], torch.ones_like(groups[member], dtype=torch.float64))
    return seq_nelbo, seq_tokens


@torch.no_grad()
def masked_token_accuracy(
    denoiser: Denoiser,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    rate: float,
    mask_id: int,
    uniforms: torch.Tensor,
    *,
    metric_mask: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    num_groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-token accuracy at one fixed mask ``rate``: mask each ``loss_mask`` token w.p. ``rate`` (from
    ``uniforms``, so the same tokens are masked at every evaluation) and count argmax hits.

    A fixed rate makes checkpoints and backbones comparable where the NELBO mixes all rates: 0.15 is
    BERT's pretraining rate, 0.9 is close to the all-[MASK] start of generation. Returns ``(correct,
    total)`` per row, or per group when ``groups`` (``[B, L]`` example index, -1 for none) is given;
    only ``metric_mask`` positions count (default: ``loss_mask``).
    """
    loss_mask = loss_mask.bool()
    metric = (loss_mask if metric_mask is None else metric_mask.bool() & loss_mask)
    rate_t = torch.full((input_ids.shape[0],), float(rate), device=input_ids.device)
    noised, masked = apply_noise(input_ids, loss_mask, rate_t, mask_id, uniforms=uniforms)
    scored = masked & metric
    n = int(num_groups) if groups is not None and num_groups is not None else input_ids.shape[0]
    correct = torch.zeros(n, dtype=torch.float64, device=input_ids.device)
    total = torch.zeros(n, dtype=torch.float64, device=input_ids.device)
    if not bool(scored.any()):
        return correct, total
    logits = denoiser(noised, attention_mask, scored)
    rows, cols = scored.nonzero(as_tuple=True)
    hit = (logits.argmax(dim=-1) == input_ids[rows, cols]).to(torch.float64)
    owner = rows if groups is None else groups[rows, cols].clamp_min(0)
    correct.index_add_(0, owner, hit)
    total.index_add_(0, owner, torch.ones_like(hit))
    return correct, total
