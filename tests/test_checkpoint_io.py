"""Checkpoints and output files are replaced atomically, never half-written, never with NaN weights."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_lm.checkpoint_io import AtomicCheckpointIO, NonFiniteCheckpointError
from diffusion_lm.cli import DiffusionLMCLI
from diffusion_lm.errors import ConfigError
from diffusion_lm.files import atomic_write, is_temp_file, remove_stale_temps, temp_path
from diffusion_lm.resume import find_last_checkpoint

from .conftest import tiny_cli_args


def _checkpoint(value: float, step: int = 1) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((4,), value)}}


def _hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_failed_write_keeps_the_previous_last_ckpt_and_leaves_no_temp_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    last = tmp_path / "run" / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0), last)
    before = last.read_bytes()

    def torch_save_dies_midway(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("diffusion_lm.checkpoint_io.torch.save", torch_save_dies_midway)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint(_checkpoint(2.0, step=2), last)
    assert last.read_bytes() == before
    assert _hidden(last.parent) == []
    assert io.load_checkpoint(last)["global_step"] == 1


def test_checkpoint_files_get_the_umask_mode_not_0600(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1.0), tmp_path / "last.ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "last.ckpt").stat().st_mode) == 0o666 & ~umask


def test_non_finite_weights_are_never_written(tmp_path):
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0), last)
    bad = _checkpoint(1.0, step=7)
    bad["state_dict"]["net.layer.weight"] = torch.tensor([1.0, float("nan")])
    with pytest.raises(NonFiniteCheckpointError) as info:
        io.save_checkpoint(bad, last)
    message = str(info.value)
    assert isinstance(info.value, ConfigError) and "\n" not in message
    assert "step 7" in message and "net.layer.weight" in message and "learning_rate" in message
    assert io.load_checkpoint(last)["global_step"] == 1  # the last good checkpoint is kept


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_files_of_a_killed_writer_are_ignored_then_removed(tmp_path):
    io = AtomicCheckpointIO()
    host = socket.gethostname().replace("-", "_")
    killed = tmp_path / f".last.ckpt.tmp-{host}-{_dead_pid()}-0badc0de"
    elsewhere = tmp_path / ".last.ckpt.tmp-otherhost-1-00000000"  # another machine's writer: kept
    for stray in (killed, elsewhere):
        stray.write_bytes(b"PK partial")
    assert is_temp_file(killed, "last.ckpt") and not is_temp_file(tmp_path / "last.ckpt")
    assert find_last_checkpoint(str(tmp_path)) is None  # `--ckpt_path last` never picks a temp file
    io.save_checkpoint(_checkpoint(1.0), tmp_path / "last.ckpt")
    assert not killed.exists() and elsewhere.exists()
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "last.ckpt")
    assert remove_stale_temps(tmp_path) == []


def test_atomic_write_replaces_text_files_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "answers.jsonl"
    with atomic_write(target) as handle:
        handle.write("old\n")
    target.chmod(0o640)
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write("new, partial")
            raise RuntimeError("killed while writing")
    assert target.read_text() == "old\n" and _hidden(target.parent) == []
    with atomic_write(target) as handle:
        handle.write("new\n")
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # a replaced file keeps its mode
    assert temp_path(target).parent == target.parent  # same folder, hence same filesystem


def test_cli_installs_the_atomic_writer_unless_another_checkpoint_io_is_given(tmp_path, messages_jsonl):
    args = tiny_cli_args(tmp_path, messages_jsonl)
    cli = DiffusionLMCLI(args=args, run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    cli = DiffusionLMCLI(args=args + ["--trainer.plugins=lightning.pytorch.plugins.TorchCheckpointIO"],
                         run=False)
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO"


def test_atomic_write_handles_links_and_devices(tmp_path):
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    with atomic_write(link) as handle:  # an output path that is a link: the file it points to is replaced
        handle.write("new\n")
    assert link.is_symlink() and real.read_text() == "new\n"
    step = tmp_path / "step=2.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0, step=2), step)
    last = tmp_path / "last.ckpt"
    last.symlink_to(step)  # ModelCheckpoint(save_last="link")
    AtomicCheckpointIO().save_checkpoint(_checkpoint(2.0, step=3), last)
    assert not last.is_symlink() and torch.load(step, weights_only=False)["global_step"] == 2
    with atomic_write("/dev/null") as handle:  # not a regular file: written in place, never replaced
        handle.write("discarded")
    assert Path("/dev/null").is_char_device()
