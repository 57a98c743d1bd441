"""An lm-evaluation-harness model (``lm_eval``, PyPI, 0.4.x) for diffusion_lm checkpoints and exports.

Importing this module registers the model name ``diffusion_lm`` with ``lm_eval.api.registry``;
``diffusion-lm eval`` (:mod:`diffusion_lm.cli.evaluate`) does that and runs tasks. Requests:

* ``loglikelihood(context, continuation)``: the Monte-Carlo ELBO of the continuation given the
  context (:func:`~diffusion_lm.likelihood.continuation_elbo`: ``mc_samples`` draws, antithetic times,
  a fixed ``seed``), as LLaDA's and dLLM's evaluation scripts estimate it (Nie et al. 2025, eq. 6).
  With ``format=chat`` (default) the context is the user message of the training chat template and
  the continuation the assistant's whole answer laid out as in training (answer tokens, end token, pad
  filler up to ``canvas_length``), so the score is that of "the answer is exactly this";
  ``format=raw`` scores the plain token stream ``[BOS] context continuation``.
* ``loglikelihood_rolling(text)``: the text in windows of at most ``max_length - 1`` tokens, each
  scored by its ELBO given the tokens before it (as many as fit), in the raw format.
* ``generate_until(context, {until, max_gen_toks})``: the model's ``generate`` (the one text -> answer
  path, sampler preset ``sampler``, canvas ``max_gen_toks`` capped by the model's limit), cut at the
  first stop string.

Needs ``pip install diffusion-lm[eval]``.
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .chat import Turn
from .errors import ConfigError
from .likelihood import continuation_elbo
from .loading import load_for_inference
from .sampling.config import SamplerConfig

__all__ = ["DiffusionLMEval"]

log = logging.getLogger(__name__)


def _flag(value: Union[str, bool]) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


@register_model("diffusion_lm")
class DiffusionLMEval(LM):
    """lm-evaluation-harness model over a diffusion_lm ``.ckpt`` checkpoint or export folder.

    ``model_args`` (``--model_args pretrained=PATH,mc_samples=128``):

    Args:
        pretrained: the checkpoint or export folder (loaded by :mod:`diffusion_lm.loading`).
        mc_samples: Monte-Carlo draws per loglikelihood request.
        seed: seed of every request's draws (the same request always gets the same estimate).
        format: ``chat`` (context = user message, continuation = answer) or ``raw`` (plain tokens).
        canvas_length: answer slots in ``chat`` format (the answer, its end token, pad filler); default:
            the model's; 0: the answer and its end token only.
        sampler: sampler preset (or mapping) for ``generate_until`` (default ``greedy``).
        guidance: classifier-free guidance scale for ``generate_until``.
        batch_size: rows per forward pass of the loglikelihood draws.
        device: ``cpu``, ``cuda`` or ``auto``.
    """

    def __init__(self, pretrained: str, mc_samples: int = 64, seed: int = 1234, format: str = "chat",
                 sampler: Union[str, dict] = "greedy", guidance: float = 0.0,
                 batch_size: Union[int, str, None] = 32, max_batch_size: Optional[int] = None,
                 device: Optional[str] = None, canvas_length: Optional[int] = None, **unused) -> None:
        super().__init__()
        if unused:
            log.warning("diffusion_lm model: ignoring model_args %s", sorted(unused))
        if int(mc_samples) < 1:
            raise ConfigError(f"model_args mc_samples must be >= 1, got {mc_samples}")
        if format not in ("chat", "raw"):
            raise ConfigError(f"model_args format must be chat or raw, got {format!r}")
        self.model = load_for_inference(str(pretrained), device, flag="model_args pretrained")
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self.format = format
        self.canvas_length = int(self.model.hparams.canvas_length if canvas_length is None else canvas_length)
        self.sampler = SamplerConfig.resolve(sampler=sampler, guidance=float(guidance))
        auto = batch_size is None or str(batch_size).startswith("auto")
        self.batch_size = 32 if auto else int(batch_size)

    # -------------------------------------------------------------------------------- helpers
    @property
    def _model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(prefix ids, continuation ids) in the chosen format, the prefix cut from the left to fit."""
        tpl = self.model.template
        if self.format == "chat":
            prefix = tpl.prompt_ids([Turn("user", context.strip() or " ")])
            cont = tpl.answer_ids(continuation.strip())  # the answer and its end token, as in training
            cont += [tpl.pad_id] * (self.canvas_length - len(cont))
        else:
            prefix = ([tpl.bos_id] if tpl.bos_id is not None else []) + tpl.encode_text(context)
            cont = tpl.encode_text(continuation)
        return self._fit(prefix, cont)

    def _fit(self, prefix: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        limit = self.model.max_length
        if len(cont) >= limit:
            raise ConfigError(f"a continuation of {len(cont)} tokens does not fit the model "
                              f"({limit} positions)")
        overflow = len(prefix) + len(cont) - limit
        if overflow > 0:  # keep the first token (BOS) and the end of the context, next to the continuation
            prefix = prefix[:1] + prefix[1 + overflow:]
        return prefix, cont

    def _elbo(self, prefix: list[int], cont: list[int]):
        return continuation_elbo(self.model.denoise, prefix, cont, mask_id=self.model.mask_id,
                                 samples=self.mc_samples, seed=self.seed, batch_size=self.batch_size,
                                 device=self._model_device)

    # ------------------------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(ELBO of the continuation, is_greedy)`` per ``(context, continuation)`` request."""
        out = []
        for request in requests:
            context, continuation = request.args[:2]
            estimate = self._elbo(*self._pair(context, continuation))
            out.append((estimate.loglik, estimate.greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """ELBO of each whole text: raw windows, each given as much of the preceding text as fits."""
        tpl = self.model.template
        bos = [tpl.bos_id] if tpl.bos_id is not None else []
        window = max(1, (self.model.max_length - len(bos)) // 2)
        out = []
        for request in requests:
            ids = tpl.encode_text(request.args[0])
            total = 0.0
            for start in range(0, len(ids), window):
                context = ids[max(0, start - window):start]
                total += self._elbo(bos + context, ids[start:start + window]).loglik
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The model's answer to each context, cut at the first of the request's stop strings."""
        out = []
        for request in requests:
            context, kwargs = request.args[0], dict(request.args[1] if len(request.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            prompt = self.model.prompt_ids(context.strip() or " ")
            room = self.model.max_length - len(prompt)
            canvas = max(1, min(int(kwargs.get("max_gen_toks", self.model.hparams.canvas_length)), room))
            text = self.model.generate([context.strip() or " "], sampler=self.sampler, canvas_length=canvas,
                                       seed=self.seed).texts[0]
            cut = min((text.find(s) for s in until if s and s in text), default=len(text))
            out.append(text[:cut])
        return out
