"""Loading encoders and computing logits only where they are needed.

A backbone is a Hugging Face masked-LM (``AutoModelForMaskedLM``) from the hub, a local folder, or a
:class:`ScratchBackbone` config (a model built from scratch, for the demo and tests);
:func:`load_backbone` returns it as a :class:`LoadedBackbone`. The :class:`SparseHeadDenoiser`
module splits it into the encoder body and the LM head so the head runs only on the hidden states
of the positions being scored: full-vocabulary logits everywhere would cost ~3 GB per fp32 copy at
L=1024 for mmBERT's 256k vocabulary (dLLM and MDLM do).

Families (see ``docs/models.md``):

* ModernBERT (RuModernBERT, mmBERT, ettin, ModernBERT), BERT, RoBERTa, XLM-R, DistilBERT: the
  pretrained MLM head is used as is.
* T5 encoders (FRIDA): transformers has no masked-LM class for T5, so :class:`T5EncoderForMaskedLM`
  (the T5 encoder plus a fresh LM head tied to the input embeddings) is registered with
  ``AutoModelForMaskedLM`` when :mod:`diffusion_lm` is imported. A T5 tokenizer has no mask token;
  one is added and the embeddings are resized.

Tokenizers without a mask, pad or end token get one (and the embeddings grow when needed); a
model config lacking pad/eos/bos ids gets the tokenizer's.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, T5Config
from transformers import initialization as hf_init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.t5.modeling_t5 import T5LayerNorm, T5PreTrainedModel, T5Stack

from .errors import ConfigError

__all__ = [
    "ScratchBackbone",
    "Backbone",
    "BackboneSpec",
    "LoadedBackbone",
    "SparseHeadDenoiser",
    "PACKING_ATTENTION",
    "DEMO_TOKENIZER",
    "FAMILIES",
    "Family",
    "T5EncoderForMaskedLM",
    "ensure_special_tokens",
    "load_backbone",
    "load_tokenizer",
    "resolve_attn_implementation",
    "segment_positions",
]

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


@dataclass(frozen=True)
class LoadedBackbone:
    """What :func:`load_backbone` returns.

    Attributes:
        model: the Hugging Face masked LM (in train mode; its config has pad/eos/bos/mask ids).
        tokenizer: its tokenizer, with the mask, pad and end tokens the framework needs.
        fresh_head: True when the checkpoint had no MLM head (e.g. FRIDA), so the head is untrained.
        new_weights: state-dict keys of ``model`` that loading the same spec again would not reproduce
            (a fresh head, embedding rows of added tokens; every key of a model built from a config):
            a checkpoint of a model that freezes the rest (``model.peft``) must still hold them.

    It unpacks as ``model, tokenizer = load_backbone(...)``.
    """

    model: nn.Module
    tokenizer: Any
    fresh_head: bool = False
    new_weights: tuple[str, ...] = ()

    def __iter__(self):
        return iter((self.model, self.tokenizer))


# ----------------------------------------------------------------------------- T5 encoder + MLM head
class T5MaskedLMHead(nn.Module):
    """BERT-style prediction head for a T5 encoder: dense -> GELU -> RMSNorm -> scaled tied decoder.

    The decoder weight is tied to the input embeddings (T5 uses a shared, std-1 embedding; the
    ``d_model ** -0.5`` scale is the one T5 applies before its own tied LM head).
    """

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.act = ACT2FN["gelu"]
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.decoder = nn.Linear(config.d_model, config.vocab_size, bias=True)
        self.scale = config.d_model**-0.5

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states -> the vectors the tied decoder scores against every embedding row."""
        return self.layer_norm(self.act(self.dense(hidden))) * self.scale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


