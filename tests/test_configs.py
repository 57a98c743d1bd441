"""Every YAML recipe in ``configs/`` parses and instantiates through the real CLI.

The hub is out of reach in tests, so each seed-model recipe runs with a tiny stand-in of its family
(``--model.backbone=<local folder>``) and local snapshots of its datasets, in folders named like the
hub datasets (so the same dataset presets apply); everything else comes from the recipe itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from diffusion_lm import MaskedDiffusionLM
from diffusion_lm.cli import DiffusionLMCLI

from .conftest import REPO
from .families import make_family

RECIPES = sorted((REPO / "configs").glob("*.yaml"))

# recipe -> (hub id, stand-in family)
SEED_MODELS = {
    "rumodernbert-base": ("deepvk/RuModernBERT-base", "modernbert"),
    "mmbert-base": ("jhu-clsp/mmBERT-base", "mmbert"),
    "ettin-encoder-1b": ("jhu-clsp/ettin-encoder-1b", "modernbert"),
    "frida": ("ai-forever/FRIDA", "t5"),
    "modernbert-base": ("answerdotai/ModernBERT-base", "modernbert"),
}

MIX = [
    ("allenai/tulu-3-sft-mixture", "messages", "en", 0.5),
    ("Vikhrmodels/GrandMaster-PRO-MAX", "messages", "ru", 0.5),
]


def _dialog(i: int, ru: bool) -> list[dict]:
    if ru:
        return [{"role": "user", "content": f"Привет! Сколько будет {i} + {i}?"},
                {"role": "assistant", "content": f"Будет {2 * i}."}]
    return [{"role": "user", "content": f"Hello! What is {i} + {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."}]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> dict[str, Path]:
    """Local folders in each dataset's schema: Tulu (``messages``) and GrandMaster (``conversation``)."""
    root = tmp_path_factory.mktemp("datasets")
    tulu, grandmaster = root / "tulu-3-sft-mixture", root / "GrandMaster-PRO-MAX"
    tulu.mkdir()
    grandmaster.mkdir()
    (tulu / "train.jsonl").write_text("\n".join(
        json.dumps({"id": f"t{i}", "messages": _dialog(i, False), "source": "test"}) for i in range(16)),
                                      encoding="utf-8")
    (grandmaster / "train.jsonl").write_text("\n".join(
        json.dumps({"conversation": _dialog(i, True)}, ensure_ascii=False) for i in range(16)),
                                             encoding="utf-8")
    return {"allenai/tulu-3-sft-mixture": tulu, "Vikhrmodels/GrandMaster-PRO-MAX": grandmaster}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stand-ins")
    return {
        "modernbert": make_family("modernbert", root / "modernbert", max_positions=1024),
        "mmbert": make_family("mmbert", root / "mmbert", max_positions=1024),
        "t5": make_family("t5", root / "t5"),
    }


def test_every_seed_model_has_a_recipe():
    assert {p.stem for p in RECIPES} >= set(SEED_MODELS) | {"demo"}


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.stem in SEED_MODELS], ids=lambda p: p.stem)
def test_seed_recipe_content(recipe):
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    hub_id, _ = SEED_MODELS[recipe.stem]
    assert raw["model"]["backbone"] == hub_id
    sources = raw["data"]["sources"]
    assert [(s["path"], s["format"], s["language"], s["weight"]) for s in sources] == MIX
    assert sources[1]["column"] == "conversation"
    trainer = raw["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == ("gpu", 1, "bf16-mixed")
    canvas = raw["data"]["canvas"]["length"]
    assert canvas in range(128, 257) and raw["data"]["max_length"] > canvas
    text = recipe.read_text(encoding="utf-8")
    assert "num_nodes" in text and "strategy=ddp" in text  # the scaling-out comment


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_instantiates_through_the_cli(recipe, stand_ins, snapshots, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # recipes write to runs/<name> relative to the working directory
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    args = ["--trainer.accelerator=cpu"]
    if recipe.stem in SEED_MODELS:
        for source in raw["data"]["sources"]:
            source["path"] = str(snapshots[source["path"]])
            source["val_size"] = 2
        local = tmp_path / recipe.name
        local.write_text(yaml.safe_dump(raw), encoding="utf-8")
        family = SEED_MODELS[recipe.stem][1]
        args = ["--config", str(local), f"--model.backbone={stand_ins[family]}", "--data.total_samples=null",
                "--data.num_proc=null", "--data.num_workers=0", "--data.batch_size=4"] + args
    else:
        args = ["--config", str(recipe)] + args
    cli = DiffusionLMCLI(args=args, run=False)

    model = cli.model
    assert isinstance(model, MaskedDiffusionLM)
    assert model.hparams.learning_rate == pytest.approx(float(raw["model"]["learning_rate"]))
    assert model.hparams.canvas_length == raw["data"]["canvas"]["length"]  # linked from data.canvas.length
    assert any(isinstance(cb, ModelCheckpoint) for cb in cli.trainer.callbacks)
    if recipe.stem not in SEED_MODELS:
        return
    assert cli.trainer.precision == "bf16-mixed"
    assert any(isinstance(cb, EMAWeightAveraging) for cb in cli.trainer.callbacks)
    data = cli.datamodule
    assert [(s.language, s.weight) for s in data.sources] == [("en", 0.5), ("ru", 0.5)]
    assert data.sources[1].keys()[0] == "conversation"
    # The recipe's data settings work with the model's chat template on records in the real schemas.
    data.template = model.template
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert len(batch["sample_index"]) == 4 and set(batch["language"]) <= {"en", "ru"}
    assert data.summary["per_language"].keys() == {"en", "ru"}


def test_demo_checkpoints_and_logs_follow_default_root_dir(tmp_path, monkeypatch):
    """No folder is pinned in the demo: `--trainer.default_root_dir=X` moves checkpoints and logs to X,
    where the Makefile's generate step looks for them."""
    from diffusion_lm.cli import main

    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    assert "logger" not in raw["trainer"]
    checkpoint = next(c for c in raw["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    assert "dirpath" not in checkpoint["init_args"]
    checkpoint["init_args"]["every_n_train_steps"] = 1  # the demo's own callback, saving at once
    config = tmp_path / "demo-fast.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = tmp_path / "X"
    main(["fit", "--config", str(config), f"--trainer.default_root_dir={root}", "--trainer.max_steps=2",
          "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--data.batch_size=4"])
    assert list(cwd.iterdir()) == []  # nothing in ./runs/demo
    run = root / "lightning_logs" / "version_0"
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"step=2.ckpt", "last.ckpt"}
    # TensorBoard, saved config
    assert list(run.glob("events.out.tfevents.*")) and (run / "config.yaml").is_file()
    # The Makefile's generate step finds the checkpoint with its glob, relative to the demo's folder.
    glob = next(line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith("DEMO_CKPT"))
    pattern = glob.split("ls -td ", 1)[1].split(" |", 1)[0]
    assert pattern.startswith(raw["trainer"]["default_root_dir"] + "/")
    relative = pattern[len(raw["trainer"]["default_root_dir"]) + 1:]
    assert list(root.glob(relative)) == [run / "checkpoints" / "last.ckpt"]
