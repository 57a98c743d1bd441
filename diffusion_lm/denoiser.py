"""The denoiser contract: what the objective, the sampler and the health check call the model as.

Plain torch. A *denoiser* is any callable

    denoiser(input_ids [B, L] long, attention_mask [B, L] long, query [B, L] bool) -> logits [N, V] float32

returning logits only at the ``query`` positions (``N = query.sum()``, rows in the row-major order
of ``query.nonzero()``), with the [MASK] column at ``-inf`` (the model never predicts [MASK]).
Computing the LM head only at the queried positions is what keeps a 256k vocabulary affordable
(dLLM and MDLM materialise full-vocabulary logits at every position).

``MaskedDiffusionLM.denoise`` and :class:`~diffusion_lm.backbone.SparseHeadDenoiser` implement it;
tests use small stubs.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["Denoiser"]


class Denoiser(Protocol):
    """Callable returning float32 logits at the query positions (see the module docstring)."""

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor: ...
