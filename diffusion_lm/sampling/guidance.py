"""Classifier-free guidance (CFG) for the sampler, as a wrapper around the denoiser.

With guidance scale ``w`` the logits at every queried slot become

    l = l_cond + w * (l_cond - l_uncond)

where ``l_cond`` are the logits of the canvas as it is and ``l_uncond`` those of the same canvas with
its conditioning (the prompt; in ``infill`` the text around the holes) replaced by [MASK], the
formulation LLaDA uses for its sampler (Nie et al. 2025, "Large Language Diffusion Models", appendix
B.3; Ho & Salimans 2022 for diffusion models in general). Both branches go through the model in ONE
batched forward (the batch is doubled), so a guided step costs one forward of twice the rows.

``w = 0`` is the unguided sampler: :func:`guided` then returns the denoiser itself (no doubled batch,
hence bitwise the same logits and ids). The wrapper only needs the ``(input_ids, attention_mask,
query)`` contract of :class:`~diffusion_lm.denoiser.Denoiser`, so the sampler's per-step code does
not know about it. Train the unconditional branch with ``model.prompt_dropout`` (off by default): a
model never shown a masked prompt gives an unconditional branch that is merely out of distribution.
"""

from __future__ import annotations

import torch

from ..denoiser import Denoiser
from ..errors import ConfigError

__all__ = ["GuidedDenoiser", "guided"]


class GuidedDenoiser:
    """A denoiser whose logits are classifier-free guided (see the module docstring).

    Args:
        denoiser: the model's denoiser (called once per step, on a doubled batch).
        scale: the guidance scale ``w`` (> 0).
        mask_id: the [MASK] id that replaces the conditioning in the unconditional branch.
        condition: ``[B, W]`` bool, True at the conditioning tokens of each row of the canvas; a call
            on fewer columns (the sampler trims finished rows' padding) reads its first columns.
    """

    def __init__(self, denoiser: Denoiser, scale: float, mask_id: int, condition: torch.Tensor) -> None:
        if not scale > 0:
            raise ConfigError(f"--guidance must be > 0 for a guided denoiser, got {scale}")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.mask_id = int(mask_id)
        self.condition = condition.bool()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 query: torch.Tensor) -> torch.Tensor:
        cond = self.condition[:, : input_ids.shape[1]].to(input_ids.device) & attention_mask.bool()
        unconditional = input_ids.masked_fill(cond, self.mask_id)
        both = self.denoiser(torch.cat([input_ids, unconditional]),
                             torch.cat([attention_mask, attention_mask]), torch.cat([query, query]))
        n = int(query.sum())
        conditional, unconditional_logits = both[:n], both[n:]
        guided_logits = conditional + self.scale * (conditional - unconditional_logits)
        # -inf columns ([MASK], banned tokens) stay -inf instead of becoming inf - inf = nan.
        finite = torch.isfinite(conditional) & torch.isfinite(unconditional_logits)
        return torch.where(finite, guided_logits, conditional)


def guided(denoiser: Denoiser, scale: float, mask_id: int, condition: torch.Tensor) -> Denoiser:
    """``denoiser`` guided with scale ``scale`` (:class:`GuidedDenoiser`), or ``denoiser`` itself when
    ``scale == 0`` (exactly the unguided sampler)."""
    if scale < 0:
        raise ConfigError(f"--guidance must be >= 0 (0 = no guidance), got {scale}")
    if scale == 0:
        return denoiser
    return GuidedDenoiser(denoiser, scale, mask_id, condition)
