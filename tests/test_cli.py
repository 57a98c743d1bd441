"""The `diffusion-lm` command: a short fit writes a checkpoint; bad configs give one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffusion_lm.cli import main

from .conftest import REPO, tiny_cli_args


def test_fit_few_steps_writes_checkpoint_and_reloads(tmp_path, messages_jsonl):
    main(["fit"] + tiny_cli_args(tmp_path, messages_jsonl))
    ckpts = sorted(Path(tmp_path).rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    from diffusion_lm import MaskedDiffusionLM, load_model

    model = load_model(str(ckpts[-1]))
    assert isinstance(model, MaskedDiffusionLM)
    assert model.global_step == 0 or model.hparams.backbone.hidden_size == 32


def test_validate_reports_nelbo_per_language(tmp_path, messages_jsonl, capsys):
    main(["validate"] + tiny_cli_args(tmp_path, messages_jsonl))
    out = capsys.readouterr().out
    assert "val/nelbo" in out and "val/ppl_bound" in out


def test_print_config_round_trips(tmp_path, messages_jsonl, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["backbone"]["model_type"] == "modernbert"
    assert config["data"]["sources"][0]["format"] == "chatterbot"
    assert config["trainer"]["use_distributed_sampler"] is False


def _error_of(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unknown_schedule_class_is_one_clear_error(tmp_path, messages_jsonl, capsys):
    err = _error_of(["fit"] + tiny_cli_args(tmp_path, messages_jsonl, "--model.schedule=no_such.Schedule"),
                    capsys)
    assert "schedule" in err
    assert "Traceback" not in err


def test_missing_model_path_names_the_option(tmp_path, messages_jsonl, capsys):
    args = [a for a in tiny_cli_args(tmp_path, messages_jsonl) if not a.startswith("--model.backbone.")]
    err = _error_of(["fit"] + args + [f"--model.backbone={tmp_path}/no/such/model"], capsys)
    assert "model.backbone" in err and "no such folder" in err
    assert "Traceback" not in err


def test_tokenizer_without_mask_token_is_one_clear_error(tmp_path, messages_jsonl, capsys):
    from transformers import AutoTokenizer

    from diffusion_lm.backbone import DEMO_TOKENIZER

    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    tok.mask_token = None
    folder = tmp_path / "no-mask-tokenizer"
    tok.save_pretrained(folder)
    err = _error_of(["fit"] + tiny_cli_args(tmp_path, messages_jsonl, f"--data.tokenizer={folder}"), capsys)
    assert "no mask token" in err and "add_special_tokens" in err
