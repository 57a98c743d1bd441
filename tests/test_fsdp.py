"""FSDP: the wrap policy of every family, the strategy from YAML and the command line, and (on two
CPU processes over gloo) training like one process, resuming from sharded checkpoints with an EMA,
and exporting a sharded checkpoint folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from diffusion_lm import MaskedDiffusionLM, ScratchBackbone
from diffusion_lm.distributed import (
    EncoderFSDPStrategy,
    check_strategy,
    encoder_layer_classes,
    read_sharded_checkpoint,
)
from diffusion_lm.errors import ConfigError

from .conftest import REPO, TINY, tiny_cli_args
from .families import FAMILY_NAMES, make_family
from .test_resume import _metrics

LAYERS = {"modernbert": "ModernBertEncoderLayer", "mmbert": "ModernBertEncoderLayer", "bert": "BertLayer",
          "roberta": "RobertaLayer", "xlmr": "XLMRobertaLayer", "t5": "T5Block"}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_wrap_unit_is_the_encoder_layer_of_every_family(tmp_path, family):
    model = MaskedDiffusionLM(str(make_family(family, tmp_path / family)), health_check=False)
    classes = encoder_layer_classes(model)
    assert [c.__name__ for c in classes] == [LAYERS[family]]
    layers = [m for m in model.modules() if isinstance(m, tuple(classes))]
    assert len(layers) == model.net.model.config.num_hidden_layers if family != "t5" else 2


def test_layer_classes_can_be_named(tmp_path):
    strategy = EncoderFSDPStrategy(layer_classes=["transformers.models.bert.modeling_bert.BertLayer"])
    assert [c.__name__ for c in strategy.wrap_classes(MaskedDiffusionLM(ScratchBackbone(**TINY)))] == [
        "BertLayer"
    ]
    with pytest.raises(ConfigError, match="layer_classes"):
        EncoderFSDPStrategy(layer_classes=["no.such.Layer"])
    with pytest.raises(ConfigError, match="trainer.precision"):
        EncoderFSDPStrategy(mixed_precision=object())


def test_the_health_check_is_skipped_under_the_strategy():
    from types import SimpleNamespace

    from diffusion_lm.health import MLMHealthCheck

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError("the health check read the data")

    check = MLMHealthCheck()  # skipped before reading any batch: its forward would bypass the FSDP root
    check.on_fit_start(
        SimpleNamespace(ckpt_path=None, strategy=EncoderFSDPStrategy(), datamodule=Untouchable()), None
    )
    assert check.report is None


def test_lightnings_plain_fsdp_strategy_is_one_clear_error():
    with pytest.raises(ConfigError, match="EncoderFSDPStrategy"):
        check_strategy(FSDPStrategy())
    check_strategy(EncoderFSDPStrategy())


@pytest.mark.parametrize("how", ["config", "flag"])
def test_the_strategy_comes_from_the_yaml_block_or_the_flag(tmp_path, how):
    from diffusion_lm.cli import DiffusionLMCLI

    args = ["--config", str(REPO / "configs" / "demo.yaml")]
    if how == "config":
        args += ["--config", str(REPO / "configs" / "strategy" / "fsdp.yaml")]
    else:
        args += [
            "--trainer.strategy=diffusion_lm.distributed.EncoderFSDPStrategy",
            "--trainer.strategy.state_dict_type=full",
        ]
    args += [
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.devices=2",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = DiffusionLMCLI(args=args, run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, EncoderFSDPStrategy)
    assert strategy._state_dict_type == ("sharded" if how == "config" else "full")
    assert [c.__name__ for c in strategy.wrap_classes(cli.model)] == ["ModernBertEncoderLayer"]


def _run(root: Path, data_file: Path, *extra: str) -> None:
    base = [
        a
        for a in tiny_cli_args(root, data_file)
        if a not in ("--trainer.logger=false", "--data.batch_size=4", "--trainer.max_steps=3")
    ]
    args = base + [
        "--trainer.log_every_n_steps=1",
        "--model.warmup_steps=0",
        "--model.lr_schedule=constant",
        "--model.learning_rate=1e-2",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={root}",
        "--trainer.logger.name=log",
        "--trainer.callbacks+=ModelCheckpoint",
        f"--trainer.callbacks.dirpath={root / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks+=diffusion_lm.ema.EMA",
        "--trainer.callbacks.decay=0.5",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_lm", "fit", *args],
        env=env,
        cwd=root.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.multiprocess
@pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_fsdp_on_two_processes_trains_like_one_resumes_and_exports(tmp_path, messages_jsonl):
    from diffusion_lm.export import export_checkpoint

    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    _run(single, messages_jsonl, "--trainer.max_steps=4", "--data.batch_size=8", "--trainer.logger.version=0")
    fsdp = ["--trainer.devices=2", "--data.batch_size=4", "--trainer.strategy=fsdp_encoder"]
    _run(sharded, messages_jsonl, *fsdp, "--trainer.max_steps=2", "--trainer.logger.version=0")
    assert (sharded / "ckpt" / "last.ckpt").is_dir()  # a folder of shards written by both ranks
    _run(
        sharded,
        messages_jsonl,
        *fsdp,
        "--trainer.max_steps=4",
        "--trainer.logger.version=1",
        "--ckpt_path=last",
    )

    want = _metrics(single / "log" / "version_0" / "metrics.csv")
    got = {
        **_metrics(sharded / "log" / "version_0" / "metrics.csv"),
        **_metrics(sharded / "log" / "version_1" / "metrics.csv"),
    }
    assert sorted(got) == sorted(want) == [0, 1, 2, 3]
    for step in want:  # FSDP divides gradients before and after its reduce-scatter: last-bit differences
        assert got[step] == pytest.approx(want[step], rel=1e-4), step

    # The consolidated shards hold what one process trained: the average and the trained weights.
    one = torch.load(single / "ckpt" / "last.ckpt", weights_only=False)
    two = read_sharded_checkpoint(sharded / "ckpt" / "last.ckpt")
    assert two["global_step"] == one["global_step"] == 4
    for key in ("state_dict", "current_model_state"):
        assert two[key].keys() == one[key].keys()
        for name, value in one[key].items():
            torch.testing.assert_close(two[key][name], value, rtol=1e-3, atol=1e-4, msg=f"{key} {name}")

    out = export_checkpoint(sharded / "ckpt" / "last.ckpt", tmp_path / "export")
    from safetensors.torch import load_file

    exported = load_file(out / "model.safetensors")
    for name, value in exported.items():
        torch.testing.assert_close(value, two["state_dict"]["net.model." + name], msg=name)