class T5EncoderForMaskedLM(T5PreTrainedModel):
    """A T5 encoder with a masked-LM head, so encoder-only T5 checkpoints (FRIDA) load as an MLM.

    Parameter names of the body match ``T5EncoderModel`` (``shared``, ``encoder.*``), so a
    ``T5EncoderModel`` or a full T5 checkpoint loads into it; the head (``lm_head.*``) is new unless
    the checkpoint was saved from this class (a ``diffusion-lm export``). Registered with
    ``AutoModelForMaskedLM`` for ``T5Config`` on ``import diffusion_lm``: plain transformers needs
    that import to load an exported T5-family model (there is no T5 masked-LM class upstream).
    """

    _tied_weights_keys = {"encoder.embed_tokens.weight": "shared.weight",
                          "lm_head.decoder.weight": "shared.weight"}
    # A full T5 checkpoint also carries a decoder stack and a seq2seq LM head: not ours.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^lm_head\.weight$"]
    config_class = T5Config

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        config.use_cache = False
        config.is_encoder_decoder = False
        config.is_decoder = False
        self.encoder = T5Stack(config)
        self.lm_head = T5MaskedLMHead(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        factor = self.config.initializer_factor
        head = getattr(self, "lm_head", None)
        if head is not None and module is head.dense:
            hf_init.normal_(module.weight, mean=0.0, std=factor * self.config.d_model**-0.5)
            hf_init.zeros_(module.bias)
        elif head is not None and module is head.decoder:
            hf_init.zeros_(module.bias)  # the weight is the (tied) input embedding
        else:
            super()._init_weights(module)
            if isinstance(module, T5EncoderForMaskedLM):
                hf_init.normal_(module.shared.weight, mean=0.0, std=factor * 1.0)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.shared = new_embeddings
        self.encoder.set_input_embeddings(new_embeddings)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        **kwargs: Any,
    ) -> MaskedLMOutput:
        """Logits ``[B, L, V]`` at every position (and the MLM loss when ``labels`` are given)."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                           **kwargs)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            flat = logits.float().view(-1, logits.shape[-1])
            loss = nn.functional.cross_entropy(flat, labels.view(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                              attentions=out.attentions)


# exist_ok=True: transformers silently skips registering a native config class otherwise.
AutoModelForMaskedLM.register(T5Config, T5EncoderForMaskedLM, exist_ok=True)


# ----------------------------------------------------------------------------- families (body / head split)
def _base_body(m: nn.Module, input_ids: torch.Tensor, attention_mask: Any, position_ids=None) -> torch.Tensor:
    extra = {"position_ids": position_ids} if position_ids is not None else {}
    return m.base_model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state


def _t5_body(m: nn.Module, input_ids: torch.Tensor, attention_mask: Any, position_ids=None) -> torch.Tensor:
    # T5's relative position bias is computed from in-row distances: inside a segment they are the
    # segment's own, so packed rows need no position ids.
    return m.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _modernbert_head(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return m.decoder(m.head(h))


def _bert_head(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return m.cls(h)


def _lm_head(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return m.lm_head(h)


def _distilbert_head(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return m.vocab_projector(m.vocab_layer_norm(m.activation(m.vocab_transform(h))))


def _no_offset(m: nn.Module) -> int:
    return 0


def _roberta_offset(m: nn.Module) -> int:
    # RoBERTa-style embeddings number positions from padding_idx + 1 (fairseq's convention).
    return int(m.config.pad_token_id) + 1


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` position of every token inside its segment (0 at each segment's first token)."""
    b, length = segments.shape
    pos = torch.arange(length, device=segments.device).expand(b, length)
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return pos - torch.where(start, pos, torch.zeros_like(pos)).cummax(dim=1).values


def _embeds_like(m: nn.Module, segments: torch.Tensor) -> torch.Tensor:
    """A zero-width stand-in for ``inputs_embeds``: transformers' mask helpers read only its shape,
    dtype and device."""
    return torch.empty(*segments.shape, 0, dtype=m.get_input_embeddings().weight.dtype,
                       device=segments.device)


def _combine(m: nn.Module, same: torch.Tensor, base: Any) -> Any:
    """``same`` (a [B, 1, L, L] same-segment bool mask) in the format of the model's attention
    implementation, intersected with ``base`` (a mask transformers built, or None)."""
    impl = m.config._attn_implementation
    if impl == "sdpa":  # boolean, True = attend
        return same if base is None else same & base
    dtype = m.get_input_embeddings().weight.dtype  # eager: additive float
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill_(~same, lowest)
    return mask if base is None else torch.minimum(mask, base)


