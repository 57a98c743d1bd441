"""Batching modes measured against each other: what each step learns, padding, speed.

Trains the same small model from scratch on the synthetic bilingual number task
(``diffusion_lm.data.synthetic``: answers 1-6 words, lengths correlated with language, direction and
number size) once per batching mode, with everything else equal, and reports for each mode:

* held-out exact match (greedy, numbers whose prompts no training dialog contains), overall and per
  language;
* padding share (row padding over all row positions, measured over one epoch of batches);
* per-batch language share: mean and standard deviation against the binomial expectation
  ``sqrt(p (1 - p) / batch)`` of uniformly drawn batches;
* training throughput: real (non-pad) tokens per second of the fit loop.

Modes: ``packed`` (the default: mix-stratified random batches packed into rows with per-example
attention), ``padded`` (the same batches, one example per row), ``grouped`` (the former default:
windows of 64 batches sorted by length), and ``uniform`` (``padded`` without stratification: plain
uniformly drawn batches, the reference a learning-neutral default must match).

    python tools/bench_batching.py                       # all modes, the benchmark's defaults
    python tools/bench_batching.py --modes packed uniform --steps 300 --max-number 100   # quick
    python tools/bench_batching.py --layout 20000     # rows only: the recipes' chat lengths, no training

``--layout N`` trains nothing: it writes ``tools/bench_data.py``'s synthetic chat corpus (N dialogs in
the Tulu / GrandMaster schemas, realistic answer lengths), prepares it with the recipes' data
settings (``max_length`` 512, sampled canvas of 256, equal EN/RU weights) and reports each mode's
padding share and per-batch language shares over up to 500 training batches: what packing saves
on real length spreads, where the synthetic task's near-uniform lengths leave little to pack.

Prints one JSON object: the settings and one entry per mode (seeds are run in the order given and
their figures averaged; the held-out count is per seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from diffusion_lm import DataSource, DialogDataModule, MaskedDiffusionLM, SamplerConfig, ScratchBackbone
from diffusion_lm.data import CanvasPolicy, Turn
from diffusion_lm.data.synthetic import write_synthetic_task

MODES = {
    "packed": {"batching": "packed", "stratify": True},
    "padded": {"batching": "padded", "stratify": True},
    "grouped": {"batching": "grouped", "stratify": False},
    "uniform": {"batching": "padded", "stratify": False},
}


class _Throughput(pl.Callback):
    """Real tokens and wall time of the training batches."""

    def __init__(self) -> None:
        self.tokens = 0
        self.start = 0.0
        self.seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += int((batch["attention_mask"] > 0).sum())

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def batch_statistics(loader, languages: list[str]) -> dict:
    """Padding share and per-batch language shares over one pass of ``loader``."""
    real = total = 0
    shares: dict[str, list[float]] = {lang: [] for lang in languages}
    size = 0
    for batch in loader:
        mask = batch["attention_mask"]
        real += int((mask > 0).sum())
        total += mask.numel()
        n = len(batch["language"])
        size = n
        for lang in languages:
            shares[lang].append(batch["language"].count(lang) / n)
    out = {"padding_share": 1 - real / total if total else 0.0, "batches": len(shares[languages[0]])}
    for lang, values in shares.items():
        p = statistics.fmean(values)
        out[f"share_{lang}_mean"] = p
        out[f"share_{lang}_std"] = statistics.pstdev(values)
        out[f"share_{lang}_binomial_std"] = math.sqrt(p * (1 - p) / size) if size else 0.0
    return out


def held_out_exact(model: MaskedDiffusionLM, test: list[dict], canvas: int) -> list[bool]:
    """Greedy answers to the held-out prompts: whether each equals the reference, token for token
    (the repetition guard is off: a correct answer may repeat a token, as ``4 4`` does)."""
    prompts = [[Turn("user", d["messages"][0]["content"])] for d in test]
    sampler = SamplerConfig.preset("greedy", processors=["eos"])
    result = model.generate(prompts, sampler=sampler, canvas_length=canvas, seed=0)
    answers = [model.template.encode_text(d["messages"][1]["content"]) for d in test]
    return [ids == answer for ids, answer in zip(result.ids, answers)]


def run_mode(mode: str, files: dict, test: list[dict], args, seed: int) -> dict:
    """Train one model with ``mode``'s batching and measure it."""
    pl.seed_everything(seed, workers=True)
    backbone = ScratchBackbone(model_type="modernbert", tokenizer=str(files["tokenizer"]),
                               hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=getattr(args, "heads", None) or max(1, args.hidden // 32),
                               intermediate_size=2 * args.hidden,
                               max_position_embeddings=args.max_length)
    model = MaskedDiffusionLM(backbone, learning_rate=args.lr, warmup_steps=args.warmup,
                              lr_schedule=getattr(args, "lr_schedule", "cosine"), canvas_length=args.canvas,
                              seed=seed, health_check=False)
    data = DialogDataModule(
        [DataSource(str(files["train_en"]), language="en", weight=0.5, val_size=0),
         DataSource(str(files["train_ru"]), language="ru", weight=0.5, val_size=0)],
        batch_size=args.batch_size, max_length=args.max_length,
        canvas=CanvasPolicy(length=args.canvas, filler_weight=0.5), seed=seed,
        cache_dir=str(files["cache"]), **MODES[mode],
    )
    speed = _Throughput()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, limit_val_batches=0, callbacks=[speed],
                         default_root_dir=str(files["cache"]))
    trainer.fit(model, data)
    stats = batch_statistics(data.train_dataloader(), ["en", "ru"])
    right = held_out_exact(model, test, args.canvas)
    by_lang = {lang: [r for r, d in zip(right, test) if d["language"] == lang] for lang in ("en", "ru")}
    return {
        "exact_match": sum(right) / len(right),
        "exact": sum(right),
        "held_out": len(right),
        **{f"exact_match_{k}": sum(v) / len(v) for k, v in by_lang.items()},
        "train_tokens_per_s": speed.tokens / speed.seconds if speed.seconds else 0.0,
        "train_seconds": speed.seconds,
        **stats,
    }


