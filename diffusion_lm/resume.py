"""What resuming from a checkpoint keeps, changes or refuses (``fit --ckpt_path ...``).

The rules, applied by :class:`~diffusion_lm.MaskedDiffusionLM` when Lightning restores a checkpoint
and checked by the CLI before any data is read:

* **The model's identity must match** (:data:`ARCHITECTURE_KEYS`: the backbone, including a
  from-scratch config and its tokenizer, the noise schedule, the chat template's role headers and the
  LoRA options of ``model.peft``).
  A difference is an error naming the key: the weights, the vocabulary or the objective would no
  longer mean what they meant.
* **Everything else comes from the current config and is applied.** Optimisation options
  (:data:`OPTIMIZER_KEYS`: learning rate, weight decay, betas, warm-up, LR schedule, floor) are
  written into the restored optimizer, and the LR schedule is rebuilt for the current
  ``trainer.max_steps`` while its step count carries on: warm-up counts from step 0 of the run,
  so extending ``max_steps`` never re-warms the LR (a cosine/linear decay is stretched to the new
  end). Other options (``micro_batch_size``, ``gradient_clip_val``, ``time_eps``, seeds,
  ``attn_implementation``, ...) take effect from the next step since the model reads them each step.

So ``hparams.yaml`` and the saved config always describe the run as it continues. One line at the
start of the resumed run says which options changed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .adapters import PeftOptions
from .backbone import ScratchBackbone
from .chat import DEFAULT_ROLE_HEADERS
from .checkpoint_io import read_checkpoint_file
from .distributed import METADATA_FILE, is_sharded_checkpoint
from .errors import ConfigError
from .files import is_temp_file
from .schedules import LogLinearSchedule, NoiseSchedule

__all__ = [
    "ARCHITECTURE_KEYS",
    "OPTIMIZER_KEYS",
    "apply_optimizer_hparams",
    "architecture_conflicts",
    "changed_hparams",
    "describe_resume",
    "check_resume",
    "find_last_checkpoint",
    "read_checkpoint",
]

ARCHITECTURE_KEYS = ("backbone", "schedule", "role_headers", "peft")
OPTIMIZER_KEYS = ("learning_rate", "weight_decay", "betas", "warmup_steps", "lr_schedule", "min_lr_ratio")


def _plain(value: Any) -> Any:
    """Namespaces, dataclasses, tuples -> dicts and lists, for comparisons."""
    if hasattr(value, "as_dict") and callable(value.as_dict):  # jsonargparse Namespace
        value = value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _normal(key: str, value: Any) -> Any:
    """A comparable form of one hyperparameter (defaults filled in, CLI dicts == Python objects)."""
    if key == "backbone" and not isinstance(value, str):
        fields = {f.name for f in dataclasses.fields(ScratchBackbone)}
        plain = _plain(value)
        if isinstance(plain, dict) and set(plain) <= fields:
            return _plain(ScratchBackbone(**plain))
        return plain
    if key == "schedule":
        if value is None:
            value = LogLinearSchedule()
        if isinstance(value, NoiseSchedule):
            value = value.to_config()
        plain = _plain(value)
        if isinstance(plain, dict) and "class_path" in plain:
            return {"class_path": plain["class_path"], "init_args": plain.get("init_args") or {}}
        return plain
    if key == "peft" and value is not None:  # LoRA options, defaults filled in
        plain = _plain(value)
        if isinstance(plain, dict) and set(plain) <= {f.name for f in dataclasses.fields(PeftOptions)}:
            return _plain(PeftOptions(**plain))
        return plain
    if key == "role_headers":
        return dict(DEFAULT_ROLE_HEADERS, **(_plain(value) or {}))
    return _plain(value)


def architecture_conflicts(saved: Mapping, current: Mapping) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint value, current value)}`` for the :data:`ARCHITECTURE_KEYS` that differ."""
    out = {}
    for key in ARCHITECTURE_KEYS:
        old, new = _normal(key, saved.get(key)), _normal(key, current.get(key))
        if old != new:
            out[key] = (old, new)
    return out


