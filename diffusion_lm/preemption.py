"""``PreemptionCheckpoint``: a stopped job saves its state and says it did not finish.

Schedulers stop jobs with a signal (Kubernetes, Docker and most clouds send SIGTERM; SLURM sends
SIGTERM, or a chosen signal such as SIGUSR1 some seconds before the time limit with
``--signal=USR1@90``). Lightning 2.6 catches SIGTERM, saves nothing and exits with code 0, so a
preempted job looks successful and loses every step since the last periodic checkpoint
(lightning#19916). With this callback the signal is noted, and at the end of the current training
step (or of the running validation) all ranks agree to stop, write one checkpoint, and the process
exits with ``128 + signal number`` (143 for SIGTERM, 138 for SIGUSR1), as if the signal had
killed it, but with nothing lost.

SLURM auto-requeue stays Lightning's: when the Trainer runs under ``SLURMEnvironment(auto_requeue=True)``
(Lightning's default on SLURM), its requeue signal (SIGUSR1) is left to Lightning, which saves
``hpc_ckpt_<n>.ckpt`` in ``default_root_dir``, requeues the job and resumes from that file when
the job restarts; SIGTERM is still handled here.

``diffusion-lm fit`` adds one with the defaults unless ``trainer.callbacks`` has one (configure it
there, or ``signals: []`` to turn it off).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .errors import ConfigError

__all__ = ["Preempted", "PreemptionCheckpoint"]

log = logging.getLogger(__name__)


class Preempted(SIGTERMException):
    """Raised (on every rank) after the preemption checkpoint is written; ``code`` is ``128 + signum``,
    so an uncaught one exits the process with that status."""

    def __init__(self, signum: int, path: str) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.path = path


class PreemptionCheckpoint(Callback):
    """On a stop signal, save a checkpoint at the next step boundary and exit with ``128 + signum``.

    Args:
        signals: signal names that trigger it (default ``SIGTERM`` and ``SIGUSR1``; ``[]`` turns it off).
        dirpath: folder of the checkpoint (default: the first ``ModelCheckpoint``'s folder, else
            ``<default_root_dir>/checkpoints``).
        filename: file name without ``.ckpt`` (default: the ``ModelCheckpoint``'s last-checkpoint name,
            ``last``, so ``--ckpt_path`` of the printed path, or ``last``, resumes from it).
    """

    def __init__(self, signals: Optional[list[str]] = None, dirpath: Optional[str] = None,
                 filename: Optional[str] = None) -> None:
        super().__init__()
        names = ["SIGTERM", "SIGUSR1"] if signals is None else list(signals)
        self.signals: list[signal.Signals] = []
        for name in names:
            key = str(name).strip().upper()
            key = key if key.startswith("SIG") else f"SIG{key}"
            if key not in signal.Signals.__members__:
                if key in ("SIGUSR1", "SIGUSR2"):  # not on Windows
                    continue
                raise ConfigError(f"PreemptionCheckpoint: unknown signal {name!r}; use names such as SIGTERM "
                                  "or SIGUSR1")
            if key in ("SIGKILL", "SIGSTOP"):
                raise ConfigError(f"PreemptionCheckpoint: {key} cannot be caught; use SIGTERM or SIGUSR1")
            self.signals.append(signal.Signals[key])
        self.dirpath = dirpath
        self.filename = filename
        self.received: Optional[int] = None
        self._previous: dict[signal.Signals, Any] = {}
        self._before_lightning: dict[signal.Signals, Any] = {}

    # ------------------------------------------------------------------ signal handlers
    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            log.warning("%s received: a checkpoint will be saved at the end of the current step",
                        signal.Signals(signum).name)
        previous = self._before_lightning.get(signal.Signals(signum))
        if callable(previous):  # a handler the user had installed before training
            previous(signum, frame)

    def _owned_signals(self) -> list[signal.Signals]:
        owned = []
        for sig in self.signals:
            if sig != signal.SIGTERM and signal.getsignal(sig) != self._before_lightning.get(sig):
                # Lightning installed a handler on it since setup: SLURMEnvironment(auto_requeue=True)'s
                # requeue handler (it saves hpc_ckpt_<n>.ckpt and requeues the job). Keep it.
                continue
            owned.append(sig)
        return owned

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # Before Lightning installs its own handlers (it does so right before the loop starts).
        self.received = None
        self._before_lightning = {s: signal.getsignal(s) for s in self.signals}

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Replace Lightning's SIGTERM handler while training: it ends the run with exit code 0 and
        # no checkpoint, also from inside validation (lightning#19916). Lightning restores the
        # original handlers at teardown; ours are removed first (on_train_end / on_exception).
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionCheckpoint: not in the main thread, signal handlers not installed")
            return
        for sig in self._owned_signals():
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handler:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                     exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._restore()

    def __getstate__(self) -> dict:
        # Signal handlers belong to one process (and may not pickle): a spawned rank starts clean.
        state = self.__dict__.copy()
        state["_previous"], state["_before_lightning"] = {}, {}
        return state

    # ---------------------------------------------------------------------- stopping
    def checkpoint_path(self, trainer: "pl.Trainer") -> str:
        """Where the preemption checkpoint goes (see the class arguments)."""
        callback = trainer.checkpoint_callback
        dirpath = (self.dirpath or getattr(callback, "dirpath", None)
                   or os.path.join(trainer.default_root_dir, "checkpoints"))
        name = self.filename or getattr(callback, "CHECKPOINT_NAME_LAST", None) or "last"
        extension = getattr(callback, "FILE_EXTENSION", None) or ".ckpt"
        return os.path.join(str(dirpath), f"{name}{extension}")

    def _maybe_stop(self, trainer: "pl.Trainer") -> None:
        strategy = trainer.strategy
        # Every rank takes part, so all stop at the same step even if only one got the signal.
        if not strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        local = torch.tensor(float(self.received or 0), device=strategy.root_device)
        signum = int(strategy.reduce(local, reduce_op="max").item())
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        name = signal.Signals(signum).name
        if trainer.is_global_zero:
            print(f"diffusion-lm: {name} received: saved {path} at step {trainer.global_step}; exiting with "
                  f"code {128 + signum}. Resume with --ckpt_path {path}", file=sys.stderr, flush=True)
        raise Preempted(signum, path)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._maybe_stop(trainer)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._maybe_stop(trainer)


def add_default(callbacks: Any, factory: Callable[[], Callback] = PreemptionCheckpoint) -> list:
    """``callbacks`` (None, one callback or a list) with a default ``PreemptionCheckpoint`` added
    unless one is configured."""
    items = [] if callbacks is None else list(callbacks) if isinstance(callbacks,
                                                                       (list, tuple)) else [callbacks]
    if not any(isinstance(cb, PreemptionCheckpoint) for cb in items):
        items.append(factory())
    return items