def _segment_mask(m: nn.Module, segments: torch.Tensor, base_factory: Optional[Callable] = None) -> Any:
    """A 4D bidirectional mask in which a token sees only tokens of its own segment, in the format the
    model's attention implementation takes; ``base_factory`` (a transformers mask helper) adds the
    family's own restriction, e.g. a sliding window."""
    from transformers.masking_utils import create_bidirectional_mask, packed_sequence_mask_function

    factory = base_factory or create_bidirectional_mask
    if m.config._attn_implementation in ("sdpa", "eager"):
        # Built directly: transformers' mask functions (vmap over every query/key pair) cost more
        # than a small model's whole forward pass on a CPU.
        same = segments[:, None, :, None] == segments[:, None, None, :]
        base = factory(config=m.config, inputs_embeds=_embeds_like(m, segments), attention_mask=None)
        return _combine(m, same, base)
    return factory(config=m.config, inputs_embeds=_embeds_like(m, segments), attention_mask=None,
                   and_mask_function=packed_sequence_mask_function(segments))


def _modernbert_segment_mask(m: nn.Module, segments: torch.Tensor) -> Any:
    """ModernBERT alternates global and sliding-window layers: one segment mask per layer type."""
    from transformers.masking_utils import create_bidirectional_sliding_window_mask

    return {
        "full_attention": _segment_mask(m, segments),
        "sliding_attention": _segment_mask(m, segments, create_bidirectional_sliding_window_mask),
    }


@dataclass(frozen=True)
class Family:
    """How one architecture splits into body and LM head.

    Attributes:
        body: ``(model, input_ids, attention_mask, position_ids=None) -> last hidden states [B, L, H]``.
        head: ``(model, hidden [N, H]) -> logits [N, V]`` (the pretrained MLM head).
        head_prefixes: parameter-name prefixes of the head; if a checkpoint lacks them the head is
            freshly initialised (the model has no MLM ability yet, and the loader says so).
        segment_mask: ``(model, segments [B, L]) -> attention mask`` for packed rows (a token attends
            only to its own segment).
        position_offset: ``model -> int`` added to in-segment positions, or None when the family
            takes no position ids (relative positions).
    """

    body: Callable[..., torch.Tensor]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    head_prefixes: tuple[str, ...]
    segment_mask: Callable[[nn.Module, torch.Tensor], Any] = _segment_mask
    position_offset: Optional[Callable[[nn.Module], int]] = _no_offset


# model_type -> family. Module-level functions (not closures) so the denoiser pickles for ddp_spawn.
FAMILIES: dict[str, Family] = {
    "modernbert": Family(_base_body, _modernbert_head, ("head.", "decoder."), _modernbert_segment_mask),
    "bert": Family(_base_body, _bert_head, ("cls.",)),
    "roberta": Family(_base_body, _lm_head, ("lm_head.",), position_offset=_roberta_offset),
    "xlm-roberta": Family(_base_body, _lm_head, ("lm_head.",), position_offset=_roberta_offset),
    "camembert": Family(_base_body, _lm_head, ("lm_head.",), position_offset=_roberta_offset),
    "distilbert": Family(_base_body, _distilbert_head, ("vocab_",)),
    "t5": Family(_t5_body, _lm_head, ("lm_head.",), position_offset=None),
}


# ----------------------------------------------------------------------------- attention implementation
_ATTN_ALIASES = {
    "auto": None,
    "default": None,
    "sdpa": "sdpa",
    "eager": "eager",
    "flash": "flash_attention_2",
    "flash2": "flash_attention_2",
    "fa2": "flash_attention_2",
    "flash3": "flash_attention_3",
    "fa3": "flash_attention_3",
    "flex": "flex_attention",
}


def resolve_attn_implementation(name: Optional[str]) -> Optional[str]:
    """Map a user-facing attention name to the transformers one.

    ``sdpa`` (the default: fast everywhere, no extra package), ``flash``/``flash_attention_2``,
    ``flash_attention_3``, ``flex``, ``eager``; ``auto``/``None`` lets transformers choose. Other
    strings (e.g. a hub kernel) are passed through unchanged.
    """
    if name is None:
        return None
    key = str(name).strip().lower()
    return _ATTN_ALIASES.get(key, key)


def _fallbacks(requested: Optional[str]) -> list[Optional[str]]:
    """Implementations to try in order: the requested one, then sdpa, then eager."""
    chain = [requested]
    for alt in ("sdpa", "eager"):
        if requested not in (None, "eager") and alt not in chain:
            chain.append(alt)
    return chain


