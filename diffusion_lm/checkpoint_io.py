"""``AtomicCheckpointIO``: Lightning checkpoints that are never half-written and never hold NaN weights.

Lightning's ``TorchCheckpointIO`` serialises the whole checkpoint into memory and writes it through
an fsspec transaction whose temporary file lives in the system temp folder: when that is another
filesystem the final move is a copy, and a kill during it leaves a truncated (even 0-byte)
``last.ckpt``. This plugin writes a temporary file in the checkpoint's own folder, fsyncs it,
``os.replace``s it over the target and fsyncs the folder (:func:`diffusion_lm.files.atomic_write`):
after a crash the target holds either the previous checkpoint or the new one. Leftover temporary
files of a killed writer are hidden names (``.last.ckpt.tmp-...``) that no ``last``/top-k lookup
matches, and the next save into the folder removes them.

It also refuses to write a checkpoint whose weights hold NaN or inf: a diverged run must not
overwrite the last good ``last.ckpt``.

``diffusion-lm fit|validate|test|predict`` install it unless the Trainer is given another
``CheckpointIO`` plugin; from Python: ``Trainer(plugins=[AtomicCheckpointIO()])``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Callable, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins import TorchCheckpointIO
from fsspec.implementations.local import LocalFileSystem

from .errors import ConfigError
from .files import atomic_write

__all__ = ["AtomicCheckpointIO", "NonFiniteCheckpointError", "non_finite_tensors", "read_checkpoint_file",
           "unreadable_checkpoint_message"]


class NonFiniteCheckpointError(ConfigError):
    """A checkpoint was not written because some of its weights are NaN or infinite."""


def non_finite_tensors(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or an infinity."""
    bad = []
    for name, value in state_dict.items():
        if hasattr(value, "to_local"):  # a DTensor: check this rank's shard (no collective from one rank)
            value = value.to_local()
        if isinstance(value,
                      torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(name)
    return bad


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes and a refusal to save non-finite weights.

    Remote paths (``s3://``, ...) go through Lightning's own writer (object stores publish an
    upload atomically). Loading is Lightning's, with a one-line error for a missing or truncated file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH,
                        storage_options: Optional[Any] = None) -> None:
        bad = non_finite_tensors(checkpoint.get("state_dict") or {})
        if bad:
            step = checkpoint.get("global_step")
            raise NonFiniteCheckpointError(
                f"refusing to write checkpoint {path} (step {step}): {len(bad)} weight tensor(s) hold "
                f"NaN/inf (first: {bad[0]}); the run diverged: lower model.learning_rate and resume from the "
                "last good checkpoint"
            )
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        # follow_symlinks=False: with ModelCheckpoint(save_last="link") last.ckpt is a link to a step
        # checkpoint, which must not be overwritten; the link itself is replaced by the new file.
        with atomic_write(os.fspath(path), "wb", follow_symlinks=False) as handle:
            torch.save(checkpoint, handle)

    def load_checkpoint(self, path: _PATH, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise ConfigError(f"checkpoint {path}: no such file") from None
        except (EOFError, RuntimeError, OSError, ValueError, pickle.UnpicklingError,
                zipfile.BadZipFile) as err:
            raise ConfigError(unreadable_checkpoint_message(path, err)) from err


def unreadable_checkpoint_message(path: _PATH, err: BaseException) -> str:
    """One line for a checkpoint ``torch.load`` could not read."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (f"checkpoint {path} cannot be read ({type(err).__name__}: {first}); it is truncated or not a "
            "Lightning checkpoint: use an earlier checkpoint")


def read_checkpoint_file(path: _PATH, flag: str = "--ckpt_path") -> dict:
    """The checkpoint dict at ``path``, weights memory-mapped (not read into memory): for its
    hyperparameters, data summary or EMA state. A file ``torch.load`` cannot read (truncated, not a
    checkpoint) is a one-line :class:`ConfigError` naming ``flag``."""
    try:
        return torch.load(os.path.expanduser(os.fspath(path)), map_location="cpu", weights_only=False,
                          mmap=True)
    except Exception as err:  # truncated zip, not a checkpoint at all, ...
        raise ConfigError(f"{flag}: {unreadable_checkpoint_message(path, err)}") from None
