"""Export a trained model to a Hugging Face folder (loading one back is :mod:`diffusion_lm.loading`'s).

The folder holds what ``transformers.AutoModelForMaskedLM.from_pretrained`` loads with no remote
code (``config.json`` + safetensors weights), the tokenizer (with the mask/pad/end tokens the
framework added), ``diffusion_config.json`` (mask id, noise schedule, chat template, sampler
defaults, training and data summary) and a model card (``README.md``).

The T5-encoder family (FRIDA) is the exception to "plain transformers": transformers has no T5
masked-LM class, so its export is a :class:`~diffusion_lm.backbone.T5EncoderForMaskedLM`, which
``AutoModelForMaskedLM`` knows once ``diffusion_lm`` has been imported (see ``docs/models.md``).

Exports are atomic: everything is written into a temporary folder next to the target, reloaded
and checked, fsync'ed and given the umask's modes, then renamed into place, so a failed export never
leaves a half-written folder. ``overwrite`` replaces an earlier export only: never a folder holding
checkpoints or the export's own source.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch

from .adapters import adapter_state, merged_copy
from .backbone import describe
from .chat import DEFAULT_LANGUAGES
from .checkpoint_io import read_checkpoint_file
from .distributed import read_sharded_checkpoint
from .errors import ConfigError
from .files import fsync_dir, publish_folder
# The folder format is loading's; load_exported and read_diffusion_config stay importable from here.
from .loading import (
    ADAPTER_BASE_WEIGHTS,
    DIFFUSION_CONFIG,
    FORMAT_VERSION,
    load_checkpoint,
    load_exported,
    load_hf_export,
    model_from_checkpoint,
    read_diffusion_config,
)
from .sampling.config import PRESETS
from .version import __version__

__all__ = [
    "DIFFUSION_CONFIG",
    "FORMAT_VERSION",
    "check_target",
    "export_checkpoint",
    "export_model",
    "load_exported",
    "read_diffusion_config",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- helpers
def _jsonable(value: Any) -> Any:
    """A JSON-safe copy of hyperparameters and summaries (dataclasses, schedules, tuples, paths)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if callable(getattr(value, "to_config", None)):
        return _jsonable(value.to_config())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (Path, torch.dtype)):
        return str(value)
    return repr(value)


def _sampler_defaults(model) -> dict:
    """Canvas and length defaults, plus the sampler presets (``{name: SamplerConfig.to_dict()}``)."""
    out: dict[str, Any] = {"canvas_length": int(model.hparams.canvas_length),
                           "max_length": int(model.max_length)}
    out["default_preset"] = "quality"
    out["presets"] = {name: factory().to_dict() for name, factory in PRESETS.items()}
    return out


def _languages(data_summary: dict) -> list[str]:
    langs = list((data_summary or {}).get("per_language") or {})
    return sorted(langs) or list(DEFAULT_LANGUAGES)


def diffusion_config(model, *, weights: str = "current", data_summary: Optional[dict] = None,
                     global_step: Optional[int] = None) -> dict:
    """The ``diffusion_config.json`` content for a :class:`~diffusion_lm.MaskedDiffusionLM`."""
    template = model.template
    hp = dict(model.hparams)
    training = {k: _jsonable(v) for k, v in hp.items()
                if k not in ("backbone", "schedule") and not k.startswith("_")}
    return {
        "format_version": FORMAT_VERSION,
        "diffusion_lm_version": __version__,
        "model_type": model.net.model.config.model_type,
        "architecture": type(model.net.model).__name__,
        "mask_token_id": template.mask_id,
        "pad_token_id": template.pad_id,
        "eos_token_id": template.eos_id,
        "bos_token_id": template.bos_id,
        "schedule": model.schedule.to_config(),
        "chat_template": template.to_config(),
        "sampler": _sampler_defaults(model),
        "training": {
            "backbone": _jsonable(describe(hp["backbone"])),
            "weights": weights,
            "global_step": global_step,
            "hparams": training,
        },
        "data": _jsonable(data_summary or {}),
    }