def layout_statistics(dialogs: int, modes: list[str], batch_size: int, workdir: Path) -> dict:
    """Padding and language shares of each batching mode on the recipe-shaped chat corpus."""
    import importlib.util
    import itertools

    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).with_name("bench_data.py"))
    bench_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_data)
    from diffusion_lm.backbone import DEMO_TOKENIZER

    paths = bench_data.write_corpus(workdir / "corpus", dialogs)
    out = {}
    for mode in modes:
        data = DialogDataModule(
            [DataSource(str(paths["tulu-3-sft-mixture"]), language="en", weight=0.5, val_size=0),
             DataSource(str(paths["GrandMaster-PRO-MAX"]), language="ru", weight=0.5, val_size=0)],
            tokenizer=DEMO_TOKENIZER, batch_size=batch_size, max_length=512,
            canvas=CanvasPolicy(mode="sampled", length=256, filler_weight=0.5), train_turns="all",
            cache_dir=str(workdir / "cache"), **MODES[mode],
        )
        data.setup("fit")
        out[mode] = batch_statistics(itertools.islice(data.train_dataloader(), 500), ["en", "ru"])
        print(f"{mode}: padding {out[mode]['padding_share']:.3f}", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--task", choices=["numbers", "digits"], default="numbers")
    parser.add_argument("--max-number", type=int, default=300, help="numbers 0..N-1, or N digit strings")
    parser.add_argument("--held-out", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 32)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], default="cosine")
    parser.add_argument("--canvas", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--layout", type=int, default=None, metavar="DIALOGS",
                        help="no training: padding and language shares on a chat corpus of this many dialogs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results: dict = {"settings": vars(args), "modes": {}}
    if args.layout:
        with tempfile.TemporaryDirectory() as tmp:
            results["modes"] = layout_statistics(args.layout, args.modes, args.batch_size, Path(tmp))
        json.dump(results, sys.stdout, indent=2)
        print()
        return results
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, list[dict]] = {m: [] for m in args.modes}
        for seed in args.seeds:
            files = write_synthetic_task(Path(tmp) / f"task{seed}", max_number=args.max_number,
                                         held_out=args.held_out, seed=seed, task=args.task)
            files["cache"] = Path(tmp) / "cache"
            test = [json.loads(line) for line in files["test"].read_text(encoding="utf-8").splitlines()]
            for mode in args.modes:  # modes interleaved within each seed
                runs[mode].append(run_mode(mode, files, test, args, seed))
                print(f"seed {seed} {mode}: {runs[mode][-1]['exact']}/{runs[mode][-1]['held_out']} held-out "
                      f"exact, {runs[mode][-1]['train_seconds']:.0f} s", file=sys.stderr, flush=True)
        for mode, per_seed in runs.items():
            keys = per_seed[0].keys()
            results["modes"][mode] = {k: statistics.fmean(r[k] for r in per_seed) for k in keys}
            results["modes"][mode]["per_seed_exact"] = [r["exact"] for r in per_seed]
    json.dump(results, sys.stdout, indent=2)
    print()
    return results


if __name__ == "__main__":
    main()