def _load_with_attention(load: Callable[[Optional[str]], Any], requested: Optional[str], what: str):
    """Call ``load(impl)``, falling back to sdpa then eager when ``requested`` is unavailable here
    (flash-attn not installed, CPU, or an architecture without that kernel), with a warning."""
    chain = _fallbacks(requested)
    for i, impl in enumerate(chain):
        try:
            return load(impl)
        except (ImportError, ValueError) as err:
            text = str(err)
            if isinstance(err, ValueError) and "attn_implementation" in text and "is not supported" in text:
                raise ConfigError(f"model.attn_implementation={requested!r}: {text.splitlines()[0]}") from err
            unavailable = isinstance(err,
                                     ImportError) or "does not support" in text or "attention" in text.lower()
            if not unavailable or i == len(chain) - 1:
                raise
            log.warning("%s: attention %r is not available (%s); falling back to %r",
                        what, impl, text.splitlines()[0], chain[i + 1])
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- tokenizers and special tokens
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


def _token_style(tokenizer, word: str) -> str:
    """A new special token in the tokenizer's own style: ``[MASK]`` for BERT-like, ``<mask>`` otherwise."""
    present = [t for t in (tokenizer.pad_token, tokenizer.unk_token, tokenizer.cls_token,
                           tokenizer.sep_token) if t]
    if any(str(t).startswith("[") for t in present):
        return f"[{word.upper()}]"
    return f"<{word.lower()}>"


def ensure_special_tokens(tokenizer, model: Optional[nn.Module] = None) -> dict[str, str]:
    """Give the tokenizer the tokens the framework needs, grow the embeddings, fill config ids.

    * mask token: added if missing (T5 / FRIDA has none);
    * pad token: added if missing, or if it equals the only end token (GPT-2 style tokenizers alias
      them; the model would learn to fill the canvas with its end token, as in dLLM);
    * end token: EOS (distinct from PAD) or SEP; ``</s>`` / ``[SEP]`` added if neither exists.

    New tokens get new embedding rows (``resize_token_embeddings``, mean-initialised) when the
    vocabulary outgrows the embedding matrix. Returns the tokens that were added.
    """
    added: dict[str, str] = {}
    if tokenizer.mask_token is None:
        added["mask_token"] = _token_style(tokenizer, "mask")
    pad, eos, sep = tokenizer.pad_token, tokenizer.eos_token, tokenizer.sep_token
    if pad is None or (pad == eos and sep in (None, pad)):
        added["pad_token"] = _token_style(tokenizer, "pad")
    if (eos is None or eos == pad) and sep in (None, pad) and "pad_token" not in added:
        added["eos_token"] = "[SEP]" if _token_style(tokenizer, "x").startswith("[") else "</s>"
    if added:
        tokenizer.add_special_tokens(added)
        log.warning("added special tokens %s to the tokenizer; their embedding rows are new and untrained",
                    added)
    if model is None:
        return added
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    end = eos_id if eos_id not in (None, pad_id) else tokenizer.sep_token_id
    bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    for attr, value in (("pad_token_id", tokenizer.pad_token_id), ("eos_token_id", end),
                        ("bos_token_id", bos)):
        if getattr(model.config, attr, None) is None and value is not None:
            setattr(model.config, attr, value)
    if getattr(model.config, "mask_token_id", None) is None:
        model.config.mask_token_id = tokenizer.mask_token_id
    return added


# ----------------------------------------------------------------------------- loading
def _build_scratch(spec: ScratchBackbone, attn_implementation: Optional[str]):
    from transformers import AutoConfig

    tokenizer = load_tokenizer(spec.tokenizer)
    ensure_special_tokens(tokenizer)
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
    model = _load_with_attention(
        lambda impl: AutoModelForMaskedLM.from_config(config,
                                                      **({"attn_implementation": impl} if impl else {})),
        resolve_attn_implementation(attn_implementation),
        f"scratch {spec.model_type}",
    )
    ensure_special_tokens(tokenizer, model)
    return LoadedBackbone(model, tokenizer, new_weights=tuple(model.state_dict()))


