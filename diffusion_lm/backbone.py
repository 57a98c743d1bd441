"""Loading encoders and computing logits only where they are needed.

A backbone is a Hugging Face masked-LM (``AutoModelForMaskedLM``) from the hub, a local folder, or a
:class:`ScratchBackbone` config (a model built from scratch, for the demo and tests). The
:class:`Backbone` module splits it into the encoder body and the LM head so the head runs only on
the hidden states of the positions being scored: full-vocabulary logits everywhere would cost
~3 GB per fp32 copy at L=1024 for mmBERT's 256k vocabulary (PITFALLS: dLLM, MDLM).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["ScratchBackbone", "Backbone", "load_backbone", "load_tokenizer", "DEMO_TOKENIZER", "BackboneSpec"]

log = logging.getLogger(__name__)

DEMO_TOKENIZER = str(Path(__file__).parent / "assets" / "demo-tokenizer")


@dataclass
class ScratchBackbone:
    """A randomly initialised encoder built from a config (no download).

    Args:
        model_type: a ``transformers`` model type with a masked-LM class (``modernbert``, ``bert``,
            ``roberta``, ...).
        tokenizer: tokenizer folder or hub id; default: the bundled English+Russian demo tokenizer.
        hidden_size / num_hidden_layers / num_attention_heads / intermediate_size: model size.
        max_position_embeddings: longest sequence.
        config_overrides: any other config fields (e.g. ``{"global_attn_every_n_layers": 2}``).
    """

    model_type: str = "modernbert"
    tokenizer: Optional[str] = None
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    config_overrides: dict[str, Any] = field(default_factory=dict)


BackboneSpec = Union[str, ScratchBackbone]


def load_tokenizer(name_or_path: Optional[str]):
    """Load a tokenizer (the bundled demo tokenizer for ``None``) with a clear error if missing."""
    from transformers import AutoTokenizer

    path = name_or_path or DEMO_TOKENIZER
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"tokenizer {path!r} could not be loaded ({err.__class__.__name__}: {err}). "
            "Give a local tokenizer folder or a hub id you can reach."
        ) from err


def _ensure_special_tokens(tokenizer, model) -> None:
    """Add the tokens the framework needs (mask, pad) and resize the embeddings if any were added."""
    added = {}
    if tokenizer.mask_token is None:
        added["mask_token"] = "[MASK]"
    if tokenizer.pad_token is None:
        added["pad_token"] = "[PAD]"
    if tokenizer.eos_token is None and tokenizer.sep_token is None:
        added["eos_token"] = "</s>"
    if added:
        tokenizer.add_special_tokens(added)
        log.warning("added special tokens %s to the tokenizer; new embedding rows are untrained", added)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _build_scratch(spec: ScratchBackbone, attn_implementation: Optional[str]):
    from transformers import AutoConfig, AutoModelForMaskedLM

    tokenizer = load_tokenizer(spec.tokenizer)
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )
    for name in ("bos_token_id", "cls_token_id"):
        if tokenizer.cls_token_id is not None:
            kwargs[name] = tokenizer.cls_token_id
    for name in ("eos_token_id", "sep_token_id"):
        if tokenizer.sep_token_id is not None:
            kwargs[name] = tokenizer.sep_token_id
    kwargs.update(spec.config_overrides)
    try:
        config = AutoConfig.for_model(spec.model_type, **kwargs)
    except ValueError as err:
        raise ConfigError(f"model.backbone.model_type: {err}") from err
    if attn_implementation:
        config._attn_implementation = attn_implementation
    model = AutoModelForMaskedLM.from_config(config)
    return model, tokenizer


def load_backbone(spec: BackboneSpec, attn_implementation: Optional[str] = "sdpa", dtype: Optional[torch.dtype] = None):
    """Load ``(model, tokenizer)`` for a hub id, a local folder, or a :class:`ScratchBackbone`."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    if isinstance(spec, dict):
        spec = ScratchBackbone(**spec)
    if isinstance(spec, ScratchBackbone):
        return _build_scratch(spec, attn_implementation)
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"model.backbone must be a hub id, a local folder or a ScratchBackbone config, got {spec!r}")
    local = os.path.isdir(spec)
    if not local and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise ConfigError(
            f"model.backbone={spec!r}: no such folder. Give an existing local model folder or a hub id such as "
            "'deepvk/RuModernBERT-base'."
        )
    kwargs: dict[str, Any] = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        try:
            model = AutoModelForMaskedLM.from_pretrained(spec, **kwargs)
        except ValueError as err:
            if "attn_implementation" in kwargs and "attention" in str(err).lower():
                log.warning("%s: %s; falling back to the eager attention implementation", spec, err)
                kwargs["attn_implementation"] = "eager"
                model = AutoModelForMaskedLM.from_pretrained(spec, **kwargs)
            else:
                raise
    except OSError as err:
        where = "local folder" if local else "hub id"
        raise ConfigError(
            f"model.backbone={spec!r} ({where}) could not be loaded: {err}. Check the path or hub id, "
            "your network / HF_HUB_OFFLINE setting, and that the folder holds config.json, weights and a tokenizer."
        ) from err
    _ensure_special_tokens(tokenizer, model)
    return model, tokenizer


# --------------------------------------------------------------------------- head split
def _modernbert_head(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return m.decoder(m.head(h))


def _bert_head(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return m.cls(h)


def _roberta_head(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return m.lm_head(h)


def _distilbert_head(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return m.vocab_projector(m.vocab_layer_norm(m.activation(m.vocab_transform(h))))


# model_type -> LM head of a *ForMaskedLM model applied to hidden states. Module-level functions
# (not closures) so the Backbone pickles for ddp_spawn.
HEADS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "modernbert": _modernbert_head,
    "bert": _bert_head,
    "roberta": _roberta_head,
    "xlm-roberta": _roberta_head,
    "camembert": _roberta_head,
    "distilbert": _distilbert_head,
}


class Backbone(nn.Module):
    """A masked LM split into body (all positions) and head (selected positions only).

    ``Backbone(model)(input_ids, attention_mask, query)`` is the *denoiser* contract of
    :mod:`diffusion_lm.objective` and the sampler: float32 logits at the ``query`` positions with the
    [MASK] column at -inf (the model never predicts [MASK]; a large negative constant overflowed fp16
    in MDLM, mdlm#7, so we fill -inf after casting to float32).
    """

    def __init__(self, model: nn.Module, mask_id: int) -> None:
        super().__init__()
        self.model = model
        self.mask_id = mask_id
        model_type = getattr(model.config, "model_type", "")
        self._head = HEADS.get(model_type)
        if self._head is None:
            log.warning(
                "no head split registered for model_type=%r: logits are computed at every position, then gathered",
                model_type,
            )

    @property
    def body(self) -> nn.Module:
        return self.model.base_model

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``[B, L, H]`` of the encoder body."""
        return self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on selected hidden states ``[N, H]`` -> float32 logits ``[N, V]``, [MASK] at -inf."""
        logits = self._head(self.model, hidden).float()
        logits[..., self.mask_id] = float("-inf")
        return logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        if self._head is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[query].float()
            logits[..., self.mask_id] = float("-inf")
            return logits
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.head_logits(hidden[query])


def describe(spec: BackboneSpec) -> dict:
    """A JSON-friendly description of a backbone spec (for metadata and model cards)."""
    return asdict(spec) if isinstance(spec, ScratchBackbone) else {"name_or_path": spec}
