"""A tiny CPU run of tools/bench_train.py: both training paths take a full optimizer step on the same
chat-like batches and the report carries the figures the docs quote."""

from __future__ import annotations

import importlib.util
import json

from .conftest import REPO


def test_bench_train_smoke(capsys):
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "tools" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--size", "tiny", "--batch", "6", "--max-length", "96", "--batches", "1",
                      "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-memory"])
    assert json.loads(capsys.readouterr().out)["benchmark"] == "train_step"
    ours, naive = out["results"]["ours"], out["results"]["naive"]
    lengths = out["lengths"]
    assert lengths["examples"] == 6 and 8 <= lengths["min"] <= lengths["max"] <= 96
    assert 0.2 < lengths["prompt_share"] < 0.4
    # Packing puts several examples per row: fewer rows and less padding than one example per row.
    assert naive["rows_per_batch"] == 6 and ours["rows_per_batch"] < 6
    assert ours["padding_share"] < naive["padding_share"]
    for figures in (ours, naive):
        assert figures["real_tokens_per_s"] > 0 and 0 < figures["mfu"] < 1
    assert out["speedup_real_tokens_per_s"] > 0
