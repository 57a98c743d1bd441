"""Learning benchmark: the whole pipeline, through the command line, learns a task and generalises.

Writes the synthetic bilingual digits task (``diffusion_lm.data.synthetic``: four-digit strings
spelled digit by digit in English and Russian and read back, 1,440 training dialogs; 40 strings, 160
prompts, held out: no training dialog contains them), trains a small model from scratch with
``diffusion-lm fit`` and the default data settings, answers the held-out prompts with
``diffusion-lm generate`` (greedy) and reports the exact match against the references.

    python tools/bench_learning.py                  # a few minutes on 2 CPU cores
    python tools/bench_learning.py --steps 5 --workdir /tmp/x   # a smoke run (learns nothing)

Prints one JSON object: exact match overall and per language and kind, the fit and generate wall
times, the commands that were run and the machine. Answers are compared with whitespace removed
(the task's tokenizer decodes digits one per token, ``0 2 6 8`` for ``0268``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from diffusion_lm.data.synthetic import write_synthetic_task

CONFIG = """\
seed_everything: {seed}
model:
  backbone:
    model_type: modernbert
    tokenizer: {tokenizer}
    hidden_size: 128
    num_hidden_layers: 2
    num_attention_heads: 4
    intermediate_size: 256
    max_position_embeddings: 32
  learning_rate: 2.0e-3
  warmup_steps: 20
  lr_schedule: cosine
  canvas_length: 8
  seed: {seed}
  health_check: false
data:
  sources:
    - {{path: {train_en}, language: en, weight: 0.5, val_size: 0}}
    - {{path: {train_ru}, language: ru, weight: 0.5, val_size: 0}}
  batch_size: {batch_size}
  max_length: 32
  canvas: {{mode: fixed, length: 8, filler_weight: 0.5}}
  seed: {seed}
  cache_dir: {cache}
trainer:
  accelerator: cpu
  devices: 1
  max_steps: {steps}
  limit_val_batches: 0
  log_every_n_steps: 50
  enable_progress_bar: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, every_n_train_steps: 0}}
"""


def _run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (output to ``log``); its wall time in seconds, or exit with its log's tail."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text(encoding="utf-8").splitlines()[-20:]
        sys.exit(f"{' '.join(cmd)} exited {code}:\n" + "\n".join(tail))
    return time.perf_counter() - start


def run(workdir: Path, steps: int, batch_size: int, seed: int) -> dict:
    """Fit and generate through the CLI in ``workdir``; the benchmark's figures."""
    files = write_synthetic_task(workdir / "task", max_number=400, held_out=0.1, seed=seed, task="digits")
    root = workdir / "run"
    config = workdir / "learning.yaml"
    config.write_text(CONFIG.format(seed=seed, tokenizer=files["tokenizer"], train_en=files["train_en"],
                                    train_ru=files["train_ru"], batch_size=batch_size, steps=steps,
                                    cache=workdir / "cache", root=root), encoding="utf-8")
    test = [json.loads(line) for line in files["test"].read_text(encoding="utf-8").splitlines()]
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": d["messages"][0]["content"],
                                           "language": d["language"]}, ensure_ascii=False) + "\n"
                               for i, d in enumerate(test)), encoding="utf-8")
    sampler = workdir / "greedy.yaml"  # a correct answer may repeat a token (0 4 4 0): no repetition guard
    sampler.write_text("processors: [eos]\n", encoding="utf-8")
    cli = [sys.executable, "-m", "diffusion_lm"]
    fit = [*cli, "fit", "--config", str(config)]
    fit_seconds = _run(fit, workdir / "fit.log")
    checkpoint = root / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        checkpoint = max(root.glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    answers = workdir / "answers.jsonl"
    generate = [*cli, "generate", "--model", str(checkpoint), "--input", str(prompts), "--output",
                str(answers), "--preset", "greedy", "--sampler", str(sampler), "--canvas_length", "8",
                "--batch_size", "64", "--device", "cpu"]
    generate_seconds = _run(generate, workdir / "generate.log")
    rows = {int(r["id"]): r for r in map(json.loads, answers.read_text(encoding="utf-8").splitlines())}
    by: dict[str, list[bool]] = defaultdict(list)
    for i, d in enumerate(test):
        right = "".join(rows[i]["answer"].split()) == "".join(d["messages"][1]["content"].split())
        for key in ("all", d["language"], d["kind"]):
            by[key].append(right)
    return {
        "exact_match": sum(by["all"]) / len(by["all"]),
        "exact": sum(by["all"]),
        "held_out": len(by["all"]),
        "by": {k: round(sum(v) / len(v), 4) for k, v in sorted(by.items()) if k != "all"},
        "fit_seconds": round(fit_seconds, 1),
        "generate_seconds": round(generate_seconds, 1),
        "commands": {"fit": " ".join(fit[1:]), "generate": " ".join(generate[1:])},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None,
                        help="keep the task, run and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(workdir, args.steps, args.batch_size, args.seed)
    result["settings"] = vars(args)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                         "date": time.strftime("%Y-%m-%d")}
    json.dump(result, sys.stdout, indent=2)
    print()
    return result


if __name__ == "__main__":
    main()
