"""Shared fixtures: tiny models built from configs and small local data files in real schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusion_lm.backbone import DEMO_TOKENIZER, ScratchBackbone, load_tokenizer
from diffusion_lm.data import ChatTemplate

REPO = Path(__file__).resolve().parents[1]

TINY = dict(model_type="modernbert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: more threads only add contention on a
    busy 2-core machine (several times slower there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_backbone() -> ScratchBackbone:
    return ScratchBackbone(**TINY)


DIALOGS = [
    {"messages": [{"role": "user", "content": "Hello there"},
                  {"role": "assistant", "content": "Hi! How can I help?"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "Four."}]},
    {"messages": [{"role": "user", "content": "Как дела?"},
                  {"role": "assistant", "content": "Хорошо, спасибо."},
                  {"role": "user", "content": "Что нового?"},
                  {"role": "assistant", "content": "Ничего особенного."}]},
] * 8


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as UTF-8 JSON lines (non-ASCII kept as is, as real dataset dumps are)."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def messages_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "dialogs.jsonl", DIALOGS)


@pytest.fixture(scope="session")
def template() -> ChatTemplate:
    """The chat template of the bundled demo tokenizer."""
    return ChatTemplate(load_tokenizer(DEMO_TOKENIZER))


def tiny_cli_args(root: Path, data_file: Path, *extra: str) -> list[str]:
    """Arguments for a few-step CLI fit of a tiny model on a local JSONL file."""
    args = [
        "--seed_everything=0",
        "--model.backbone.model_type=modernbert",
        "--model.backbone.hidden_size=32",
        "--model.backbone.num_hidden_layers=2",
        "--model.backbone.num_attention_heads=2",
        "--model.backbone.intermediate_size=64",
        "--model.backbone.max_position_embeddings=128",
        "--model.warmup_steps=1",
        f"--data.sources=[{{path: {data_file}, format: messages, language: en, val_size: 4}}]",
        "--data.batch_size=4",
        "--data.max_length=96",
        "--data.canvas.length=16",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
    ]
    return args + list(extra)
