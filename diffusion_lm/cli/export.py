"""``diffusion-lm export``: a training checkpoint -> a Hugging Face folder (the work is
:func:`diffusion_lm.export.export_checkpoint`)."""

from __future__ import annotations

from typing import Literal, Optional

import torch

from ..export import export_checkpoint

__all__ = ["export_command"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_command(
    ckpt_path: str,
    output_dir: str,
    weights: Literal["auto", "ema", "current"] = "auto",
    overwrite: bool = False,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    verify: bool = True,
    merge: bool = True,
) -> None:
    """Export a training checkpoint to a Hugging Face folder (model, tokenizer, diffusion metadata, card).

    Args:
        ckpt_path: Lightning checkpoint (``.ckpt``) of a ``diffusion-lm fit`` run, or the folder of a
            sharded FSDP checkpoint (``state_dict_type: sharded``).
        output_dir: folder to create (written atomically).
        weights: ``auto`` (EMA weights if the run used EMAWeightAveraging), ``ema`` or ``current``.
        overwrite: replace an existing ``output_dir``.
        dtype: save the weights as ``float32``, ``bfloat16`` or ``float16`` (default: unchanged).
        verify: reload the export with ``AutoModelForMaskedLM`` and compare logits before publishing it.
        merge: a model trained with ``model.peft`` (LoRA): fold the adapters into the weights and write a
            plain Hugging Face folder (default), or ``false``: a ``peft`` adapter folder over the base model.
    """
    target = export_checkpoint(ckpt_path, output_dir, weights=weights, overwrite=overwrite,
                               dtype=_DTYPES[dtype] if dtype else None, verify=verify, merge=merge)
    print(f"exported {ckpt_path} -> {target}")