def _peft_section(model, merged: bool) -> Optional[dict]:
    """``diffusion_config.json``'s ``peft`` entry: the LoRA options and whether the export merged them."""
    if getattr(model, "adapter", None) is None:
        return None
    return {"merged": merged, "options": _jsonable(model.adapter.options)}


def _model_card(cfg: dict) -> str:
    base = cfg["training"]["backbone"].get("name_or_path")
    hub_base = base if isinstance(base, str) and not os.path.exists(base) and base.count("/") == 1 else None
    langs = _languages(cfg.get("data") or {})
    t5 = cfg["architecture"] == "T5EncoderForMaskedLM"
    front = ["---", "library_name: transformers", "pipeline_tag: fill-mask", "tags:", "- masked-diffusion",
             "- diffusion-lm", "- text-generation", "language:"] + [f"- {lang}" for lang in langs]
    if hub_base:
        front.append(f"base_model: {hub_base}")
    front.append("---")
    data = cfg.get("data") or {}
    per_language = data.get("per_language") or {}
    data_lines = [f"- {lang}: {n} training examples" for lang, n in sorted(per_language.items())]
    data_lines = data_lines or ["- (no data summary recorded)"]
    schedule = cfg["schedule"]["class_path"].rsplit(".", 1)[-1]
    load_note = (
        "This is a T5 encoder with a masked-LM head (`T5EncoderForMaskedLM`), which transformers does not "
        "ship: `import diffusion_lm` before `AutoModelForMaskedLM.from_pretrained` registers it."
        if t5
        else "The weights load with plain `transformers.AutoModelForMaskedLM.from_pretrained` (no remote "
             "code)."
    )
    sampler = cfg.get("sampler") or {}
    presets = ", ".join(sampler.get("presets") or []) or "n/a"
    return "\n".join(front) + f"""

# Masked-diffusion chat model ({cfg['model_type']})

An encoder fine-tuned as a **masked (absorbing-state) diffusion language model** with
`diffusion_lm`: it answers by unmasking an all-[MASK] canvas over several steps and can fill holes
anywhere in a text (targeted edits, fill-in-the-middle, bridging).

- base model: `{base or cfg['training']['backbone']}`
- weights: {cfg['training']['weights']} (step {cfg['training']['global_step']})
- noise schedule: `{schedule}`; mask token id {cfg['mask_token_id']}, end-of-answer id {cfg['eos_token_id']}
- default canvas: {sampler.get('canvas_length')} answer slots; sampler presets: {presets}

{load_note}

## Use

```python
import diffusion_lm
from diffusion_lm.export import load_exported

model = load_exported("path/to/this/folder")
print(model.generate(["Привет! Как дела?", "Hello, how are you?"]).texts)
```

or from the shell: `diffusion-lm generate --model path/to/this/folder --prompt "Hello"`.
Prompts must follow the chat template stored in `diffusion_config.json` (`chat_template`);
`diffusion_lm` builds them for you.

## Training data

{chr(10).join(data_lines)}

## Limitations

Encoder-based diffusion chat models tend to loop (cyclic repetition), especially outside their
pretraining languages; use the sampler's repetition guard and semi-autoregressive blocks, and judge
quality per language. The model is a proof of concept for chat; editing and infilling are its
strengths.
"""


def _check_replaceable(target: Path, protect: Sequence[Path]) -> None:
    """``--overwrite`` replaces an earlier export only: never a folder with checkpoints or the export's
    source."""
    for source in protect:
        source = Path(source).expanduser().resolve()
        if source == target or target in source.parents:
            raise ConfigError(f"--output_dir {target} holds the checkpoint being exported ({source}); "
                              "export to another folder")
    checkpoint = next((p for p in target.rglob("*.ckpt")), None)
    if checkpoint is not None:
        raise ConfigError(f"--output_dir {target} holds checkpoints ({checkpoint}); --overwrite never "
                          "replaces a folder with checkpoints: export to another folder")
    if any(target.iterdir()) and not (target / DIFFUSION_CONFIG).is_file():
        raise ConfigError(f"--output_dir {target} is not a diffusion_lm export (no {DIFFUSION_CONFIG}); "
                          "--overwrite only replaces an earlier export: choose another folder")


