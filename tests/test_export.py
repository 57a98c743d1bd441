"""Export: every family trains a few steps, exports, reloads with AutoModelForMaskedLM, and gives
identical logits and identical generations from the checkpoint and from the export folder."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from transformers import AutoModelForMaskedLM

from diffusion_lm import ConfigError, DataSource, DialogDataModule, MaskedDiffusionLM, load_model
from diffusion_lm.cli import main
from diffusion_lm.data import CanvasPolicy
from diffusion_lm.export import export_checkpoint, export_model, read_diffusion_config
from diffusion_lm.sampling import SamplerConfig

from .conftest import DIALOGS, write_jsonl
from .families import FAMILY_NAMES, make_family

PROMPTS = ["Hello there", "Как дела?"]


def _data(path: Path) -> DialogDataModule:
    return DialogDataModule([DataSource(str(path), format="messages", language="en", val_size=0),
                             DataSource(str(path), format="messages", language="ru", val_size=0,
                                        name="ru-copy")],
                            batch_size=4, max_length=96, canvas=CanvasPolicy(length=16))


def _fit(folder: Path, data_file: Path, root: Path, callbacks=(), steps: int = 3) -> Path:
    """A few training steps from ``folder``; returns the last checkpoint."""
    pl.seed_everything(0)
    model = MaskedDiffusionLM(str(folder), warmup_steps=1, learning_rate=3e-3, canvas_length=16,
                              health_check=False)
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
    pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
               enable_model_summary=False, use_distributed_sampler=False, default_root_dir=root,
               limit_val_batches=0, callbacks=[checkpoint, *callbacks]).fit(model, _data(data_file))
    return root / "last.ckpt"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "dialogs.jsonl", DIALOGS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_file):
    """``trained(family) -> (checkpoint, export folder)``: a few training steps, built once per family."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            ckpt = _fit(make_family(family, root / "backbone"), data_file, root / "run")
            cache[family] = (ckpt, export_checkpoint(ckpt, root / "export"))
        return cache[family]

    return get


def _batch(model: MaskedDiffusionLM):
    rows = [model.prompt_ids(p) for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), model.template.pad_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_export_reloads_with_identical_logits_and_generations(trained, family):
    ckpt, folder = trained(family)
    trained = load_model(str(ckpt))
    plain = AutoModelForMaskedLM.from_pretrained(folder).eval()
    ids, mask = _batch(trained)
    with torch.no_grad():
        expected = trained.net.model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, expected)

    reloaded = load_model(str(folder))  # a folder dispatches to diffusion_lm.export.load_exported
    assert isinstance(reloaded, MaskedDiffusionLM) and not reloaded.training
    assert reloaded.prompt_ids(PROMPTS[1]) == trained.prompt_ids(PROMPTS[1])
    query = mask.bool()
    with torch.no_grad():
        assert torch.equal(reloaded.denoise(ids, mask, query), trained.denoise(ids, mask, query))
    # EOS and pad suppressed so every answer fills its canvas: a real comparison, not two empty answers.
    greedy = SamplerConfig.preset("greedy",
                                  suppress_tokens=[trained.template.eos_id, trained.template.pad_id])
    for sampler, seed in ((greedy, 0), (None, 7)):
        a = trained.generate(PROMPTS, sampler=sampler, seed=seed)
        b = reloaded.generate(PROMPTS, sampler=sampler, seed=seed)
        assert a.ids == b.ids and a.sequences == b.sequences and a.texts == b.texts
    assert all(len(row) == 16 for row in trained.generate(PROMPTS, sampler=greedy, seed=0).ids)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_export_folder_contents(trained, family):
    ckpt, folder = trained(family)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "diffusion_config.json",
            "README.md"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config  # no remote code
    trained = load_model(str(ckpt))
    meta = read_diffusion_config(folder)
    assert meta["mask_token_id"] == trained.mask_id
    assert meta["chat_template"] == trained.template.to_config()
    assert meta["schedule"] == {"class_path": "diffusion_lm.schedules.LogLinearSchedule", "init_args": {}}
    assert meta["sampler"]["canvas_length"] == 16 and "quality" in meta["sampler"]["presets"]
    assert meta["training"]["weights"] == "current" and meta["training"]["global_step"] == 3
    assert set(meta["data"]["per_language"]) == {"en", "ru"} and meta["data"]["train_examples"] > 0
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "- ru" in card
    if family == "t5":
        assert meta["architecture"] == "T5EncoderForMaskedLM" and "import diffusion_lm" in card


