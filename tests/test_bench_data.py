"""A tiny run of tools/bench_data.py: the synthetic corpus is in the real datasets' schemas and every
scenario of the benchmark runs."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pyarrow.parquet as pq
import pytest

from .conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "tools" / "bench_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_corpus_has_the_real_schemas(tmp_path, bench):
    paths = bench.write_corpus(tmp_path, 40, shard_rows=15)
    tulu = pq.read_table(sorted((paths["tulu-3-sft-mixture"] / "data").glob("*.parquet"))[0])
    assert tulu.column_names == ["messages", "id", "source"]
    grandmaster = pq.read_table(sorted((paths["GrandMaster-PRO-MAX"] / "data").glob("*.parquet"))[0])
    assert grandmaster.column_names == ["conversation"]
    assert (
        len(list((paths["tulu-3-sft-mixture"] / "data").glob("*.parquet"))) == 2
    )  # 20 dialogs, shards of 15
    for dialog in tulu.column("messages").to_pylist() + grandmaster.column("conversation").to_pylist():
        roles = [m["role"] for m in dialog if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    text = grandmaster.column("conversation").to_pylist()[0][-1]["content"]
    assert any("а" <= ch <= "я" for ch in text)  # Russian words


def test_every_scenario_runs_on_a_tiny_corpus(tmp_path, bench):
    workdir = tmp_path / "bench"
    bench.write_corpus(workdir / "corpus", 300)
    args = argparse.Namespace(
        workdir=str(workdir),
        total_samples=400,
        num_proc=None,
        batch_size=8,
        stream_batches=2,
        tokenizer=None,
        val_size=20,
    )
    cold = bench.run_scenario(args, "cold")
    assert cold["mix"]["train_examples"] == 400 and cold["mix"]["per_language"] == {"en": 200, "ru": 200}
    assert cold["peak_rss_mib"] > 0 and cold["setup_seconds"] >= 0
    loader = bench.run_scenario(args, "loader")  # the datasets cache now holds the tokenised examples
    assert loader["batches_per_epoch"] == 50 and loader["first_batch_rows"] >= 1
    stream = bench.run_scenario(args, "stream")
    assert stream["stream_batches"] == 2 and stream["stream_examples_per_second"] > 0


def test_the_command_prints_one_json_report(tmp_path, bench, capsys):
    report = bench.main(
        [
            "--dialogs",
            "60",
            "--total_samples",
            "60",
            "--batch_size",
            "4",
            "--val_size",
            "5",
            "--workdir",
            str(tmp_path),
            "--scenarios",
            "warm",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed == report
    assert report["settings"]["total_samples"] == 60 and report["scenarios"][0]["scenario"] == "warm"
    assert {"date", "machine", "command", "corpus"} <= set(report)
