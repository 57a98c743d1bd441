"""The one way from a path to a model: a ``.ckpt`` checkpoint of ``diffusion-lm fit`` or a
``diffusion-lm export`` folder (and, for ``diffusion-lm check``, a bare pretrained encoder).

Everything that turns a path into a model goes through here -- the commands, the server, export's
own checkpoint reading and its verification reload -- so there is one device rule
(:func:`resolve_device`: ``auto`` means CUDA when available) and one wrapping of load failures
into one-line :class:`~diffusion_lm.errors.ConfigError` messages (:func:`load_for_inference`).

The export folder format is defined here too (:data:`DIFFUSION_CONFIG`, :data:`FORMAT_VERSION`,
:func:`read_diffusion_config`); :mod:`diffusion_lm.export` writes it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from .backbone import SparseHeadDenoiser, load_backbone
from .chat import ChatTemplate
from .checkpoint_io import read_checkpoint_file
from .distributed import is_sharded_checkpoint, read_sharded_checkpoint
from .errors import ConfigError
from .module import MaskedDiffusionLM
from .schedules import NoiseSchedule

__all__ = [
    "ADAPTER_BASE_WEIGHTS",
    "DIFFUSION_CONFIG",
    "FORMAT_VERSION",
    "is_export",
    "load_checkpoint",
    "load_denoiser",
    "load_exported",
    "load_for_inference",
    "load_hf_export",
    "model_from_checkpoint",
    "load_model",
    "read_checkpoint_file",
    "read_diffusion_config",
    "resolve_device",
    "stored_sampler",
]

DIFFUSION_CONFIG = "diffusion_config.json"
FORMAT_VERSION = 1
# In an adapter export (`export --merge false`): the non-adapter tensors that trained or are new.
ADAPTER_BASE_WEIGHTS = "trained_base_weights.safetensors"

DevicePath = Union[str, torch.device]


def resolve_device(device: Union[None, str, torch.device] = None) -> torch.device:
    """The device to load onto: ``None``/``auto`` is CUDA when available, else CPU; anything else must
    be a torch device this machine has (a :class:`ConfigError` otherwise)."""
    if device is None or str(device).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device {device!r} is not a torch device ({err}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


# ------------------------------------------------------------------------------------ export folders
def is_export(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a folder written by ``diffusion-lm export``."""
    return os.path.isdir(path) and os.path.exists(os.path.join(path, DIFFUSION_CONFIG))


def read_diffusion_config(path: Union[str, Path]) -> dict:
    """The parsed ``diffusion_config.json`` of an export folder (with a clear error if missing)."""
    file = Path(path) / DIFFUSION_CONFIG
    if not file.is_file():
        raise ConfigError(f"{path}: not a diffusion_lm export (no {DIFFUSION_CONFIG}); give a folder written "
                          "by `diffusion-lm export` or a .ckpt checkpoint")
    cfg = json.loads(file.read_text(encoding="utf-8"))
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
        raise ConfigError(f"{file}: format_version {cfg.get('format_version')} is newer than this "
                          f"diffusion_lm understands ({FORMAT_VERSION}); upgrade diffusion_lm")
    return cfg


def load_exported(path: Union[str, Path], map_location: DevicePath = "cpu",
                  attn_implementation: Optional[str] = "sdpa") -> MaskedDiffusionLM:
    """Build a :class:`~diffusion_lm.MaskedDiffusionLM` (eval mode) from an export folder.

    The model, tokenizer, schedule, chat template and sampler defaults come from the folder, so
    ``generate``/``infill``/``chat`` behave as with the training checkpoint. The parsed metadata is
    attached as ``model.diffusion_config``.
    """
    path = str(path)
    cfg = read_diffusion_config(path)
    tpl = cfg["chat_template"]
    common = dict(schedule=NoiseSchedule.from_config(cfg["schedule"]), role_headers=tpl.get("role_headers"),
                  canvas_length=int(cfg["sampler"]["canvas_length"]), attn_implementation=attn_implementation,
                  health_check=False)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        model = _load_adapter_export(path, cfg, common)
    else:
        model = MaskedDiffusionLM(backbone=path, **common)
    if not tpl.get("add_bos", True):
        model.template = ChatTemplate(model.tokenizer, role_headers=tpl.get("role_headers"), add_bos=False)
    got = {"mask_id": model.template.mask_id, "eos_id": model.template.eos_id,
           "pad_id": model.template.pad_id, "bos_id": model.template.bos_id}
    wanted = {k: tpl.get(k) for k in got}
    if got != wanted:
        raise ConfigError(f"{path}: the tokenizer's special ids {got} do not match {DIFFUSION_CONFIG} "
                          f"{wanted}; the folder's tokenizer files were changed after export")
    model.diffusion_config = cfg
    return model.to(map_location).eval()