def _warn_fresh_head(spec: str, model: nn.Module, missing: list[str]) -> bool:
    family = FAMILIES.get(getattr(model.config, "model_type", ""))
    prefixes = family.head_prefixes if family else ()
    head_missing = [k for k in missing if k.startswith(prefixes)] if prefixes else []
    if head_missing:
        log.warning(
            "%s has no masked-LM head in its checkpoint (%d head weights freshly initialised, e.g. %s): it "
            "cannot predict masked tokens until fine-tuned. Expect the MLM health check to flag it; "
            "conversion works best from a model pretrained with MLM.",
            spec,
            len(head_missing),
            head_missing[0],
        )
    elif missing:
        log.warning("%s: %d weights were not in the checkpoint and are freshly initialised (e.g. %s)",
                    spec, len(missing), missing[0])
    return bool(head_missing)


def load_backbone(
    spec: BackboneSpec, attn_implementation: Optional[str] = "sdpa", dtype: Optional[torch.dtype] = None
) -> LoadedBackbone:
    """Load the model and tokenizer of a hub id, a local folder, or a :class:`ScratchBackbone`.

    Hub ids and folders go through ``AutoTokenizer`` / ``AutoModelForMaskedLM.from_pretrained``
    (no remote code). ``attn_implementation``: ``sdpa`` (default), ``flash`` /
    ``flash_attention_2``, ``eager``, ``flex`` or ``auto``; an implementation that is not available
    here falls back to sdpa, then eager, with a warning. ``fresh_head`` of the result is True when
    the checkpoint had no MLM head (e.g. FRIDA), so the head is untrained.
    """
    from transformers import AutoTokenizer

    if isinstance(spec, dict):
        spec = ScratchBackbone(**spec)
    if isinstance(spec, ScratchBackbone):
        return _build_scratch(spec, attn_implementation)
    if not isinstance(spec, str) or not spec:
        raise ConfigError(
            f"model.backbone must be a hub id, a local folder or a ScratchBackbone config, got {spec!r}"
        )
    local = os.path.isdir(spec)
    if not local and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise ConfigError(
            f"model.backbone={spec!r}: no such folder. Give an existing local model folder or a hub id such "
            "as 'deepvk/RuModernBERT-base'."
        )
    base_kwargs: dict[str, Any] = {"output_loading_info": True}
    if dtype is not None:
        base_kwargs["dtype"] = dtype

    def load(impl: Optional[str]):
        kwargs = dict(base_kwargs, **({"attn_implementation": impl} if impl else {}))
        return AutoModelForMaskedLM.from_pretrained(spec, **kwargs)

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model, info = _load_with_attention(load, resolve_attn_implementation(attn_implementation), spec)
    except OSError as err:
        where = "local folder" if local else "hub id"
        raise ConfigError(
            f"model.backbone={spec!r} ({where}) could not be loaded: {err}. Check the path or hub id, "
            "your network / HF_HUB_OFFLINE setting, and that the folder holds config.json, weights and a "
            "tokenizer."
        ) from err
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ConfigError(
                f"model.backbone={spec!r}: its architecture has no masked-LM class in transformers. "
                f"Supported families: {', '.join(sorted(FAMILIES))} (see docs/models.md)."
            ) from err
        raise
    missing = list(info.get("missing_keys", []))
    fresh_head = _warn_fresh_head(spec, model, missing)
    rows = model.get_input_embeddings().num_embeddings
    ensure_special_tokens(tokenizer, model)
    if model.get_input_embeddings().num_embeddings != rows:  # added tokens: new (random) embedding rows
        missing += _embedding_keys(model)
    # from_pretrained returns eval mode; Lightning keeps submodule modes as found, so a hub backbone
    # would fine-tune with its dropout silently off. Callers switch to eval for inference.
    model.train()
    return LoadedBackbone(model, tokenizer, fresh_head, tuple(dict.fromkeys(missing)))


