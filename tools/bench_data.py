"""The 750k-dialog data path on one machine: preparing the recipes' mix, its time and its memory.

Builds a synthetic local corpus in the schemas of the real datasets, laid out as their hub
repositories are (parquet shards under ``data/``, folders named after the datasets so the presets
apply):

* ``tulu-3-sft-mixture/``: English, columns ``id``, ``messages`` (``[{role, content}]``), ``source``;
* ``GrandMaster-PRO-MAX/``: Russian, column ``conversation`` (``[{role, content}]``).

Dialogs have 1-6 user/assistant exchanges (geometric, like chat SFT data), an optional system
message, prompts of a few to ~100 words and long-tailed answers (log-normal, median ~60 words, a
tail past 1,000), in English or Russian words.

Then runs :class:`~diffusion_lm.DialogDataModule` with the recipes' data settings
(``configs/ettin-encoder-1b.yaml``: equal EN/RU weights, ``total_samples: 750000``, ``max_length:
512``, sampled canvas of 256, ``train_turns: all``, ``--val_size`` held-out records per source),
each scenario in a fresh process so its peak memory is its own:

* ``cold``: ``setup`` with an empty cache (tokenisation with ``--num_proc`` processes);
* ``warm``: ``setup`` again, hitting the ``datasets`` cache;
* ``loader``: after a warm setup, the training DataLoader's first batch and one epoch's batch order;
* ``stream``: the same sources with ``streaming: true``: ``setup`` and the first ``--stream_batches``
  training batches.

Each reports wall seconds, the peak RSS of the process (``ru_maxrss``) and of its largest child
(the ``num_proc`` tokenisation workers), and the mix's counts. Output: one JSON object.

    python tools/bench_data.py --dialogs 750000 --num_proc 2 --workdir /tmp/bench_data   # the benchmark
    python tools/bench_data.py --dialogs 400 --workdir /tmp/bench_small                  # a smoke run

``--tokenizer`` defaults to the bundled English+Russian demo tokenizer (no download); pass a
model's tokenizer folder to measure with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EN_WORDS = (
    "the of and to in is that it for you with as on be this are or by not but what all can will one "
    "about there if would which their time so people some them other than then now only its also "
    "after use two how our work first well way even new want because any these give day most us "
    "model data answer question example number function value list code python string return file "
    "system language train step result error first second simple write explain different problem "
    "important because however therefore usually between each while during under until again further "
    "health science history music energy market water city country family school children research"
).split()
RU_WORDS = (
    "и в не на я что он с как а то это все она так его но да ты к у же вы за бы по только ее мне было "
    "вот от меня еще нет о из ему теперь когда даже ну вдруг ли если уже или ни быть был него до вас "
    "нибудь опять уж вам ведь там потом себя ничего ей может они тут где есть надо ней для мы тебя "
    "их чем была сам чтобы без будто чего раз тоже себе под будет ж тогда кто этот того потому этого "
    "какой совсем ним здесь этом один почти мой тем чтобы нее сейчас были куда зачем всех никогда "
    "модель данные ответ вопрос пример число функция значение список код строка файл система язык "
    "обучение шаг результат ошибка простой написать объяснить разный задача важный история музыка"
).split()


# ------------------------------------------------------------------------------------- corpus
def _texts(rng, words: list[str], lengths) -> list[str]:
    """Sentences of random words: ``lengths`` words each, capitalised, a period every ~12 words."""
    import numpy as np

    vocab = np.array(words, dtype=object)
    ids = rng.integers(0, len(vocab), int(lengths.sum()))
    out, at = [], 0
    for n in lengths.tolist():
        chunk = vocab[ids[at : at + n]].tolist()
        at += n
        for k in range(11, n, 12):
            chunk[k] += "."
        text = " ".join(chunk)
        out.append(text[:1].upper() + text[1:] + ".")
    return out


def _dialogs(rng, n: int, words: list[str], system_share: float) -> list[list[dict]]:
    import numpy as np

    exchanges = np.minimum(rng.geometric(0.55, n), 6)  # 1 exchange: 55%, 2: 25%, 3+: 20%
    total = int(exchanges.sum())
    prompts = _texts(rng, words, np.clip(rng.lognormal(np.log(18), 0.8, total).astype(int), 2, 400))
    answers = _texts(rng, words, np.clip(rng.lognormal(np.log(60), 1.0, total).astype(int), 1, 3000))
    has_system = rng.random(n) < system_share
    systems = _texts(rng, words, rng.integers(4, 30, int(has_system.sum())))
    out, at, s = [], 0, 0
    for i, k in enumerate(exchanges.tolist()):
        messages = []
        if has_system[i]:
            messages.append({"role": "system", "content": systems[s]})
            s += 1
        for j in range(at, at + k):
            messages += [
                {"role": "user", "content": prompts[j]},
                {"role": "assistant", "content": answers[j]},
            ]
        at += k
        out.append(messages)
    return out


def write_corpus(root: Path, dialogs: int, seed: int = 0, shard_rows: int = 100_000) -> dict[str, Path]:
    """The two synthetic datasets under ``root`` (half of ``dialogs`` each); kept if already there."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    specs = {
        "tulu-3-sft-mixture": ("messages", EN_WORDS, 0.1),
        "GrandMaster-PRO-MAX": ("conversation", RU_WORDS, 0.3),
    }
    paths = {}
    for index, (name, (column, words, system_share)) in enumerate(specs.items()):
        folder = root / name
        paths[name] = folder
        done = folder / "done.json"
        if done.is_file() and json.loads(done.read_text())["dialogs"] == dialogs // 2:
            continue
        data = folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        for old in data.glob("*.parquet"):
            old.unlink()
        rng = np.random.default_rng([seed, index])
        count = dialogs // 2
        shards = max(1, -(-count // shard_rows))
        for shard in range(shards):
            rows = min(shard_rows, count - shard * shard_rows)
            table = {column: _dialogs(rng, rows, words, system_share)}
            if column == "messages":  # Tulu's other columns
                table["id"] = [f"synthetic_{shard}_{i}" for i in range(rows)]
                table["source"] = ["synthetic/tulu-like"] * rows
            pq.write_table(pa.table(table), data / f"train-{shard:05d}-of-{shards:05d}.parquet")
        done.write_text(json.dumps({"dialogs": count}))
    return paths


# ------------------------------------------------------------------------------------- scenarios
def _peak_mib() -> dict[str, float]:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return {
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1),
        "peak_child_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale, 1),
    }


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return round(int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _datamodule(args, paths: dict[str, Path], streaming: bool):
    from diffusion_lm import DataSource, DialogDataModule
    from diffusion_lm.backbone import DEMO_TOKENIZER
    from diffusion_lm.data import CanvasPolicy

    sources = [
        DataSource(str(paths[name]), weight=0.5, val_size=args.val_size, streaming=streaming)
        for name in ("tulu-3-sft-mixture", "GrandMaster-PRO-MAX")
    ]
    return DialogDataModule(
        sources,
        tokenizer=args.tokenizer or DEMO_TOKENIZER,
        batch_size=args.batch_size,
        max_length=512,
        canvas=CanvasPolicy(mode="sampled", length=256, filler_weight=0.5),
        train_turns="all",
        total_samples=args.total_samples,
        num_proc=args.num_proc,
        cache_dir=str(Path(args.workdir) / "cache"),
    )


def run_scenario(args, scenario: str) -> dict[str, Any]:
    """One scenario in this process (see the module docstring)."""
    import logging

    logging.disable(logging.WARNING)  # the skip summary is printed by the data module; keep stdout JSON
    import diffusion_lm  # noqa: F401 - the imports' own memory, reported apart

    imports_mib = _rss_mib()
    paths = {p.name: p for p in Path(args.workdir, "corpus").iterdir() if p.is_dir()}
    streaming = scenario == "stream"
    data = _datamodule(args, paths, streaming)
    start = time.perf_counter()
    data.setup("fit")
    out: dict[str, Any] = {
        "scenario": scenario,
        "setup_seconds": round(time.perf_counter() - start, 2),
        "rss_after_imports_mib": imports_mib,
        "rss_after_setup_mib": _rss_mib(),
    }
    summary = data.summary
    out["mix"] = {
        "train_examples": summary["train_examples"],
        "validation_examples": summary["validation_examples"],
        "per_language": summary["per_language"],
        "skipped_records": summary["skipped_records"],
    }
    if scenario == "loader":
        before = _rss_mib()
        start = time.perf_counter()
        loader = data.train_dataloader()
        first = next(iter(loader))
        out["first_batch_seconds"] = round(time.perf_counter() - start, 2)
        sampler = loader.batch_sampler
        start = time.perf_counter()
        batches = sum(1 for _ in sampler)  # one epoch's batch order (keys only, no collation)
        out["epoch_order_seconds"] = round(time.perf_counter() - start, 2)
        out["batches_per_epoch"] = batches
        out["loader_rss_delta_mib"] = round(_rss_mib() - before, 1)
        out["first_batch_rows"] = int(first["input_ids"].shape[0])
    if scenario == "stream":
        # The first batch waits for the shuffle buffer (data.shuffle_buffer examples) to fill.
        start = time.perf_counter()
        batches = iter(data.train_dataloader())
        next(batches)
        out["first_batch_seconds"] = round(time.perf_counter() - start, 2)
        start, seen = time.perf_counter(), 0
        for _, batch in zip(range(args.stream_batches), batches):
            seen += int(batch["sample_index"].shape[0])
        out["stream_batches"] = args.stream_batches
        out["stream_examples_per_second"] = round(seen / max(time.perf_counter() - start, 1e-9), 1)
        out["rss_after_batches_mib"] = _rss_mib()
    out.update(_peak_mib())
    return out


def _child(args, scenario: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--scenario",
        scenario,
        "--workdir",
        args.workdir,
        "--total_samples",
        str(args.total_samples),
        "--batch_size",
        str(args.batch_size),
        "--stream_batches",
        str(args.stream_batches),
        "--val_size",
        str(args.val_size),
    ]
    if args.num_proc:
        cmd += ["--num_proc", str(args.num_proc)]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"scenario {scenario} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(time.perf_counter() - start, 2)  # imports included
    return result


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dialogs", type=int, default=750_000, help="dialogs in the corpus (half per language)"
    )
    parser.add_argument(
        "--total_samples", type=int, default=750_000, help="data.total_samples (the mix size)"
    )
    parser.add_argument("--num_proc", type=int, default=None, help="data.num_proc (tokenisation processes)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--val_size", type=int, default=500, help="validation records per source")
    parser.add_argument("--stream_batches", type=int, default=200)
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder or hub id (default: the demo tokenizer)"
    )
    parser.add_argument("--workdir", default="bench_data", help="corpus and datasets cache (reused)")
    parser.add_argument("--scenarios", nargs="+", default=["cold", "warm", "loader", "stream"])
    parser.add_argument("--scenario", default=None, help=argparse.SUPPRESS)  # internal: run one, print JSON
    args = parser.parse_args(argv)

    if args.scenario:
        print(json.dumps(run_scenario(args, args.scenario)))
        return {}
    workdir = Path(args.workdir)
    start = time.perf_counter()
    paths = write_corpus(workdir / "corpus", args.dialogs)
    corpus_seconds = round(time.perf_counter() - start, 2)
    if "cold" in args.scenarios:
        import shutil

        shutil.rmtree(workdir / "cache", ignore_errors=True)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {
            "dialogs": args.dialogs,
            "total_samples": args.total_samples,
            "num_proc": args.num_proc,
            "batch_size": args.batch_size,
            "val_size": args.val_size,
            "max_length": 512,
            "canvas": "sampled 256",
            "train_turns": "all",
            "tokenizer": args.tokenizer or "bundled demo tokenizer",
        },
        "corpus": {
            "seconds": corpus_seconds,
            "bytes": sum(f.stat().st_size for p in paths.values() for f in p.rglob("*.parquet")),
        },
        "scenarios": [_child(args, s) for s in args.scenarios],
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