def check_target(target: Union[str, Path], overwrite: bool, protect: Sequence[Union[str, Path]] = ()) -> Path:
    """The resolved export folder, or a one-line :class:`ConfigError` if it may not be (re)placed."""
    target = Path(target).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--output_dir {target} exists and is not a folder")
    if target.exists() and not overwrite:
        raise ConfigError(f"--output_dir {target} already exists; pass --overwrite true to replace it")
    if target.exists():
        _check_replaceable(target, [Path(p) for p in protect])
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):  # also false on a read-only mount, even for root
        raise ConfigError(f"--output_dir {target}: {existing} is not writable; choose a writable folder")
    return target


def _atomic_write(target: Path, overwrite: bool, write, protect: Sequence[Path] = ()) -> Path:
    """Run ``write(tmp_dir)`` and move the result to ``target`` in one rename; clean up on failure.

    The temp folder is created next to ``target`` (same filesystem: the rename is atomic), its files
    are fsync'ed and given the umask's modes (``mkdtemp`` makes it 0700) before it is published.
    """
    target = check_target(target, overwrite, protect)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise ConfigError(f"--output_dir {target}: cannot write there ({err.strerror or err}); "
                          "choose a writable folder") from None
    backup: Optional[Path] = None
    try:
        write(tmp)
        publish_folder(tmp)
        if target.exists():
            backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, backup)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None and backup.exists() and not target.exists():
            os.replace(backup, target)
        if isinstance(err, OSError):  # read-only filesystem, disk full, permissions
            raise ConfigError(f"--output_dir {target}: writing the export failed ({err.strerror or err}); "
                              "nothing was changed") from err
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return target


@torch.no_grad()
def _verify(folder: Path, model, dtype: Optional[torch.dtype]) -> None:
    """Reload the written folder with ``AutoModelForMaskedLM`` and compare logits on a short prompt (a
    merged LoRA model against the unmerged one: merging rounds differently, hence a looser tolerance)."""
    hf = model.net.model
    param = next(hf.parameters())
    saved_dtype = dtype or param.dtype
    reloaded, tokenizer = load_hf_export(folder, saved_dtype)
    if len(tokenizer) != len(model.tokenizer):
        raise RuntimeError(
            f"export check: the saved tokenizer has {len(tokenizer)} tokens, the model's "
            f"{len(model.tokenizer)}"
        )
    ids = torch.tensor([model.prompt_ids("Hello! Привет!")[:32]])
    mask = torch.ones_like(ids)
    was_training = hf.training
    hf.eval()
    try:
        expected = hf(input_ids=ids.to(param.device),
                      attention_mask=mask.to(param.device)).logits.float().cpu()
    finally:
        hf.train(was_training)
    got = reloaded(input_ids=ids, attention_mask=mask).logits.float()
    exact = saved_dtype == param.dtype == torch.float32 and param.device.type == "cpu"
    scale = float(expected.abs().max().clamp_min(1.0))
    atol, rtol = (1e-4, 1e-4) if exact else (5e-2 * scale, 5e-2)
    if exact and getattr(model, "adapter", None) is not None:
        atol, rtol = 1e-4 * scale, 1e-3
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=atol, rtol=rtol):
        same = got.shape == expected.shape
        diff = (got - expected).abs().max().item() if same else f"shape {tuple(got.shape)}"
        raise RuntimeError("export check: logits of the reloaded export differ from the model's (max |diff| "
                           f"{diff})")


