"""Sharded training: an FSDP strategy that wraps each encoder layer, and sharded checkpoints read back.

:class:`EncoderFSDPStrategy` is Lightning's ``FSDPStrategy`` with the auto-wrap policy found from
the model at setup: the class of the model's repeated encoder block (``ModernBertEncoderLayer``,
``BertLayer``, ``RobertaLayer``, ``XLMRobertaLayer``, ``T5Block``, ...), so one recipe serves every
family. Everything else is Lightning's: mixed precision follows ``trainer.precision``
(``bf16-mixed`` keeps fp32 master weights and computes in bf16), gradient clipping goes through the
FSDP module's own ``clip_grad_norm_`` (see ``MaskedDiffusionLM._clip``; Lightning's hook refuses norm
clipping under FSDP, lightning#19235), and ``state_dict_type`` picks full (one ``.ckpt`` file,
gathered on rank 0) or sharded checkpoints (a folder of ``torch.distributed.checkpoint`` shards plus
``meta.pt``, written by every rank in parallel).

:func:`read_sharded_checkpoint` turns such a folder back into the dict a ``.ckpt`` file holds
(model weights, hyperparameters, the data summary; optimizer state left out), so ``diffusion-lm
export --ckpt_path FOLDER`` exports a sharded checkpoint without a GPU or a process group.

.. code-block:: yaml

    trainer:
      strategy:
        class_path: diffusion_lm.distributed.EncoderFSDPStrategy
        init_args: {state_dict_type: sharded}

or ``--trainer.strategy=fsdp_encoder`` (the registered name, with the defaults).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal, Optional, TypeVar, Union

import torch
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from torch import nn

from .checkpoint_io import read_checkpoint_file
from .errors import ConfigError

__all__ = [
    "CURRENT_PREFIX",
    "EncoderFSDPStrategy",
    "METADATA_FILE",
    "STRATEGY_NAME",
    "encoder_layer_classes",
    "is_sharded_checkpoint",
    "read_sharded_checkpoint",
    "root_forward",
]

log = logging.getLogger(__name__)

# Lightning's sharded checkpoint layout: torch.distributed.checkpoint shards holding
# {"model": ..., "optimizer_<i>": ...} plus everything else torch.save'd by rank 0 in this file.
METADATA_FILE = "meta.pt"

# Sharded checkpoints store one module state dict (the "model" entry of the shards): with an EMA
# (diffusion_lm.ema.EMA) it holds the average, which loads into the model like any checkpoint, and
# the trained weights under this prefix; read_sharded_checkpoint splits them apart again.
CURRENT_PREFIX = "current_model_state."

T = TypeVar("T")


def encoder_layer_classes(module: nn.Module) -> set[type[nn.Module]]:
    """The class of the repeated encoder block of ``module`` (the FSDP wrapping unit).

    The block is the element class of the ``nn.ModuleList`` that holds the most parameters among
    lists of same-class modules (``model.layers`` of ModernBERT, ``encoder.layer`` of BERT, RoBERTa
    and XLM-R, ``encoder.block`` of T5): found from the model, not from a table of families, so a
    new encoder family needs no code here.
    """
    best: Optional[type[nn.Module]] = None
    best_size = 0
    for child in module.modules():
        if not isinstance(child, nn.ModuleList) or len(child) == 0:
            continue
        kinds = {type(m) for m in child}
        if len(kinds) != 1:
            continue
        size = sum(p.numel() for p in child.parameters())
        if size > best_size:
            best, best_size = kinds.pop(), size
    if best is None:
        raise ConfigError(f"{type(module).__name__} has no list of repeated layers to shard with FSDP; "
                          "pass trainer.strategy.init_args.layer_classes")
    return {best}


def _import_class(path: str) -> type[nn.Module]:
    import importlib

    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"trainer.strategy layer_classes: cannot import {path!r} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"trainer.strategy layer_classes: {path!r} is not a torch.nn.Module class")
    return cls


class EncoderFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` that shards each encoder layer of whatever family the model is.

    Args:
        layer_classes: import paths of the module classes to wrap as FSDP units; default: the
            model's repeated encoder block, found at setup (:func:`encoder_layer_classes`).
        state_dict_type: ``sharded`` (default: every rank writes its shards into a checkpoint
            folder; fast, no gather on one GPU) or ``full`` (one ``.ckpt`` file gathered on rank 0).
        sharding_strategy: ``FULL_SHARD`` (parameters, gradients and optimizer state sharded),
            ``SHARD_GRAD_OP`` (parameters kept whole between forward and backward), ``NO_SHARD``
            or ``HYBRID_SHARD`` (full sharding within a node, replication across nodes).
        cpu_offload: keep parameters and gradients on the CPU between uses (slow; for models that
            do not fit otherwise).
        kwargs: any other argument of Lightning's ``FSDPStrategy`` / torch's FSDP.

    Mixed precision comes from ``trainer.precision`` (do not pass ``mixed_precision``); activation
    checkpointing is the model's own ``model.gradient_checkpointing: true``.

    On a CPU (``trainer.accelerator: cpu``, gloo) the strategy also runs, for tests and debugging
    only: torch's FSDP refuses to pick the CPU by itself, so the model is wrapped here with the CPU
    named explicitly, and only ``state_dict_type: sharded`` works there (gathering a full state dict
    of a CPU-sharded model crashes torch 2.13's FSDP).
    """

    def __init__(
        self,
        layer_classes: Optional[list[str]] = None,
        state_dict_type: Literal["full", "sharded"] = "sharded",
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        cpu_offload: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("auto_wrap_policy") is not None and layer_classes:
            raise ConfigError("trainer.strategy: give layer_classes or auto_wrap_policy, not both")
        if kwargs.get("mixed_precision") is not None:
            raise ConfigError(
                "trainer.strategy: mixed precision follows trainer.precision (e.g. bf16-mixed); "
                "drop mixed_precision"
            )
        super().__init__(
            state_dict_type=state_dict_type,
            sharding_strategy=sharding_strategy,
            cpu_offload=cpu_offload,
            **kwargs,
        )
        self.layer_classes = [_import_class(p) for p in layer_classes] if layer_classes else None

    def training_step(self, *args: Any, **kwargs: Any):
        """Run a manually optimised training step outside the FSDP root's forward.

        Lightning runs ``training_step`` as the root's forward, and FSDP cannot run a backward pass
        inside its root's forward, so a ``manual_backward`` there fails (lightning#19626,
        lightning#19685). Here the step runs outside it, and each forward pass the step makes goes
        through the root with :func:`root_forward`, so every backward follows a finished forward.
        """
        module = self.lightning_module
        if module.automatic_optimization:
            return super().training_step(*args, **kwargs)
        with self.precision_plugin.train_step_context():
            return module.training_step(*args, **kwargs)

    def wrap_classes(self, module: nn.Module) -> set[type[nn.Module]]:
        """The FSDP units of ``module``: ``layer_classes`` or its repeated encoder block."""
        return set(self.layer_classes) if self.layer_classes else encoder_layer_classes(module)

    def setup(self, trainer) -> None:
        """Pick the wrap policy from the model, then let Lightning wrap, shard and set up optimizers."""
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        module = self.lightning_module
        if "auto_wrap_policy" not in self.kwargs and not _is_fsdp_wrapped(self.model):
            classes = self.wrap_classes(module)
            log.info("FSDP wraps every %s", ", ".join(sorted(c.__name__ for c in classes)))
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
        if self.root_device.type == "cpu":
            self._wrap_on_cpu()
        super().setup(trainer)

    def _wrap_on_cpu(self) -> None:
        # Lightning passes the device index (None for the CPU) and torch's FSDP then looks for an
        # accelerator; a model that is already wrapped is used as it is (Lightning's documented
        # path for manual wrapping), so wrap it here with the CPU as the device.
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self._state_dict_type != "sharded":
            raise ConfigError(
                "EncoderFSDPStrategy on the CPU needs state_dict_type: sharded "
                "(a full state dict of a CPU-sharded model crashes torch's FSDP)"
            )
        if _is_fsdp_wrapped(self.model):
            return
        kwargs = dict(self.kwargs)
        self.kwargs.pop("auto_wrap_policy", None)  # applied now; Lightning would warn about it
        self.model = FullyShardedDataParallel(
            module=self.model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **kwargs,
        )


# `--trainer.strategy=fsdp_encoder`: a bare class path given as a string would reach Lightning as a
# (lowercased) strategy name; a registered name is what `strategy="ddp"` and friends are.
STRATEGY_NAME = "fsdp_encoder"
if STRATEGY_NAME not in StrategyRegistry:
    StrategyRegistry.register(
        STRATEGY_NAME,
        EncoderFSDPStrategy,
        description="FSDP sharding each encoder layer, sharded checkpoints (diffusion_lm)",
    )


def _is_fsdp_wrapped(module: Optional[nn.Module]) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return module is not None and any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def root_forward(trainer, fn: Callable[[], T]) -> T:
    """``fn()``, run as the forward of the FSDP root under :class:`EncoderFSDPStrategy`, else as is.

    The root gathers the parameters outside the wrapped layers (embeddings, LM head) before ``fn``
    and reshards them after it, and registers the hooks that reduce their gradients in the backward
    pass of what ``fn`` returns. ``fn`` takes no arguments on purpose: the root casts floating-point
    *arguments* of its forward to the mixed-precision dtype, and times or loss weights must stay fp32.
    """
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, EncoderFSDPStrategy) or not _is_fsdp_wrapped(strategy.model):
        return fn()
    root, module = strategy.model, strategy.lightning_module
    patched = "forward" in module.__dict__
    original = module.__dict__.get("forward")
    module.forward = lambda: fn()  # what the root's forward calls (as Lightning's forward redirection does)
    try:
        return root()
    finally:
        if patched:
            module.forward = original
        else:
            del module.forward


