"""The launch scripts: tools/launch_torchrun.sh trains with 2 CPU processes (DDP, with an EMA) like
one process with the whole batch, and tools/slurm/fit.sbatch runs under Lightning's SLURM environment
(srun stood in for by a script that starts the tasks with SLURM's variables) and resumes when the job
is requeued."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_lm.resume import find_last_checkpoint

from .conftest import REPO, tiny_cli_args
from .test_resume import _metrics

needs_gloo = pytest.mark.skipif(
    sys.platform != "linux" or not torch.distributed.is_gloo_available() or shutil.which("bash") is None,
    reason="needs bash and gloo",
)

# srun on one node: start SLURM_NTASKS copies of the command with the variables srun gives each task.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(root: Path, data_file: Path, *extra: str) -> list[str]:
    drop = ("--trainer.logger=false", "--trainer.devices=1", "--data.batch_size=4", "--trainer.max_steps=3")
    args = [a for a in tiny_cli_args(root, data_file) if a not in drop]
    return args + [
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=0",
        "--model.lr_schedule=constant",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={root}",
        "--trainer.logger.name=log",
        "--trainer.callbacks+=ModelCheckpoint",
        f"--trainer.callbacks.dirpath={root / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
        *extra,
    ]


def _env(**extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "WORLD_", "RANK", "LOCAL_"))
    }
    return {**env, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def _check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.multiprocess
@needs_gloo
def test_torchrun_script_trains_two_processes_like_one(tmp_path, messages_jsonl):
    script = str(REPO / "tools" / "launch_torchrun.sh")
    runs = {}
    for nproc, batch in ((1, 8), (2, 4)):
        root = tmp_path / f"n{nproc}"
        out = _check(
            subprocess.run(
                [
                    "bash",
                    script,
                    "fit",
                    *_args(
                        root,
                        messages_jsonl,
                        f"--data.batch_size={batch}",
                        "--trainer.max_steps=3",
                        "--trainer.callbacks+=diffusion_lm.ema.EMA",
                        "--trainer.callbacks.decay=0.5",
                    ),
                ],
                env=_env(NPROC=str(nproc), MASTER_PORT=str(_free_port())),
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=600,
            )
        )
        if nproc == 2:
            assert "MEMBER: 2/2" in out
        runs[nproc] = _metrics(root / "log" / "version_0" / "metrics.csv")
    assert sorted(runs[2]) == sorted(runs[1]) == [0, 1, 2]
    for step, loss in runs[1].items():  # 2 ranks x 4 examples = 1 process x 8: the same global batch
        assert runs[2][step] == pytest.approx(loss, abs=1e-5), step
    # The EMA under DDP: the same average and trained weights as one process.
    one, two = (torch.load(tmp_path / f"n{n}" / "ckpt" / "last.ckpt", weights_only=False) for n in (1, 2))
    for key in ("state_dict", "current_model_state"):
        for name, value in one[key].items():
            torch.testing.assert_close(two[key][name], value, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")


def test_torchrun_script_without_arguments_prints_its_usage():
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "launch_torchrun.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "NNODES" in proc.stdout and "NODE_RANK" in proc.stdout


@pytest.mark.multiprocess
@needs_gloo
def test_sbatch_script_runs_under_slurm_and_resumes_when_requeued(tmp_path, messages_jsonl):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    config = tmp_path / "cpu.yaml"
    config.write_text("trainer:\n  accelerator: cpu\n")
    root = tmp_path / "run"
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        CONFIG=str(config),
        MASTER_PORT=str(_free_port()),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="diffusion-lm",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_NNODES="1",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NODELIST="localhost",
    )
    script = str(REPO / "tools" / "slurm" / "fit.sbatch")
    first = _check(
        subprocess.run(
            [
                "bash",
                script,
                *_args(
                    root,
                    messages_jsonl,
                    "--trainer.max_steps=2",
                    "--data.batch_size=4",
                    "--trainer.logger.version=0",
                ),
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    assert "MEMBER: 2/2" in first
    assert torch.load(root / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 2
    # The requeued job runs the same script: `--ckpt_path last` continues from the newest checkpoint.
    second = _check(
        subprocess.run(
            [
                "bash",
                script,
                *_args(
                    root,
                    messages_jsonl,
                    "--trainer.max_steps=4",
                    "--data.batch_size=4",
                    "--trainer.logger.version=1",
                ),
            ],
            env={**env, "SLURM_RESTART_COUNT": "1", "MASTER_PORT": str(_free_port())},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    assert "resuming from" in second and "at step 2" in second
    assert sorted(_metrics(root / "log" / "version_1" / "metrics.csv")) == [2, 3]
    assert torch.load(root / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_last_takes_the_newest_of_last_and_slurm_requeue_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"x")
    hpc.write_bytes(b"x")
    os.utime(last, (1, 1))
    assert find_last_checkpoint(str(tmp_path)) == str(hpc)
    os.utime(hpc, (0, 0))
    assert find_last_checkpoint(str(tmp_path)) == str(last)
