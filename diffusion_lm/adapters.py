"""Parameter-efficient fine-tuning: LoRA adapters (through ``peft``) on the encoder.

``model.peft: {method: lora, r: 8, alpha: 16, dropout: 0.05}`` injects low-rank adapters (Hu et al.
2021, "LoRA: Low-Rank Adaptation of Large Language Models") into the attention and feed-forward
projections of the backbone and freezes everything else, except, by option, the LM head (trained by
default when it is fresh, e.g. FRIDA's, or when the model is built from a config) and the input
embeddings. The adapters live inside the Hugging Face model (``peft.inject_adapter_in_model``), so
the body/head split of :class:`~diffusion_lm.backbone.SparseHeadDenoiser` works unchanged.

:func:`merged_copy` folds the adapters into the weights (a plain Hugging Face model, what ``export``
writes by default); :func:`adapter_state` gives the ``peft`` adapter tensors (``export --merge false``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

from torch import nn

from .errors import ConfigError

__all__ = ["DEFAULT_TARGET_MODULES", "LoraAdapter", "PeftOptions", "adapter_state", "apply_lora", "base_copy",
           "load_adapter_state", "merged_copy"]

# model_type -> the Linear layers that get adapters: every attention and feed-forward projection of
# the encoder (never the LM head: module names are matched as suffixes, and these never end a head's).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "modernbert": ["Wqkv", "Wo", "Wi"],
    # BERT-style layers: encoder.layer.<i>.{attention.output,output}.dense both end in "output.dense"
    "bert": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "roberta": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "xlm-roberta": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "camembert": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
}


@dataclass
class PeftOptions:
    """``model.peft``: parameter-efficient fine-tuning of the backbone.

    Args:
        method: ``lora`` (the one method so far).
        r: rank of each adapter.
        alpha: LoRA scaling numerator (the update is ``alpha / r * B @ A``).
        dropout: dropout on the adapters' input.
        target_modules: names (suffixes) of the Linear layers that get adapters; default: every
            attention and feed-forward projection of the family (:data:`DEFAULT_TARGET_MODULES`).
        train_head: train the LM head too; default (None): only when it is fresh (no MLM head in the
            checkpoint) or the backbone is built from a config. A head matrix tied to the input
            embeddings follows ``train_embeddings``.
        train_embeddings: train the input embeddings (and a head matrix tied to them).
    """

    method: Literal["lora"] = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None
    train_head: Optional[bool] = None
    train_embeddings: bool = False

    @classmethod
    def coerce(cls, value: Union["PeftOptions", Mapping[str, Any]]) -> "PeftOptions":
        """A checked :class:`PeftOptions` from itself or a mapping (a checkpoint's or LightningCLI's
        hparams); a bad value is a one-line :class:`ConfigError` naming the option."""
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ConfigError(f"model.peft: unknown option(s) {sorted(unknown)}; valid: "
                                  f"{[f.name for f in dataclasses.fields(cls)]}")
            value = cls(**value)
        if not isinstance(value, cls):
            raise ConfigError("model.peft must be a mapping of PeftOptions fields, got "
                              f"{type(value).__name__}")
        rules = {
            "method": (lambda v: v == "lora", "must be 'lora'"),
            "r": (lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
            "alpha": (lambda v: v > 0, "must be > 0"),
            "dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
            "target_modules": (lambda v: v is None or (len(v) > 0 and all(isinstance(n, str) and n
                                                                              for n in v)),
                               "must be a non-empty list of module names (or unset: the family's default)"),
        }
        for name, (ok, what) in rules.items():
            if not ok(getattr(value, name)):
                raise ConfigError(f"model.peft.{name} {what}, got {getattr(value, name)!r}")
        return value


@dataclass
class LoraAdapter:
    """What :func:`apply_lora` did: the ``peft.LoraConfig`` and the options it came from."""

    config: Any
    options: PeftOptions


def _targets(model: nn.Module, options: PeftOptions) -> list[str]:
    if options.target_modules:
        return list(options.target_modules)
    model_type = getattr(model.config, "model_type", "")
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ConfigError(f"model.peft.target_modules: no default for model_type {model_type!r}; list the "
                          "Linear layers to adapt (e.g. [query, value])")
    return DEFAULT_TARGET_MODULES[model_type]


def apply_lora(model: nn.Module, options: PeftOptions, head_prefixes: tuple[str, ...],
               train_head: bool) -> LoraAdapter:
    """Inject LoRA adapters into ``model`` (in place) and leave trainable only the adapters, plus the
    head (parameters under ``head_prefixes``) when ``train_head`` and the input embeddings when
    ``options.train_embeddings``."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=_targets(model, options), bias="none")
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ConfigError(f"model.peft.target_modules {config.target_modules}: "
                          f"{str(err).splitlines()[0]}") from None
    embedding = model.get_input_embeddings().weight
    for name, param in model.named_parameters(remove_duplicate=False):
        trainable = "lora_" in name
        if train_head and name.startswith(head_prefixes) and param is not embedding:
            trainable = True
        if options.train_embeddings and param is embedding:
            trainable = True
        param.requires_grad_(trainable)
    return LoraAdapter(config, options)


def _unwrap(model: nn.Module) -> nn.Module:
    """``model`` with every adapter layer replaced by its base layer (after merging, or not)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its LoRA updates folded into the weights and the adapter layers removed:
    a plain Hugging Face model (what ``export`` saves by default)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return _unwrap(merged)


def base_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without its adapters (the base weights as loaded, plus trained head or
    embeddings)."""
    return _unwrap(copy.deepcopy(model))


def adapter_state(model: nn.Module) -> dict:
    """The adapter tensors in ``peft``'s file layout (``base_model.model.<module>.lora_A.weight``, ...),
    what ``PeftModel.from_pretrained`` reads from ``adapter_model.safetensors``."""
    from peft import get_peft_model_state_dict

    return {f"base_model.model.{k}": v.detach().contiguous()
            for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Load :func:`adapter_state` tensors back into a model with the same adapters (all must be there)."""
    from peft import set_peft_model_state_dict

    prefix = "base_model.model."
    plain = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(model, plain)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing or getattr(result, "unexpected_keys", []):
        raise ConfigError(f"adapter weights do not match the model's adapters (missing {missing[:2]}, "
                          f"unexpected {list(getattr(result, 'unexpected_keys', []))[:2]})")
