"""The training mix: weighted proportions and caps, streaming sources, tokenisation cache and
processes, and the summary that reaches the logs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_lm.backbone import DEMO_TOKENIZER
from diffusion_lm.data import CanvasPolicy, DataSource, DialogDataModule, apportion, mix_size
from diffusion_lm.data import examples as examples_module
from diffusion_lm.errors import ConfigError

from .conftest import REPO


def _dialogs(path: Path, n: int, tag: str, bad_every: int = 0) -> Path:
    rows = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            rows.append({"messages": [{"role": "user", "content": f"{tag} unanswered {i}"}]})
        else:
            rows.append({"messages": [{"role": "user", "content": f"{tag} question {i}"},
                                      {"role": "assistant", "content": f"{tag} answer {i}"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def corpora(tmp_path) -> dict[str, Path]:
    """Three sources of very different sizes."""
    return {"small": _dialogs(tmp_path / "small.jsonl", 6, "s"),
            "medium": _dialogs(tmp_path / "medium.jsonl", 40, "m"),
            "large": _dialogs(tmp_path / "large.jsonl", 200, "l")}


def _dm(sources, tmp_path, **kw) -> DialogDataModule:
    kw = {"tokenizer": DEMO_TOKENIZER, "batch_size": 4, "max_length": 48, "canvas": CanvasPolicy(length=12),
          "cache_dir": str(tmp_path / "hf-cache"), **kw}
    return DialogDataModule(sources, **kw)


def test_apportion_is_exact():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(750_000, [0.5, 0.5]) == [375_000, 375_000]
    counts = apportion(1001, [0.8, 0.15, 0.05])
    assert sum(counts) == 1001 and counts == [801, 150, 50]
    assert mix_size([1000, 10], [0.5, 0.5], "all_exhausted") == 2000
    assert mix_size([1000, 10], [0.5, 0.5], "first_exhausted") == 20
    assert mix_size([1000, 10], [0.5, 0.5], total=7) == 7


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.8, 0.2), (0.6, 0.3, 0.1)])
def test_mix_proportions_follow_weights(tmp_path, corpora, weights):
    names = ["small", "large", "medium"][: len(weights)]
    sources = [DataSource(str(corpora[n]), weight=w, val_size=0) for n, w in zip(names, weights)]
    dm = _dm(sources, tmp_path)
    dm.setup("fit")
    mix = dm.train_dataset
    share = Counter(mix["source"])
    total = len(mix)
    for name, w in zip(names, weights):
        assert abs(share[name] / total - w) <= 1 / total + 1e-9, (name, share, total)
    # all_exhausted: every example of every source is used at least once, and a repeated source is
    # repeated evenly (whole passes), never one example many times while another waits.
    for name in names:
        uses = Counter(i for s, i in zip(mix["source"], mix["index"]) if s == name)
        size = {"small": 6, "medium": 40, "large": 200}[name]
        assert len(uses) == size and max(uses.values()) - min(uses.values()) <= 1
    assert dm.summary["per_source"] == dict(share)


def test_total_samples_caps_the_mix_and_first_exhausted_never_repeats(tmp_path, corpora):
    sources = [DataSource(str(corpora["small"]), weight=0.5, val_size=0),
               DataSource(str(corpora["large"]), weight=0.5, val_size=0)]
    capped = _dm(sources, tmp_path, total_samples=150)
    capped.setup("fit")
    assert len(capped.train_dataset) == 150
    assert Counter(capped.train_dataset["source"]) == {"small": 75, "large": 75}
    assert capped.summary["train_examples"] == 150 and capped.summary["per_language"] == {"en": 150}

    no_repeats = _dm(sources, tmp_path, stopping_strategy="first_exhausted")
    no_repeats.setup("fit")
    pairs = list(zip(no_repeats.train_dataset["source"], no_repeats.train_dataset["index"]))
    assert len(pairs) == len(set(pairs)) == 12  # 6 + 6: the small source bounds an equal mix


def test_validation_split_is_held_out_with_a_fixed_seed(tmp_path, corpora):
    def held_out(seed):
        dm = _dm([DataSource(str(corpora["medium"]), val_size=0.25)], tmp_path, seed=seed)
        dm.setup("fit")
        return set(dm.val_dataset["index"]), set(dm.train_dataset["index"])

    val, train = held_out(0)
    assert len(val) == 10 and not val & train and val | train == set(range(40))
    assert held_out(0)[0] == val and held_out(1)[0] != val


def test_streaming_source(tmp_path):
    path = _dialogs(tmp_path / "stream.jsonl", 60, "x", bad_every=10)  # records 9, 19, ... have no answer
    dm = _dm([DataSource(str(path), streaming=True, val_size=8)], tmp_path, total_samples=40,
             shuffle_buffer=16)
    dm.setup("fit")
    # Validation: the first 8 records (a rule with no seed), materialised once.
    assert sorted(dm.val_dataset["index"]) == list(range(8))
    assert dm.summary["streaming"] and dm.summary["validation_examples"] == 8
    loader = dm.train_dataloader()
    assert len(loader) == 10
    seen = []
    for batch in loader:
        batch = dm.on_before_batch_transfer(batch, 0)  # Lightning's hook: counts the stream's skips
        assert "skipped" not in batch
        seen += batch["index"]
    assert len(seen) == 40 and min(seen) >= 8  # training never reads the validation records
    assert all(i % 10 != 9 for i in seen)
    assert dm.skipped.count("no_assistant_turn", where="stream/train") >= 3  # counted as the stream met them
    assert dm.summary["skipped"]["records"]["stream/train"]["no_assistant_turn"] >= 3


def test_streaming_mix_proportions_and_rank_shards(tmp_path, corpora):
    # interleave_datasets draws each example's source at random: enough draws for a tight tolerance.
    sources = [DataSource(str(_dialogs(tmp_path / "en.jsonl", 1000, "e")), weight=0.8, val_size=0,
                          streaming=True),
               DataSource(str(_dialogs(tmp_path / "ru.jsonl", 250, "r")), weight=0.2, val_size=0,
                          streaming=True)]
    dm = _dm(sources, tmp_path, total_samples=1200, batch_size=50, shuffle_buffer=100)
    dm.setup("fit")
    sources_seen = Counter(s for batch in dm.train_dataloader() for s in batch["source"])
    assert sum(sources_seen.values()) == 1200
    assert abs(sources_seen["en"] / 1200 - 0.8) < 0.04, sources_seen

    class FakeTrainer:  # the attributes the data module reads
        def __init__(self, rank):
            self.global_rank, self.world_size, self.max_steps = rank, 2, 10

    one = _dm([DataSource(str(corpora["medium"]), val_size=0, streaming=True)], tmp_path, total_samples=40,
              batch_size=5, shuffle_buffer=8)
    one.setup("fit")
    shards = []
    for rank in range(2):
        one.trainer = FakeTrainer(rank)
        loader = one.train_dataloader()
        assert len(loader) == 4  # 40 examples / 2 ranks / batch 5: equal on every rank
        shards.append([i for batch in loader for i in batch["index"]])
    assert not set(shards[0]) & set(shards[1]) and len(set(shards[0]) | set(shards[1])) == 40


def test_map_style_sources_join_a_streaming_mix(tmp_path, corpora):
    sources = [DataSource(str(corpora["medium"]), val_size=4, streaming=True),
               DataSource(str(corpora["small"]), val_size=1)]
    dm = _dm(sources, tmp_path, total_samples=60, batch_size=6, shuffle_buffer=8)
    dm.setup("fit")
    assert dm.train_dataset is None and dm.summary["validation_examples"] == 5
    seen = Counter(s for batch in dm.train_dataloader() for s in batch["source"])
    assert sum(seen.values()) == 60 and set(seen) == {"medium", "small"}


def test_stream_without_any_usable_record_fails_at_setup(tmp_path):
    path = _dialogs(tmp_path / "useless.jsonl", 12, "u", bad_every=1)  # no record has an answer
    dm = _dm([DataSource(str(path), val_size=2, streaming=True)], tmp_path, total_samples=8)
    with pytest.raises(ConfigError, match="no record after the first 2 gave a training example") as info:
        dm.setup("fit")
    assert "useless/train: no_assistant_turn x10" in str(info.value)


def test_endless_stream_needs_total_samples_or_max_steps(tmp_path, corpora):
    dm = _dm([DataSource(str(corpora["small"]), val_size=0, streaming=True)], tmp_path, shuffle_buffer=4)

    class FakeTrainer:
        global_rank, world_size, max_steps, loggers = 0, 1, -1, []

    dm.trainer = FakeTrainer()
    with pytest.raises(ConfigError, match="total_samples.*max_steps"):
        dm.setup("fit")
    FakeTrainer.max_steps = 5
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["index"]) == 4


def test_tokenisation_cache_and_processes(tmp_path, monkeypatch):
    path = _dialogs(tmp_path / "cached.jsonl", 30, "c", bad_every=7)
    first = _dm([DataSource(str(path), val_size=5)], tmp_path, num_proc=2)
    first.setup("fit")
    serial = _dm([DataSource(str(path), val_size=5)], tmp_path / "other")  # no cache shared, one process
    serial.setup("fit")
    assert list(first.train_dataset["index"]) == list(serial.train_dataset["index"])
    assert list(first.train_dataset["prompt_ids"]) == list(serial.train_dataset["prompt_ids"])
    assert first.skipped.to_dict() == serial.skipped.to_dict() and first.skipped.total == 4

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again instead of reading the cache")

    monkeypatch.setattr(examples_module.ExampleBuilder, "run", no_tokenising)
    again = _dm([DataSource(str(path), val_size=5)], tmp_path)
    again.setup("fit")  # same files and settings: served from the datasets cache, skip counts included
    assert list(again.train_dataset["prompt_ids"]) == list(first.train_dataset["prompt_ids"])
    assert again.skipped.to_dict() == first.skipped.to_dict()
    changed = _dm([DataSource(str(path), val_size=5)], tmp_path, canvas=CanvasPolicy(length=10))
    with pytest.raises(AssertionError, match="tokenised again"):
        changed.setup("fit")  # a different canvas must not reuse ids cut for the old one


def test_summary_reaches_the_logger_and_checkpoints(tmp_path, corpora, caplog):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    path = _dialogs(tmp_path / "logged.jsonl", 20, "g", bad_every=5)
    dm = _dm([DataSource(str(path), val_size=0)], tmp_path)
    logger = CSVLogger(str(tmp_path / "logs"))
    dm.trainer = pl.Trainer(logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)
    with caplog.at_level("INFO", logger="diffusion_lm.data.datamodule"):
        dm.setup("fit")
    assert "no_assistant_turn x4" in caplog.text and "training mix: 16 examples" in caplog.text
    logger.save()
    saved = yaml.safe_load(Path(logger.log_dir, "hparams.yaml").read_text())
    assert saved["data_summary"]["skipped"]["records"]["logged/train"] == {"no_assistant_turn": 4}
    assert saved["data_summary"]["train_examples"] == 16
    json.dumps(dm.summary)  # export writes it to diffusion_config.json
    fresh = _dm([DataSource(str(path), val_size=0)], tmp_path)
    fresh.load_state_dict(dm.state_dict())
    assert fresh.summary == dm.summary


def test_demo_config_trains_on_the_chatterbot_mix(tmp_path):
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["data"]
    dm = DialogDataModule(**{**data, "tokenizer": DEMO_TOKENIZER, "cache_dir": str(tmp_path / "hf-cache")})
    dm.setup("fit")
    per_language = dm.summary["per_language"]
    assert set(per_language) == {"en", "ru"} and abs(per_language["en"] - per_language["ru"]) <= 1
    assert {row["language"] for row in dm.summary["sources"]} == {"en", "ru"}
    assert dm.val_dataset is not None and set(dm.val_dataset["language"]) == {"en", "ru"}
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["sample_index"]) == data["batch_size"]
    assert batch["language"].count("en") == batch["language"].count("ru")  # the equal mix in every batch
    per_example = torch.bincount(batch["example"][batch["loss_mask"]], minlength=data["batch_size"])
    assert torch.all(per_example == data["canvas"]["length"])  # fixed canvas