def _load_adapter_export(path: str, cfg: dict, common: dict) -> MaskedDiffusionLM:
    """An ``export --merge false`` folder: the base backbone it names, its trained non-adapter tensors,
    then the LoRA adapters."""
    from safetensors.torch import load_file

    from .adapters import load_adapter_state

    base = (cfg.get("training", {}).get("backbone") or {}).get("name_or_path")
    options = (cfg.get("peft") or {}).get("options")
    if not isinstance(base, str) or options is None:
        raise ConfigError(f"{path}: an adapter folder whose {DIFFUSION_CONFIG} names no base backbone or "
                          "LoRA options; export it again")
    model = MaskedDiffusionLM(backbone=base, peft=options, **common)
    hf = model.net.model
    extra = load_file(os.path.join(path, ADAPTER_BASE_WEIGHTS))
    # The adapter layers moved each adapted Linear's weight under `.base_layer.`.
    names = {k.replace(".base_layer.", "."): k for k in hf.state_dict()}
    unknown = [k for k in extra if k not in names]
    if unknown:
        raise ConfigError(f"{path}: {ADAPTER_BASE_WEIGHTS} holds tensors the base model {base!r} does not "
                          f"have (e.g. {unknown[0]})")
    hf.load_state_dict({names[k]: v for k, v in extra.items()}, strict=False)
    load_adapter_state(hf, load_file(os.path.join(path, "adapter_model.safetensors")))
    return model


def load_hf_export(folder: Union[str, Path], dtype: Optional[torch.dtype] = None):
    """``(model, tokenizer)`` of an export folder as plain transformers loads it (eval mode): what a user
    without diffusion_lm gets (export verifies its output with it)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(folder, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: Union[str, Path], map_location: DevicePath = "cpu") -> MaskedDiffusionLM:
    """A :class:`~diffusion_lm.MaskedDiffusionLM` from a Lightning checkpoint (``.ckpt``, or the folder
    of a sharded FSDP checkpoint), in eval mode."""
    if is_sharded_checkpoint(path):
        return model_from_checkpoint(read_sharded_checkpoint(path)).to(map_location)
    model = MaskedDiffusionLM.load_from_checkpoint(str(path), map_location=map_location)
    return model.eval()


def model_from_checkpoint(checkpoint: dict[str, Any]) -> MaskedDiffusionLM:
    """A :class:`~diffusion_lm.MaskedDiffusionLM` built from an in-memory checkpoint dict (eval mode, CPU).

    ``load_from_checkpoint`` reads a file or buffer; the module is built from a copy without the
    weights (a few kB, so the weights are never serialised twice), then the weights are loaded.
    """
    light = {k: v for k, v in checkpoint.items()
             if k not in ("state_dict", "current_model_state", "averaging_state")}
    buffer = io.BytesIO()
    torch.save({**light, "state_dict": {}}, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():  # "no parameters in the checkpoint": on purpose, they follow
        warnings.simplefilter("ignore")
        model = MaskedDiffusionLM.load_from_checkpoint(buffer, map_location="cpu", strict=False,
                                                       weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def load_model(path: str, map_location: DevicePath = "cpu") -> MaskedDiffusionLM:
    """Load a model for inference (eval mode) from a Lightning checkpoint (``.ckpt``) or an export folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model {path!r}: no such checkpoint file or export folder")
    if os.path.isdir(path) and not is_sharded_checkpoint(path):
        return load_exported(path, map_location=map_location)
    return load_checkpoint(path, map_location=map_location)


@contextlib.contextmanager
def _one_line(path: str, flag: str) -> Iterator[None]:
    """Any failure to load ``path`` (not a checkpoint, a truncated download, ...) as one ConfigError line."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"{flag} {path!r} could not be loaded as a checkpoint or export folder: "
                          f"{type(err).__name__}: {first}") from err


def load_for_inference(path: str, device: Union[None, str, torch.device] = None,
                       flag: str = "--model") -> MaskedDiffusionLM:
    """Load a ``.ckpt`` checkpoint or an export folder in eval mode on ``device`` (default: cuda if
    available, else cpu); a missing or unreadable path is a one-line :class:`ConfigError` naming ``flag``."""
    if not path:
        raise ConfigError(f"{flag} is required: a .ckpt checkpoint of `diffusion-lm fit` or a "
                          "`diffusion-lm export` folder")
    if not os.path.exists(path):
        raise ConfigError(f"{flag} {path!r}: no such checkpoint file or export folder")
    dev = resolve_device(device)
    with _one_line(path, flag):
        model = load_model(path, map_location=dev)
    return model.to(dev).eval()


def load_denoiser(spec: str, device: Union[None, str, torch.device] = None,
                  attn_implementation: Optional[str] = "sdpa") -> tuple[SparseHeadDenoiser, ChatTemplate]:
    """The denoiser module (eval mode, on ``device``) and chat template of a checkpoint, an export folder,
    or a pretrained encoder (hub id or folder) with the default template: what ``diffusion-lm check``
    measures."""
    dev = resolve_device(device)
    if os.path.isfile(spec) or is_export(spec):
        lm = load_for_inference(spec, dev)
        return lm.net, lm.template
    loaded = load_backbone(spec, attn_implementation=attn_implementation)
    template = ChatTemplate(loaded.tokenizer)
    return SparseHeadDenoiser(loaded.model, template.mask_id).to(dev).eval(), template


def stored_sampler(model: Any) -> dict:
    """The sampler defaults an export folder stored (``{"default_preset", "presets"}``), ``{}`` otherwise."""
    return dict((getattr(model, "diffusion_config", None) or {}).get("sampler") or {})
