"""`validate` and `test` of the demo recipe report the same figures with 2 processes as with one
(CPU DDP over gloo; an odd validation set and odd batch sizes, so the last global batch is topped up
with copies that must not count)."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

from .conftest import REPO


def _demo_config(tmp_path) -> str:
    """The demo recipe with one Russian validation dialog fewer: an odd number of validation examples."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    config["data"]["sources"][1]["val_size"] -= 1
    path = tmp_path / "demo-odd.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return str(path)


def _evaluate(tmp_path, fn: str, devices: int, val_batch_size: int) -> dict:
    from diffusion_lm.cli import DiffusionLMCLI

    cli = DiffusionLMCLI(args=[
        "--config", _demo_config(tmp_path),
        f"--data.val_batch_size={val_batch_size}",
        f"--trainer.devices={devices}",
        f"--trainer.strategy={'ddp_spawn' if devices > 1 else 'auto'}",
        "--trainer.callbacks=[]",  # no sampling callback: the NELBO is what must agree
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path / f'{fn}-{devices}-{val_batch_size}'}",
        f"--data.cache_dir={tmp_path / 'hf'}",
    ], run=False)
    out = getattr(cli.trainer, fn)(cli.model, cli.datamodule, verbose=False)[0]
    if devices == 1:  # set up in this process (the spawned ranks set up their own copies)
        out["examples"] = len(cli.datamodule.val_dataset)
    return out


@pytest.mark.multiprocess
@pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("fn", ["validate", "test"])
def test_the_demo_recipe_evaluates_the_same_on_two_processes(tmp_path, fn):
    prefix = "val" if fn == "validate" else "test"
    one = _evaluate(tmp_path, fn, devices=1, val_batch_size=5)
    two = _evaluate(tmp_path, fn, devices=2, val_batch_size=3)
    assert one["examples"] % 2 == 1 and one["examples"] % (
        2 * 3
    )  # odd, and the last global batch is topped up
    keys = [k for k in one if k.startswith(f"{prefix}/")]
    assert {f"{prefix}/nelbo", f"{prefix}/nelbo_en", f"{prefix}/nelbo_ru"} <= set(keys)
    for key in keys:  # NELBO to 1e-6; its exponential (the perplexity bound) to float32 precision
        tolerance = {"abs": 1e-6} if "/nelbo" in key else {"rel": 1e-6}
        assert two[key] == pytest.approx(one[key], **tolerance), key
