"""LoRA fine-tuning (model.peft): what trains, what checkpoints hold, merged and adapter exports."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_lm import ConfigError, DataSource, DialogDataModule, MaskedDiffusionLM
from diffusion_lm.checkpoint_io import read_checkpoint_file
from diffusion_lm.cli import main
from diffusion_lm.data import CanvasPolicy
from diffusion_lm.export import export_checkpoint
from diffusion_lm.loading import ADAPTER_BASE_WEIGHTS, load_checkpoint, load_exported, load_hf_export

from .conftest import DIALOGS, tiny_cli_args, write_jsonl
from .families import FAMILY_NAMES, make_family

LORA = {"method": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_family(family, tmp_path_factory.mktemp(family) / "backbone")
        return cache[family]

    return get


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "dialogs.jsonl", DIALOGS)


def _data(path: Path, val_size: int = 0) -> DialogDataModule:
    return DialogDataModule([DataSource(str(path), format="messages", language="en", val_size=val_size)],
                            batch_size=8, max_length=96, canvas=CanvasPolicy(length=16))


def _trainer(root: Path, steps: int, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False, default_root_dir=root,
                      callbacks=[ModelCheckpoint(dirpath=root, save_last=True)], **kw)


def _base_weights(model: MaskedDiffusionLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.net.model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_default_targets_adapt_every_layer_and_only_the_fresh_head_trains(folders, family):
    model = MaskedDiffusionLM(str(folders(family)), peft=LORA, health_check=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_")[0] for n in trainable if ".lora_" in n}
    layers = model.net.model.config.num_hidden_layers if family != "t5" else model.net.model.config.num_layers
    per_layer = len(adapted) / layers
    assert per_layer >= 4 and per_layer == int(per_layer), sorted(adapted)  # every layer alike
    others = [n for n in trainable if ".lora_" not in n]
    if family == "t5":  # FRIDA-like: no MLM head in the checkpoint, so the fresh head trains
        assert others and all(".lm_head." in n for n in others)
    else:
        assert others == []
    embedding = model.net.model.get_input_embeddings().weight
    assert not embedding.requires_grad


def test_options_are_checked_with_one_line_errors(folders):
    with pytest.raises(ConfigError, match="model.peft.r "):
        MaskedDiffusionLM(str(folders("modernbert")), peft={"r": 0})
    with pytest.raises(ConfigError, match="model.peft: unknown"):
        MaskedDiffusionLM(str(folders("modernbert")), peft={"rank": 4})
    with pytest.raises(ConfigError, match="model.peft.target_modules"):
        MaskedDiffusionLM(str(folders("modernbert")), peft={"target_modules": ["no_such_layer"]})


def test_lora_trains_only_adapters_its_loss_falls_and_exports_merge_exactly(folders, data_file, tmp_path):
    folder = folders("modernbert")
    pl.seed_everything(0)
    # The head trains too (the "chosen" parameters): on a random tiny base, adapters alone learn slowly.
    model = MaskedDiffusionLM(str(folder), peft=dict(LORA, r=8, alpha=32.0, train_head=True),
                              learning_rate=1e-2, warmup_steps=1, lr_schedule="constant", canvas_length=16,
                              health_check=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith(("net.model.head.", "net.model.decoder.bias"))
                             for n in trainable), sorted(trainable)
    before = _base_weights(model)
    data = _data(data_file, val_size=4)
    trainer = _trainer(tmp_path, 60, limit_val_batches=1, val_check_interval=60, check_val_every_n_epoch=None,
                       num_sanity_val_steps=0, inference_mode=False)
    start = trainer.validate(model, data, verbose=False)[0]["val/nelbo"]
    trainer.fit(model, data)
    end = trainer.callback_metrics["val/nelbo"].item()
    assert end < start - 0.5, (start, end)
    after = _base_weights(model)
    frozen = [k for k in before if not k.startswith(("head.", "decoder.bias"))]
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # the backbone is frozen
    assert not torch.equal(before["head.dense.weight"], after["head.dense.weight"])
    assert any(v.abs().sum() > 0 for k, v in model.net.model.state_dict().items() if "lora_B" in k)

    ckpt = tmp_path / "last.ckpt"
    saved = read_checkpoint_file(str(ckpt))["state_dict"]
    assert saved and all(".lora_" in k or ".head." in k or "decoder.bias" in k for k in saved)  # what trains
    assert len(saved) == len([n for n, p in model.named_parameters() if p.requires_grad])
    reloaded = load_checkpoint(ckpt)
    ids = torch.tensor([model.prompt_ids("Hello there") + [model.mask_id] * 4])
    attn, query = torch.ones_like(ids), ids == model.mask_id
    model.eval()
    expected = model.denoise(ids, attn, query)
    assert torch.allclose(reloaded.denoise(ids, attn, query), expected, atol=1e-5)

    merged = export_checkpoint(ckpt, tmp_path / "merged")
    hf, _ = load_hf_export(merged)
    assert not any("lora" in k for k in hf.state_dict())  # a plain Hugging Face model
    full = hf(input_ids=ids, attention_mask=attn).logits[query].float()
    full[:, model.mask_id] = float("-inf")
    scale = float(expected[expected.isfinite()].abs().max())
    assert torch.allclose(full, expected, atol=1e-4 * scale, rtol=1e-4)

    adapter = export_checkpoint(ckpt, tmp_path / "adapter", merge=False)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert torch.allclose(load_exported(adapter).denoise(ids, attn, query), expected, atol=1e-5)
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    # plain peft: the base, its trained non-adapter tensors (here the head), then the adapters
    base = AutoModelForMaskedLM.from_pretrained(folder)
    assert not base.load_state_dict(load_file(adapter / ADAPTER_BASE_WEIGHTS), strict=False).unexpected_keys
    plain_peft = PeftModel.from_pretrained(base, adapter).eval()
    got = plain_peft(input_ids=ids, attention_mask=attn).logits[query].float()
    got[:, model.mask_id] = float("-inf")
    assert torch.allclose(got, expected, atol=1e-4 * scale, rtol=1e-4)


def test_fresh_head_is_checkpointed_and_resume_continues(folders, data_file, tmp_path):
    folder = folders("t5")
    pl.seed_everything(0)
    model = MaskedDiffusionLM(str(folder), peft=LORA, learning_rate=1e-2, warmup_steps=1, canvas_length=16)
    trainer = _trainer(tmp_path, 2, limit_val_batches=0)
    trainer.fit(model, _data(data_file))
    health = next(cb for cb in trainer.callbacks if type(cb).__name__ == "MLMHealthCheck")
    assert health.report is not None and not health.report.healthy  # the check ran: FRIDA-like, no MLM head
    saved = read_checkpoint_file(str(tmp_path / "last.ckpt"))["state_dict"]
    assert any(".lm_head.dense." in k for k in saved) and any(".lora_" in k for k in saved)
    assert not any(k.endswith("encoder.block.0.layer.0.SelfAttention.q.base_layer.weight") for k in saved)
    # T5 has no mask token: the added embedding row is random at load time, so the embeddings are kept
    assert "net.model.shared.weight" in saved
    ids = torch.tensor([model.prompt_ids("Hello there") + [model.mask_id] * 3])
    attn, query = torch.ones_like(ids), ids == model.mask_id
    expected = model.eval().denoise(ids, attn, query)
    reloaded = load_checkpoint(tmp_path / "last.ckpt")
    assert torch.allclose(reloaded.denoise(ids, attn, query), expected, atol=1e-5)
    for merge in (True, False):
        folder_out = export_checkpoint(tmp_path / "last.ckpt", tmp_path / f"export-{merge}", merge=merge)
        assert torch.allclose(load_exported(folder_out).denoise(ids, attn, query), expected, atol=1e-4)
    resumed = MaskedDiffusionLM(str(folder), peft=LORA, learning_rate=1e-2, warmup_steps=1, canvas_length=16,
                                health_check=False)
    trainer = _trainer(tmp_path / "more", 4, limit_val_batches=0)
    trainer.fit(resumed, _data(data_file), ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 4
    changed = MaskedDiffusionLM(str(folder), peft=dict(LORA, r=2), health_check=False)
    with pytest.raises(ConfigError, match="model.peft.r differs from the checkpoint"):
        _trainer(tmp_path / "bad", 4, limit_val_batches=0).fit(changed, _data(data_file),
                                                               ckpt_path=str(tmp_path / "last.ckpt"))


def test_cli_fit_with_lora_and_an_adapter_export_of_a_scratch_model_is_refused(tmp_path, messages_jsonl,
                                                                               capsys):
    main(["fit", *tiny_cli_args(tmp_path, messages_jsonl, "--model.peft.r=4", "--model.peft.alpha=8")])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    model = load_checkpoint(ckpt)
    assert model.adapter is not None and model.adapter.options.r == 4
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "x"), "--merge", "false"])
    assert "--merge false" in capsys.readouterr().err


def test_ema_of_a_lora_model_averages_the_adapters_and_exports(folders, data_file, tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    pl.seed_everything(0)
    model = MaskedDiffusionLM(str(folders("bert")), peft=LORA, learning_rate=1e-2, warmup_steps=1,
                              canvas_length=16, health_check=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp_path,
                         limit_val_batches=0, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True),
                                                         EMAWeightAveraging(decay=0.5)])
    trainer.fit(model, _data(data_file))
    state = read_checkpoint_file(str(tmp_path / "last.ckpt"))
    average, current = state["state_dict"], state["current_model_state"]
    assert average.keys() == current.keys() and all(".lora_" in k for k in average)
    key = next(k for k in average if ".lora_B." in k)
    assert not torch.equal(average[key], current[key])
    out = export_checkpoint(tmp_path / "last.ckpt", tmp_path / "ema")
    hf, _ = load_hf_export(out)
    assert not any("lora" in k for k in hf.state_dict())


def test_adapters_alone_lower_the_loss_of_a_pretrained_backbone(folders, data_file, tmp_path):
    # "Pretraining": a few full fine-tuning steps give the tiny backbone some MLM ability to adapt.
    pl.seed_everything(0)
    base = MaskedDiffusionLM(str(folders("modernbert")), learning_rate=1e-2, warmup_steps=1,
                             lr_schedule="constant", canvas_length=16, health_check=False)
    _trainer(tmp_path / "pre", 40, limit_val_batches=0).fit(base, _data(data_file))
    base.net.model.save_pretrained(tmp_path / "pretrained")
    base.tokenizer.save_pretrained(tmp_path / "pretrained")
    qa = {"What is 2+2?": "Four.", "Как дела?": "Хорошо.", "Hello there": "Hi!", "Что нового?": "Ничего."}
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in qa.items()] * 6
    data = _data(write_jsonl(tmp_path / "qa.jsonl", rows), val_size=4)
    pl.seed_everything(0)
    model = MaskedDiffusionLM(str(tmp_path / "pretrained"), peft=dict(LORA, r=8, alpha=32.0),
                              learning_rate=1e-2, warmup_steps=1, lr_schedule="constant", canvas_length=16,
                              health_check=False)
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    trainer = _trainer(tmp_path / "lora", 40, limit_val_batches=1, val_check_interval=40,
                       check_val_every_n_epoch=None, num_sanity_val_steps=0, inference_mode=False)
    start = trainer.validate(model, data, verbose=False)[0]["val/nelbo"]
    trainer.fit(model, data)
    assert trainer.callback_metrics["val/nelbo"].item() < start - 0.3
