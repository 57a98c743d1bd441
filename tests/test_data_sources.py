"""Source adapters on local fixtures in the real schemas, and bad-record accounting.

The hub is unreachable here, so the Tulu and GrandMaster fixtures are local folders laid out like the
hub datasets (``data/<split>-00000-of-00001.parquet``) and go through the same
``datasets.load_dataset(path, ...)`` call a hub id takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffusion_lm.backbone import DEMO_TOKENIZER
from diffusion_lm.data import (
    SKIP_REASONS,
    BadRecordError,
    CanvasPolicy,
    ChatTemplate,
    DataSource,
    DialogDataModule,
    ExampleBuilder,
    load_raw,
    to_conversation,
)
from diffusion_lm.data.conversation import BadRecord
from diffusion_lm.errors import ConfigError

from .conftest import write_jsonl



def _hub_folder(root: Path, name: str, splits: dict[str, list[dict]]) -> Path:
    """A folder in the layout of a hub dataset repo: data/<split>-00000-of-00001.parquet."""
    folder = root / name / "data"
    folder.mkdir(parents=True)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}-00000-of-00001.parquet")
    return root / name


def _dm(sources, tmp_path, **kw) -> DialogDataModule:
    kw = {"tokenizer": DEMO_TOKENIZER, "batch_size": 2, "max_length": 64, "canvas": CanvasPolicy(length=24),
          "cache_dir": str(tmp_path / "hf-cache"), **kw}
    return DialogDataModule(sources, **kw)


def _answers(dm: DialogDataModule, template: ChatTemplate, dataset=None) -> list[list[int]]:
    return [list(a) for a in (dataset if dataset is not None else dm.train_dataset)["answer_ids"]]


TULU_ROWS = [
    {"id": "a1", "source": "ai2-adapt-dev/flan", "messages": [
        {"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."}]},
    {"id": "a2", "source": "ai2-adapt-dev/oasst", "messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."}]},
    {"id": "a3", "source": "ai2-adapt-dev/wildchat", "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
]
GRANDMASTER_ROWS = [
    {"conversation": [{"role": "user", "content": "Как дела?"}, {"role": "assistant", "content": "Хорошо."}]},
    {"conversation": [{"role": "system", "content": "Отвечай кратко."},
                      {"role": "user", "content": "Столица России?"},
                      {"role": "assistant", "content": "Москва."}]},
    {"conversation": [{"role": "user", "content": "Привет"}, {"role": "assistant", "content": "Привет!"}]},
]


def test_hub_layout_folders_get_the_dataset_card_defaults(tmp_path, template):
    tulu = _hub_folder(tmp_path, "tulu-3-sft-mixture", {"train": TULU_ROWS})
    grandmaster = _hub_folder(tmp_path, "GrandMaster-PRO-MAX",
                              {"train": GRANDMASTER_ROWS, "test": GRANDMASTER_ROWS[:1]})
    tulu_src, gm_src = DataSource(str(tulu), val_size=0), DataSource(str(grandmaster), val_size=0)
    assert (tulu_src.column, tulu_src.language) == ("messages", "en")
    assert (gm_src.column, gm_src.language) == ("conversation", "ru")
    # The hub ids themselves resolve to the same presets.
    assert DataSource("Vikhrmodels/GrandMaster-PRO-MAX").keys() == ("conversation", "role", "content")
    assert DataSource("allenai/tulu-3-sft-mixture").language == "en"

    dm = _dm([tulu_src, gm_src], tmp_path, stopping_strategy="first_exhausted")
    dm.setup("fit")
    assert dm.skipped.total == 0
    train = dm.train_dataset
    got = {(src, tuple(a)) for src, a in zip(train["source"], train["answer_ids"])}
    for rows, key, label in ((TULU_ROWS, "messages", "tulu-3-sft-mixture"),
                             (GRANDMASTER_ROWS, "conversation", "GrandMaster-PRO-MAX")):
        for row in rows:
            expected = template.answer_ids(row[key][-1]["content"])
            assert (label, tuple(expected)) in got
    assert set(zip(train["source"], train["language"])) == {("tulu-3-sft-mixture", "en"),
                                                            ("GrandMaster-PRO-MAX", "ru")}
    # split: test reads the card's held-out split through the same call.
    assert len(load_raw(DataSource(str(grandmaster), split="test"),
                        cache_dir=str(tmp_path / "hf-cache"))) == 1


def test_messages_files_jsonl_json_and_parquet(tmp_path, template):
    rows = TULU_ROWS
    jsonl = write_jsonl(tmp_path / "chat.jsonl", rows)
    array_json = tmp_path / "chat.json"
    array_json.write_text(json.dumps(rows), encoding="utf-8")
    nested_json = tmp_path / "nested.json"
    nested_json.write_text(json.dumps({"data": rows}), encoding="utf-8")
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    expected = sorted(template.answer_ids(r["messages"][-1]["content"]) for r in rows)
    for source in (DataSource(str(jsonl)), DataSource(str(array_json)),
                   DataSource(str(nested_json), json_field="data"), DataSource(str(parquet))):
        source.val_size = 0
        dm = _dm([source], tmp_path)
        dm.setup("fit")
        assert sorted(_answers(dm, template)) == expected, source.path


def test_sharegpt_and_custom_keys(tmp_path, template):
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"id": "1",
         "conversations": [{"from": "system", "value": "Be nice."}, {"from": "human", "value": "Hi!"},
                                      {"from": "gpt", "value": "Hello, friend."}]},
        {"id": "2",
         "conversations": [{"from": "human", "value": "Привет"}, {"from": "gpt", "value": "Здравствуй."}]},
    ])
    custom = write_jsonl(tmp_path / "custom.jsonl", [
        {"dialog": [{"speaker": "client", "text": "Open the door."}, {"speaker": "ai", "text": "Done."}]},
    ])
    dm = _dm([DataSource(str(sharegpt), format="sharegpt", val_size=0),
              DataSource(str(custom), column="dialog", role_key="speaker", content_key="text",
                         role_map={"client": "user", "AI": "assistant"}, val_size=0)], tmp_path)
    dm.setup("fit")
    assert dm.skipped.total == 0
    answers = set(map(tuple, _answers(dm, template)))
    for text in ("Hello, friend.", "Здравствуй.", "Done."):
        assert tuple(template.answer_ids(text)) in answers
    # The system prompt is part of the context of the answer it precedes.
    conv = to_conversation({"conversations": [{"from": "system", "value": "Be nice."},
                                              {"from": "human", "value": "Hi!"},
                                              {"from": "gpt", "value": "Hello, friend."}]},
                           DataSource(str(sharegpt), format="sharegpt"))
    assert [t.role for t in conv.turns] == ["system", "user", "assistant"]


def test_source_system_prompt_is_added_where_a_dialog_has_none(template):
    source = DataSource("x.jsonl", system_prompt="Answer in Russian.")
    plain = to_conversation(GOOD, source)
    assert [(t.role, t.content) for t in plain.turns[:1]] == [("system", "Answer in Russian.")]
    own = {"messages": [{"role": "system", "content": "Be brief."}] + GOOD["messages"]}
    assert [t.content for t in to_conversation(own, source).turns if t.role == "system"] == ["Be brief."]
    builder = ExampleBuilder(template, source, CanvasPolicy(length=24), 64, "last", False, "train")
    assert builder.run([GOOD], [0])["prompt_ids"][0] == template.prompt_ids(plain.turns[:-1])


def test_prompt_response_jsonl_and_csv(tmp_path, template):
    rows = [{"instruction": "Say hi", "output": "Hi!", "sys": "Be warm."},
            {"instruction": "Say bye", "output": "Bye!", "sys": ""}]
    jsonl = write_jsonl(tmp_path / "pr.jsonl", rows)
    csv = tmp_path / "pr.csv"
    csv.write_text("instruction,output,sys\nSay hi,Hi!,Be warm.\nSay bye,Bye!,\n", encoding="utf-8")
    for path in (jsonl, csv):
        source = DataSource(str(path), format="prompt_response", prompt_column="instruction",
                            response_column="output", system_column="sys", val_size=0)
        dm = _dm([source], tmp_path)
        dm.setup("fit")
        train = dm.train_dataset
        by_answer = {tuple(a): list(p) for a, p in zip(train["answer_ids"], train["prompt_ids"])}
        system_turns = [to_conversation(r, source).turns for r in rows]
        for turns in system_turns:
            assert by_answer[tuple(template.answer_ids(turns[-1].content))] == template.prompt_ids(turns[:-1])
        assert [t.role for t in system_turns[0]] == ["system", "user", "assistant"]
        # an empty system column adds nothing
        assert [t.role for t in system_turns[1]] == ["user", "assistant"]


def test_chatterbot_english_and_russian(tmp_path):
    dm = _dm([DataSource("chatterbot", language="en", categories=["greetings"], val_size=0),
              DataSource("chatterbot", language="ru", categories=["food"], val_size=0)], tmp_path,
             train_turns="all", max_length=96, canvas=CanvasPolicy(length=32))
    dm.setup("fit")
    assert {s["name"]: s["language"] for s in dm.summary["sources"]} == {"chatterbot-en": "en",
                                                                         "chatterbot-ru": "ru"}
    assert set(dm.summary["per_language"]) == {"en", "ru"} and all(dm.summary["per_language"].values())
    with pytest.raises(ConfigError, match="no categories"):
        load_raw(DataSource("chatterbot", language="ru", categories=["no-such-topic"]))


# One record per reason a local JSONL file can hold (arrow needs consistent column types).
BAD_ROWS = [
    ("missing_column", {"other": 1}),
    ("empty_conversation", {"messages": []}),
    ("missing_role", {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}),
    ("unknown_role",
     {"messages": [{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "x"}]}),
    ("missing_content", {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}),
    ("empty_content",
     {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}),
    ("no_assistant_turn", {"messages": [{"role": "user", "content": "anyone?"}]}),
    ("last_turn_not_assistant",
     {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                              {"role": "user", "content": "c"}]}),
    ("no_user_turn",
     {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}),
    ("prompt_too_long",
     {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]}),
    ("answer_too_long",
     {"messages": [{"role": "user", "content": "long?"}, {"role": "assistant", "content": "word " * 40}]}),
]
GOOD = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]}


def test_bad_records_are_counted_per_reason(tmp_path, caplog):
    rows = [GOOD] * 4 + [row for _, row in BAD_ROWS] + [GOOD] * 2
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    dm = _dm([DataSource(str(path), val_size=0)], tmp_path)
    with caplog.at_level("WARNING", logger="diffusion_lm.data.datamodule"):
        dm.setup("fit")
    for reason, _ in BAD_ROWS:
        assert dm.skipped.count(reason, where="bad/train") == 1, reason
    assert dm.skipped.total == len(BAD_ROWS)
    assert len(dm.train_dataset) == 6
    assert dm.summary["skipped"]["records"]["bad/train"] == {reason: 1 for reason, _ in BAD_ROWS}
    assert dm.summary["skipped_records"] == len(BAD_ROWS)
    assert "11 record(s) skipped" in caplog.text and "prompt_too_long x1" in caplog.text
    assert set(dm.summary["skipped"]["records"]["bad/train"]) <= set(SKIP_REASONS)


def test_types_arrow_cannot_mix_are_counted_too(template):
    """Records from Python-level sources (or streams) may carry any JSON type."""
    source = DataSource("inline.jsonl", val_size=0)
    builder = ExampleBuilder(template, source, CanvasPolicy(length=24), 64, "last", False, "train")
    records = [
        {"messages": "not a list"},
        {"messages": ["not an object"]},
        {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                      {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": 7, "content": "hi"}, {"role": "assistant", "content": "x"}]},
        GOOD,
    ]
    out = builder.run(records, range(len(records)))
    assert out["reason"] == ["malformed_messages", "malformed_messages", "non_string_content",
                             "non_string_content", "unknown_role", ""]
    assert out["index"] == [0, 1, 2, 3, 4, 5]


def test_unexpected_errors_are_counted_not_fatal(template, monkeypatch):
    builder = ExampleBuilder(template, DataSource("inline.jsonl"), CanvasPolicy(length=24), 64, "last", False,
                             "train")
    real_one, real_many = template.encode_text, template.encode_texts

    def flaky_one(text):
        if text == "boom":
            raise RuntimeError("tokenizer exploded")
        return real_one(text)

    def flaky_many(texts):  # the batched call fails, then each record is retried on its own
        return [flaky_one(t) for t in texts] if "boom" in texts else real_many(texts)

    monkeypatch.setattr(template, "encode_text", flaky_one)
    monkeypatch.setattr(template, "encode_texts", flaky_many)
    bad = {"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "x"}]}
    out = builder.run([bad, GOOD], [0, 1])
    assert out["reason"] == ["adapter_error", ""]
    strict = ExampleBuilder(template, DataSource("inline.jsonl"), CanvasPolicy(length=24), 64, "last", True,
                            "train")
    with pytest.raises(RuntimeError, match="exploded"):
        strict.run([bad], [0])


def test_strict_mode_names_source_split_and_record_index(tmp_path):
    rows = [GOOD] * 5 + [BAD_ROWS[3][1]] + [GOOD] * 4
    path = write_jsonl(tmp_path / "strict.jsonl", rows)
    dm = _dm([DataSource(str(path), val_size=0)], tmp_path, strict=True)
    with pytest.raises(BadRecordError) as info:
        dm.setup("fit")
    err = info.value
    assert (err.source, err.split, err.index, err.reason) == ("strict", "train", 5, "unknown_role")
    assert "record 5" in str(err) and "'strict'" in str(err) and "strict=false" in str(err)
    # With a validation split the index is still the record's position in the file.
    dm = _dm([DataSource(str(path), val_size=3)], tmp_path, strict=True)
    with pytest.raises(BadRecordError) as info:
        dm.setup("fit")
    assert info.value.index == 5 and info.value.split in ("train", "validation")


def test_conversation_rules():
    src = DataSource("x.jsonl")
    with pytest.raises(BadRecord) as info:
        to_conversation({"messages": [{"role": "user", "content": "only me"}]}, src)
    assert info.value.reason == "no_assistant_turn"
    conv = to_conversation({"messages": [{"role": "assistant", "content": "Welcome!"},
                                         {"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello"}]}, src)
    # An assistant greeting with no user message before it is context, not an answer to train on.
    assert conv.answer_indices("all") == [2] and conv.answer_indices("last") == [2]


def test_source_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="weight"):
        DataSource("x.jsonl", weight=0)
    with pytest.raises(ConfigError, match="record count"):
        DataSource("x.jsonl", streaming=True, val_size=0.1)
    with pytest.raises(ConfigError, match="unknown preset"):
        DataSource("x.jsonl", preset="nope")
    with pytest.raises(ConfigError, match="no such file"):
        load_raw(DataSource(str(tmp_path / "a" / "b" / "missing.jsonl")))
    with pytest.raises(ConfigError, match="duplicate labels"):
        DialogDataModule([DataSource("chatterbot"), DataSource("chatterbot")])
    with pytest.raises(ConfigError, match="canvas.length"):
        DialogDataModule([DataSource("chatterbot")], max_length=32, canvas=CanvasPolicy(length=32))

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/tulu-3-sft-mixture' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match="could not be loaded.*HF_HUB_OFFLINE"):
        load_raw(DataSource("allenai/tulu-3-sft-mixture"))