def _embedding_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the input and output embedding tensors (tied copies included)."""
    out = model.get_output_embeddings()
    tensors = [model.get_input_embeddings().weight] + ([] if out is None else [out.weight])
    if out is not None and getattr(out, "bias", None) is not None:
        tensors.append(out.bias)
    ptrs = {t.data_ptr() for t in tensors}
    return [k for k, v in model.state_dict().items() if v.data_ptr() in ptrs]


# ----------------------------------------------------------------------------- the denoiser module
# Attention implementations that take an arbitrary 4D mask (packed rows need a block-diagonal one).
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention")


class SparseHeadDenoiser(nn.Module):
    """A masked LM split into body (all positions) and head (selected positions only).

    ``SparseHeadDenoiser(model, mask_id)(input_ids, attention_mask, query)`` is the *denoiser*
    (:class:`~diffusion_lm.denoiser.Denoiser`) of the objective, the sampler and the health check:
    float32 logits at the ``query`` positions with the [MASK] column at -inf (the model never
    predicts [MASK]; a large negative constant overflowed fp16 in MDLM, mdlm#7, so we fill -inf
    after casting to float32).

    ``attention_mask`` is 0 on padding. Values above 1 mark *packed* rows: each value is a segment
    (one example), tokens attend only inside their segment and positions restart at every segment,
    so a packed row computes what its examples would compute in rows of their own.
    """

    def __init__(self, model: nn.Module, mask_id: int) -> None:
        super().__init__()
        self.model = model
        self.mask_id = mask_id
        model_type = getattr(model.config, "model_type", "")
        self._family = FAMILIES.get(model_type)
        if self._family is None:
            log.warning(
                "no body/head split registered for model_type=%r: "
                "logits are computed at every position, then gathered",
                model_type,
            )

    @property
    def vocab_size(self) -> int:
        """Number of logits per position (the output embedding's rows)."""
        head = self.model.get_output_embeddings()
        return int(head.weight.shape[0]) if head is not None else int(self.model.config.vocab_size)

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed: Optional[bool] = None
    ) -> torch.Tensor:
        """Last hidden states ``[B, L, H]`` of the encoder body (``packed``: None infers it from the mask)."""
        family = self._family
        if packed is None:
            packed = bool(attention_mask.max() > 1)
        if not packed:
            body = family.body if family is not None else _base_body
            return body(self.model, input_ids, attention_mask)
        if family is None:
            raise ConfigError(
                f"packed rows need a registered family; model_type={self.model.config.model_type!r} has none "
                "(set data.batching: padded)"
            )
        impl = getattr(self.model.config, "_attn_implementation", None)
        if impl not in PACKING_ATTENTION:
            raise ConfigError(
                f"packed rows need an attention implementation that takes a block-diagonal mask "
                f"({', '.join(PACKING_ATTENTION)}), not {impl!r}: set model.attn_implementation: sdpa "
                "or data.batching: padded"
            )
        # Padding (0) becomes a segment of its own: it never reaches real tokens and no row is empty.
        segments = attention_mask.long()
        mask = family.segment_mask(self.model, segments)
        positions = None
        if family.position_offset is not None:
            positions = segment_positions(segments) + family.position_offset(self.model)
        return family.body(self.model, input_ids, mask, positions)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on selected hidden states ``[N, H]`` -> float32 logits ``[N, V]``, [MASK] at -inf."""
        logits = self._family.head(self.model, hidden).float()
        logits[..., self.mask_id] = float("-inf")
        return logits

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query: torch.Tensor,
                packed: Optional[bool] = None
    ) -> torch.Tensor:
        if self._family is None and not packed:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[query].float()
            logits[..., self.mask_id] = float("-inf")
            return logits
        hidden = self.hidden_states(input_ids, attention_mask, packed)
        return self.head_logits(hidden[query])


class Backbone(SparseHeadDenoiser):
    """Deprecated name of :class:`SparseHeadDenoiser` (``Backbone`` also named the backbone spec and the
    ``model.backbone`` option); it warns once and behaves the same."""

    def __init__(self, model: nn.Module, mask_id: int) -> None:
        warnings.warn("diffusion_lm.backbone.Backbone is deprecated: use SparseHeadDenoiser",
                      DeprecationWarning, stacklevel=2)
        super().__init__(model, mask_id)


def describe(spec: BackboneSpec) -> dict:
    """A JSON-friendly description of a backbone spec (for metadata and model cards)."""
    if isinstance(spec, ScratchBackbone):
        return asdict(spec)
    if isinstance(spec, dict):  # a ScratchBackbone as a checkpoint's hparams or LightningCLI store it
        return asdict(ScratchBackbone(**spec))
    return {"name_or_path": spec}
