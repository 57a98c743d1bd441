"""The per-step view of the batch that policies and logits processors read.

The sampler owns the state; each forward pass it builds one :class:`StepContext` for the rows still
being decoded (finished rows are already dropped) and hands it, read-only, to the processors,
proposer and scorer. Tensors are on the denoiser's device; the ``*_cpu`` copies serve the few
policies that walk tokens in Python (n-gram blocking).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["StepContext"]


@dataclass
class StepContext:
    """State of the active rows at one denoising step.

    Shapes: ``b`` active rows, ``w`` positions (trimmed to the longest active row), ``N`` queried
    slots (``query.sum()``), in the row-major order of ``query.nonzero()``.

    Attributes:
        ids: ``[b, w]`` current tokens (``mask_id`` at undecided slots, ``pad_id`` past a row's end).
        attention_mask: ``[b, w]`` 1 for real tokens, 0 for batch padding.
        editable: ``[b, w]`` slots the sampler writes (the canvas in ``generate``, the holes in ``infill``).
        masked: ``[b, w]`` editable slots still holding ``mask_id``.
        region: ``[b, w]`` the text that counts as "the answer" for repetition checks.
        query: ``[b, w]`` slots scored this step (masked slots of the current window).
        q_rows, q_pos: ``[N]`` row and position of each queried slot.
        generators: one ``torch.Generator`` per active row, on the logits device, seeded from
            ``(seed, global row index)`` so a row's draws never depend on its batch neighbours.
        flexible: ``[b, w]`` hole slots that may stay empty (pad) in ``infill``'s variable-length holes;
            None outside ``infill``.
        vectorized: the step is the vectorised one (:mod:`~diffusion_lm.sampling.fast`): processors
            use their tensor implementations, and the ``*_cpu`` fields hold the device tensors.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    editable: torch.Tensor
    masked: torch.Tensor
    region: torch.Tensor
    query: torch.Tensor
    q_rows: torch.Tensor
    q_pos: torch.Tensor
    mask_id: int
    eos_id: int
    pad_id: int
    generators: list[torch.Generator]
    ids_cpu: torch.Tensor
    region_cpu: torch.Tensor
    known_cpu: torch.Tensor
    flexible: Optional[torch.Tensor] = None
    vectorized: bool = False
    _distance: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def known(self) -> torch.Tensor:
        """``[b, w]`` positions whose token is visible context (real and not masked)."""
        return self.attention_mask.bool() & ~self.masked

    @property
    def rows_counts(self) -> list[int]:
        """Number of queried slots per active row (queries are grouped by row, in row order)."""
        return self.query.sum(dim=1).tolist()

    def query_distance(self) -> torch.Tensor:
        """``[N]`` distance from each queried slot to the nearest known token (prompt or committed).

        Slots with no known token anywhere in their row get the row width.
        """
        if self._distance is None:
            known = self.known
            b, w = known.shape
            pos = torch.arange(w, device=known.device).expand(b, w)
            big = 4 * w + 4
            left = torch.where(known, pos, torch.full_like(pos, -big)).cummax(dim=1).values
            right = torch.where(known, pos, torch.full_like(pos, big)).flip(1).cummin(dim=1).values.flip(1)
            dist = torch.minimum(pos - left, right - pos).clamp_max(w)
            self._distance = dist[self.q_rows, self.q_pos]
        return self._distance

    def split_by_row(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Split an ``[N, ...]`` tensor into one chunk per active row."""
        return list(torch.split(values, self.rows_counts))