def changed_hparams(saved: Mapping, current: Mapping) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint value, current value)}`` for the other hyperparameters that differ."""
    keys = [k for k in dict.fromkeys([*saved,
                                      *current]) if not str(k).startswith("_") and k not in ARCHITECTURE_KEYS]
    out = {}
    for key in keys:
        old, new = _normal(key, saved.get(key)), _normal(key, current.get(key))
        if old != new:
            out[key] = (old, new)
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_resume(saved: Mapping, current: Mapping, where: str) -> None:
    """Raise a one-line :class:`ConfigError` if the model in ``where`` is not the configured one."""
    conflicts = architecture_conflicts(saved, current)
    if conflicts:
        key, (old, new) = next(iter(conflicts.items()))
        if isinstance(old, dict) and isinstance(new, dict):  # name the field: model.backbone.hidden_size
            field = next(k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k))
            key, old, new = f"{key}.{field}", old.get(field), new.get(field)
        also = ", ".join("model." + k for k in list(conflicts)[1:])
        others = f" (also {also})" if also else ""
        raise ConfigError(
            f"model.{key} differs from the checkpoint {where}{others}: checkpoint {_short(old)}, config "
            f"{_short(new)}; a resumed run keeps the model it was trained with: set model.{key} back, or "
            "start a new run without --ckpt_path"
        )


def describe_resume(where: str, step: Optional[int], changes: Mapping[str, tuple[Any, Any]]) -> str:
    """The one line printed when a run resumes."""
    head = f"resuming from {where} at step {step}: same model"
    if not changes:
        return head + "; no option changed (the LR schedule continues from this step)"
    parts = ", ".join(f"{k} {_short(old, 30)} -> {_short(new, 30)}" for k, (old, new) in changes.items())
    return head + f"; applied changed options: {parts} (the LR schedule continues from this step)"


def apply_optimizer_hparams(optimizer, scheduler, hparams: Mapping) -> None:
    """Write the configured optimisation options into a restored AdamW and its ``LambdaLR``.

    Param group 0 decays, group 1 (biases, norms) does not (``MaskedDiffusionLM.configure_optimizers``).
    The scheduler keeps its restored step count; its multiplier functions are the current config's,
    so the learning rate of the next step is ``learning_rate * multiplier(step)``.
    """
    lr = float(hparams["learning_rate"])
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = lr
        if i == 0:
            group["weight_decay"] = float(hparams["weight_decay"])
        if "betas" in group and hparams.get("betas") is not None:
            group["betas"] = tuple(float(b) for b in hparams["betas"])
    if scheduler is None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        return
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    step = scheduler.last_epoch
    for group, factor in zip(optimizer.param_groups, lambdas):
        group["lr"] = lr * factor(step)
    # What get_last_lr() reports (LambdaLR keeps it in this attribute).
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# ------------------------------------------------------------------ the --ckpt_path of the CLI
_SPECIAL_PATHS = ("best", "hpc", "registry")


def find_last_checkpoint(default_root_dir: Optional[str], dirpaths: Sequence[str] = ()) -> Optional[str]:
    """The newest ``last*.ckpt`` in the given checkpoint folders or where Lightning puts them under
    ``default_root_dir`` (``checkpoints/`` and ``<logger name>/<version>/checkpoints/``), or
    ``hpc_ckpt_<n>.ckpt`` of SLURM's auto-requeue in ``default_root_dir``; files or sharded folders.

    Lightning resolves ``ckpt_path="last"`` in *this* run's checkpoint folder, which with a logger is
    a new ``version_<n>`` folder: the previous run's ``last.ckpt`` is never found and training
    silently starts over. Looking at every version makes ``--ckpt_path last`` resume after a restart.
    """
    root = Path(default_root_dir or os.getcwd())
    folders = [Path(d) for d in dirpaths if d] + [root, root / "checkpoints"]
    folders += list(root.glob("*/*/checkpoints"))
    # Lightning's SLURM auto-requeue saves hpc_ckpt_<n>.ckpt in default_root_dir (and resumes from it
    # only when no --ckpt_path is given): a requeued `--ckpt_path last` job takes the newest of both.
    candidates = [p for folder in folders for p in folder.glob("last*.ckpt")] + list(
        root.glob("hpc_ckpt_*.ckpt")
    )
    found = []
    for path in candidates:
        if path.is_file() and not is_temp_file(path):
            found.append((path.stat().st_mtime, path))
        elif is_sharded_checkpoint(path):  # FSDP sharded: a folder, complete once its metadata is written
            found.append(((path / METADATA_FILE).stat().st_mtime, path))
    if not found:
        return None
    return str(max(found)[1])


def read_checkpoint(path: str) -> Optional[dict]:
    """The checkpoint at ``path`` (weights memory-mapped, not read), or None for what cannot be
    checked up front (a remote URL, a sharded checkpoint folder, ``best``/``hpc``/``last``).

    Raises a one-line :class:`ConfigError` for a missing or unreadable (truncated) file.
    """
    if "://" in path or path in _SPECIAL_PATHS or path == "last" or path.startswith("registry:"):
        return None
    file = Path(path).expanduser()
    if not file.exists():
        raise ConfigError(f"--ckpt_path {path}: no such checkpoint file")
    if file.is_dir():  # FSDP / DeepSpeed sharded checkpoints are folders: only FSDP's metadata is read
        return read_checkpoint_file(file / METADATA_FILE) if is_sharded_checkpoint(file) else None
    return read_checkpoint_file(path)