# ----------------------------------------------------------------------------- export
def export_model(
    model,
    output_dir: Union[str, Path],
    *,
    overwrite: bool = False,
    weights: str = "current",
    data_summary: Optional[dict] = None,
    global_step: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    verify: bool = True,
    protect: Sequence[Union[str, Path]] = (),
    merge: bool = True,
) -> Path:
    """Write ``model`` (a :class:`~diffusion_lm.MaskedDiffusionLM`) to ``output_dir`` atomically.

    Args:
        model: the model; its weights are written as they are (the caller picks EMA or current).
        output_dir: target folder (must not exist unless ``overwrite``).
        weights: label recorded in the metadata (``ema`` or ``current``).
        data_summary: the training data summary (``DialogDataModule.summary``).
        global_step: training step, for the metadata and the model card.
        dtype: save the weights in this dtype (default: as they are, usually float32).
        verify: reload the folder with ``AutoModelForMaskedLM`` and compare logits before publishing it.
        protect: files that must survive (the source checkpoint): a folder holding one is never replaced.
        merge: for a model with LoRA adapters (``model.peft``): fold them into the weights and write a
            plain Hugging Face folder (default), or keep them as a ``peft`` adapter folder
            (:func:`_export_adapter`).

    ``overwrite`` replaces an earlier export only, never a folder holding ``*.ckpt`` checkpoints.
    """
    if getattr(model, "adapter", None) is not None and not merge:
        return _export_adapter(model, output_dir, overwrite=overwrite, weights=weights,
                               data_summary=data_summary, global_step=global_step, verify=verify,
                               protect=protect)
    hf_model = model.net.model if getattr(model, "adapter", None) is None else merged_copy(model.net.model)
    cfg = diffusion_config(model, weights=weights, data_summary=data_summary, global_step=global_step)
    if getattr(model, "adapter", None) is not None:
        cfg["peft"] = _peft_section(model, merged=True)

    def write(tmp: Path) -> None:
        state = None
        if dtype is not None:
            state = {k: (v.to(dtype) if v.is_floating_point() else v)
                     for k, v in hf_model.state_dict().items()}
        hf_model.save_pretrained(tmp, state_dict=state)
        if dtype is not None:
            config_path = tmp / "config.json"
            saved = json.loads(config_path.read_text(encoding="utf-8"))
            saved["dtype"] = str(dtype).replace("torch.", "")
            config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        model.tokenizer.save_pretrained(tmp)
        (tmp / DIFFUSION_CONFIG).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(cfg), encoding="utf-8")
        if verify:
            _verify(tmp, model, dtype)

    target = _atomic_write(Path(output_dir), overwrite, write, protect=protect)
    log.info("exported %s weights to %s", weights, target)
    return target


def _export_adapter(model, output_dir, *, overwrite: bool, weights: str, data_summary: Optional[dict],
                    global_step: Optional[int], verify: bool, protect: Sequence[Union[str, Path]]) -> Path:
    """``export --merge false``: a ``peft`` adapter folder over the model's backbone.

    ``adapter_config.json`` + ``adapter_model.safetensors`` (what ``peft.PeftModel.from_pretrained``
    reads, ``base_model_name_or_path`` = the backbone), ``trained_base_weights.safetensors`` (the
    non-adapter tensors that trained or are new: a trained or fresh head, added token rows; load them
    into the base model first), the tokenizer, ``diffusion_config.json`` and the model card.
    """
    from safetensors.torch import save_file

    base = model.hparams.get("backbone")
    if not isinstance(base, str):
        raise ConfigError("--merge false: the backbone was built from a config, so there is no base model "
                          "to put the adapters on; export with --merge true")
    cfg = diffusion_config(model, weights=weights, data_summary=data_summary, global_step=global_step)
    cfg["peft"] = _peft_section(model, merged=False)
    hf_model = model.net.model
    frozen = {k[len("net.model."):] for k in model._frozen_keys}
    extra = {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()
             if k not in frozen and "lora_" not in k}
    extra = {k.replace(".base_layer.", "."): v for k, v in extra.items()}

    def write(tmp: Path) -> None:
        config = copy.deepcopy(model.adapter.config)
        config.base_model_name_or_path = base
        config.save_pretrained(str(tmp))
        save_file(adapter_state(hf_model), str(tmp / "adapter_model.safetensors"))
        save_file(extra, str(tmp / ADAPTER_BASE_WEIGHTS))
        model.tokenizer.save_pretrained(tmp)
        (tmp / DIFFUSION_CONFIG).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(cfg), encoding="utf-8")
        if verify:
            _verify_adapter(tmp, model)

    target = _atomic_write(Path(output_dir), overwrite, write, protect=protect)
    log.info("exported %s adapter weights to %s", weights, target)
    return target