# ----------------------------------------------------------------------------- sharded checkpoints
def is_sharded_checkpoint(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a checkpoint folder written by FSDP with ``state_dict_type: sharded``."""
    path = Path(path)
    return path.is_dir() and (path / METADATA_FILE).is_file() and (path / ".metadata").is_file()


def _model_keys(metadata, prefix: str = "model.") -> dict[str, Any]:
    """The tensors of the saved ``model`` entry, by their key in the module's state dict."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
            out[key[len(prefix) :]] = meta
    return out


def read_sharded_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """A Lightning sharded checkpoint folder as the dict a ``.ckpt`` file holds, without the optimizer
    (with ``current_model_state`` beside the average when the run kept an EMA).

    The shards are read with ``torch.distributed.checkpoint`` in one process (no process group, no
    GPU) into full tensors; ``meta.pt`` supplies the rest (hyperparameters, loops, callbacks, the data
    module's summary). Like Lightning's own consolidation (``python -m
    lightning.pytorch.utilities.consolidate_checkpoint``), the whole model must fit in CPU memory; the
    optimizer state (twice the model for AdamW) is not read.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ConfigError(
            f"--ckpt_path {str(path)!r}: a folder, but not a sharded checkpoint "
            f"(no {METADATA_FILE} and .metadata written by FSDP with state_dict_type: sharded)"
        )
    reader = dcp.FileSystemReader(str(path))
    keys = _model_keys(reader.read_metadata())
    if not keys:
        raise ConfigError(f"--ckpt_path {str(path)!r}: the sharded checkpoint holds no model weights")
    model = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in keys.items()}
    state = {"model": model}
    with warnings.catch_warnings():  # "torch.distributed is not initialized": one process is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    checkpoint = read_checkpoint_file(path / METADATA_FILE)
    checkpoint["state_dict"], current = split_prefixed(state["model"], CURRENT_PREFIX)
    if current:  # an EMA run: state_dict is the average, as in a .ckpt file written by Lightning's callback
        checkpoint["current_model_state"] = current
    return checkpoint


def split_prefixed(state_dict: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``state_dict`` split into the entries without ``prefix`` and those with it (prefix removed)."""
    plain = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    tagged = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return plain, tagged


def count_wrapped(module: nn.Module) -> Counter:
    """How many FSDP units wrap each module class (for logs and tests)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return Counter(
        type(m.module).__name__ for m in module.modules() if isinstance(m, FullyShardedDataParallel)
    )


def check_strategy(strategy) -> None:
    """A one-line error for Lightning's plain ``FSDPStrategy``: this module optimises manually, which
    fails inside FSDP's root forward (lightning#19626); :class:`EncoderFSDPStrategy` runs it."""
    if isinstance(strategy, FSDPStrategy) and not isinstance(strategy, EncoderFSDPStrategy):
        raise ConfigError(
            "trainer.strategy: Lightning's FSDPStrategy cannot run MaskedDiffusionLM's manual "
            "optimisation (lightning#19626); use diffusion_lm.distributed.EncoderFSDPStrategy "
            "(--trainer.strategy=fsdp_encoder, or --config configs/strategy/fsdp.yaml)"
        )