def test_plain_transformers_loads_exports_without_diffusion_lm(trained):
    """Only transformers in a fresh interpreter: the ModernBERT/BERT exports load; T5 needs our class."""
    folders = {family: trained(family)[1] for family in ("mmbert", "t5")}
    code = (
        "import sys\n"
        "from transformers import AutoModelForMaskedLM\n"
        "m = AutoModelForMaskedLM.from_pretrained(sys.argv[1])\n"
        "print(type(m).__name__)\n"
        "try:\n"
        "    AutoModelForMaskedLM.from_pretrained(sys.argv[2])\n"
        "except ValueError as err:\n"
        "    print('T5:', str(err).splitlines()[0][:60])\n"
        "assert 'diffusion_lm' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folders["mmbert"]), str(folders["t5"])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ModernBertForMaskedLM" in out.stdout
    assert "T5: Unrecognized configuration class" in out.stdout
    # With diffusion_lm imported (as here), the same call builds our registered class.
    assert type(AutoModelForMaskedLM.from_pretrained(folders["t5"])).__name__ == "T5EncoderForMaskedLM"


def test_ema_weights_are_exported(tmp_path, data_file):
    ckpt = _fit(make_family("bert", tmp_path / "b"), data_file, tmp_path / "run",
                callbacks=[EMAWeightAveraging(decay=0.5)], steps=4)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert "current_model_state" in state  # how Lightning stores EMA: averaged in state_dict, raw aside
    key = "net.model.bert.encoder.layer.0.attention.self.query.weight"
    hf_key = key.removeprefix("net.model.")
    assert not torch.equal(state["state_dict"][key], state["current_model_state"][key])
    from safetensors.torch import load_file

    auto = export_checkpoint(ckpt, tmp_path / "auto")
    assert read_diffusion_config(auto)["training"]["weights"] == "ema"
    assert torch.equal(load_file(auto / "model.safetensors")[hf_key], state["state_dict"][key])
    current = export_checkpoint(ckpt, tmp_path / "current", weights="current")
    assert read_diffusion_config(current)["training"]["weights"] == "current"
    assert torch.equal(load_file(current / "model.safetensors")[hf_key], state["current_model_state"][key])


def test_ema_request_on_a_plain_checkpoint_is_one_clear_error(trained, tmp_path):
    ckpt, _ = trained("bert")
    with pytest.raises(ConfigError, match="EMAWeightAveraging"):
        export_checkpoint(ckpt, tmp_path / "x", weights="ema")


def test_failed_export_leaves_no_folder_and_keeps_the_old_one(trained, tmp_path, monkeypatch):
    ckpt, _ = trained("bert")
    model = load_model(str(ckpt))
    target = tmp_path / "out"
    target.mkdir()
    (target / "marker").write_text("old")
    (target / "diffusion_config.json").write_text("{}")  # an earlier export: --overwrite may replace it
    with pytest.raises(ConfigError, match="already exists"):
        export_model(model, target)

    import diffusion_lm.export as export_module

    def broken_card(cfg):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "_model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(model, target, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half folder, no temp leftovers
    assert (target / "marker").read_text() == "old"
    monkeypatch.undo()
    export_model(model, target, overwrite=True)
    assert not (target / "marker").exists() and (target / "diffusion_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_command_writes_bf16_weights(trained, tmp_path, capsys):
    ckpt, _ = trained("modernbert")
    out = tmp_path / "bf16"
    main(["export", "--ckpt_path", str(ckpt), "--output_dir", str(out), "--dtype", "bfloat16"])
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForMaskedLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert load_model(str(out)).generate(PROMPTS[:1], seed=0).ids is not None


def _one_line_error(args, capsys, after_loading: bool = False) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines()
             if line.strip() and not (after_loading and "Loading weights" in line)]
    assert len(lines) == 1 and lines[0].startswith("diffusion-lm: error: ") and "Traceback" not in err, lines
    return lines[0]


def test_overwrite_never_deletes_checkpoints_or_the_source(trained, tmp_path, capsys):
    import shutil

    ckpt, _ = trained("bert")
    run = ckpt.parent
    before = sorted(run.rglob("*"))
    for target, expected in [(run, "holds the checkpoint being exported"),
                             (run.parent, "holds the checkpoint being exported")]:
        line = _one_line_error(["export", "--ckpt_path", str(ckpt), "--output_dir", str(target),
                                "--overwrite", "true"],
                               capsys)
        assert expected in line
    other = tmp_path / "other-run" / "checkpoints"
    other.mkdir(parents=True)
    shutil.copy(ckpt, other / "step=5.ckpt")
    line = _one_line_error(["export", "--ckpt_path", str(ckpt), "--output_dir", str(other.parent),
                            "--overwrite", "true"], capsys)
    assert "holds checkpoints" in line and "step=5.ckpt" in line
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    line = _one_line_error(["export", "--ckpt_path", str(ckpt), "--output_dir", str(notes), "--overwrite",
                            "true"],
                           capsys)
    assert "not a diffusion_lm export" in line
    assert sorted(run.rglob("*")) == before
    assert (other / "step=5.ckpt").exists() and (notes / "todo.txt").exists()


def test_export_files_get_the_umask_modes(trained, tmp_path):
    ckpt, _ = trained("bert")
    folder = export_checkpoint(ckpt, tmp_path / "served", verify=False)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()} == {0o666 & ~umask}


def test_export_to_a_read_only_place_or_from_a_truncated_checkpoint_is_one_line(trained, tmp_path,
                                                                                monkeypatch,
                                                                                  capsys):
    ckpt, _ = trained("bert")
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:4096])
    line = _one_line_error(["export", "--ckpt_path", str(truncated), "--output_dir", str(tmp_path / "a")],
                           capsys)
    assert "cut.ckpt cannot be read" in line and "truncated" in line

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("diffusion_lm.export.tempfile.mkdtemp", read_only)
    line = _one_line_error(["export", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "b")], capsys,
                           after_loading=True)
    assert "cannot write there (Permission denied)" in line