@torch.no_grad()
def _verify_adapter(folder: Path, model) -> None:
    """Reload an adapter folder through :func:`~diffusion_lm.loading.load_exported` and compare logits."""
    reloaded = load_exported(folder)
    ids = torch.tensor([model.prompt_ids("Hello! Привет!")[:32]])
    mask, query = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        expected = model.denoise(ids.to(param.device), mask.to(param.device), query.to(param.device)).cpu()
    finally:
        model.train(was_training)
    got = reloaded.denoise(ids, mask, query)
    if not torch.allclose(got, expected, atol=1e-4 * float(expected[expected.isfinite()].abs().max()),
                          rtol=1e-3):
        raise RuntimeError("export check: logits of the reloaded adapter folder differ from the model's")


def _data_summary(checkpoint: dict) -> dict:
    """The data module's summary from a Lightning checkpoint (saved by ``DialogDataModule.state_dict``)."""
    state = checkpoint.get("DialogDataModule")
    if isinstance(state, dict) and isinstance(state.get("summary"), dict):
        return state["summary"]
    for key, value in checkpoint.items():
        if key.endswith("DataModule") and isinstance(value, dict) and isinstance(value.get("summary"), dict):
            return value["summary"]
    return {}


def export_checkpoint(
    ckpt_path: Union[str, Path],
    output_dir: Union[str, Path],
    *,
    weights: Literal["auto", "ema", "current"] = "auto",
    overwrite: bool = False,
    dtype: Optional[torch.dtype] = None,
    verify: bool = True,
    merge: bool = True,
) -> Path:
    """Export a Lightning checkpoint of :class:`~diffusion_lm.MaskedDiffusionLM`: a ``.ckpt`` file, or
    the folder of a sharded FSDP checkpoint (read with
    :func:`~diffusion_lm.distributed.read_sharded_checkpoint`).

    With Lightning's ``EMAWeightAveraging`` the checkpoint's ``state_dict`` holds the averaged
    weights and ``current_model_state`` the raw ones; ``weights="auto"`` exports the EMA weights
    when present, ``current`` the raw ones, ``ema`` insists on EMA. ``merge``: see :func:`export_model`.
    """
    ckpt_path = str(ckpt_path)
    sharded = os.path.isdir(ckpt_path)  # FSDP with state_dict_type: sharded writes a folder
    if not sharded and not os.path.isfile(ckpt_path):
        raise ConfigError(f"--ckpt_path {ckpt_path!r}: no such checkpoint file")
    check_target(output_dir, overwrite, [ckpt_path])  # before the (slow) load
    checkpoint = read_sharded_checkpoint(ckpt_path) if sharded else read_checkpoint_file(ckpt_path)
    has_ema = "current_model_state" in checkpoint
    if weights == "ema" and not has_ema:
        raise ConfigError(
            f"--weights ema: {ckpt_path} was not saved with EMAWeightAveraging (no averaged weights in it)"
        )
    current_state = checkpoint["current_model_state"] if (weights == "current" and has_ema) else None
    summary = _data_summary(checkpoint)
    global_step = checkpoint.get("global_step")
    if sharded:
        model = model_from_checkpoint(checkpoint)
    else:
        del checkpoint
        model = load_checkpoint(ckpt_path, map_location="cpu")
    if current_state is not None:
        model.load_state_dict(current_state)
    label = "ema" if has_ema and current_state is None else "current"
    return export_model(model, output_dir, overwrite=overwrite, weights=label, data_summary=summary,
                        global_step=global_step, dtype=dtype, verify=verify, protect=[ckpt_path], merge=merge)
