"""Sampling benchmark: our sampler vs the naive masked-diffusion loop, measured in the same run.

*Naive* is the plain MDLM/LLaDA loop: the whole ``[B, L, V]`` logits tensor every step, greedy
proposals, one token per row per forward pass (the most confident masked slot anywhere in the canvas,
LLaDA's "low-confidence remasking" with one block over the canvas), ``canvas_length`` forwards for
every row: no EOS stop, no finished-row skipping, no repetition guard. *Ours* runs
:func:`diffusion_lm.sampling.generate` with a preset: ``greedy`` (one token per forward, blocks of 32,
logits only at the current block's masked slots, finished rows dropped), ``fast`` (threshold 0.9:
several tokens per forward) and ``quality`` (sampling, one token per forward)::

    python tools/bench_sample.py --model runs/demo/lightning_logs/version_0/checkpoints/last.ckpt
    python tools/bench_sample.py --scratch --canvas 64          # no checkpoint: an untrained scratch model

Each variant answers the same prompts at batch 1 (one prompt per call) and batch 8 (all at once);
prints one JSON object with, per batch size and variant: seconds (median of ``--repeats``,
variants interleaved), answer
tokens per second, forwards per answer, tokens committed per row-forward, denoiser calls,
mean answer length and the repeated-3-gram rate of the answers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from diffusion_lm.sampling import SamplerConfig, generate, repeated_ngram_rate

PROMPTS = [
    "Hello, how are you?",
    "What is your favorite book?",
    "Tell me about computers.",
    "Do you like music?",
    "Привет! Как дела?",
    "Что ты любишь есть?",
    "Расскажи мне о деньгах.",
    "Ты любишь музыку?",
]


@torch.no_grad()
def naive_generate(model, prompts: list[list[int]], canvas_length: int) -> dict:
    """The plain loop (see the module docstring). Returns answers and counts like ours."""
    tpl = model.template
    net = model.net.model  # the Hugging Face masked LM: full-vocabulary logits at every position
    device = next(net.parameters()).device
    lengths = [len(p) + canvas_length for p in prompts]
    width = max(lengths)
    ids = torch.full((len(prompts), width), tpl.pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    canvas = torch.zeros_like(ids, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = torch.tensor(p)
        ids[r, len(p) : lengths[r]] = tpl.mask_id
        attn[r, : lengths[r]] = 1
        canvas[r, len(p) : lengths[r]] = True
    ids, attn, canvas = ids.to(device), attn.to(device), canvas.to(device)
    rows = torch.arange(len(prompts), device=device)
    for _ in range(canvas_length):
        logits = net(input_ids=ids, attention_mask=attn).logits.float()  # [B, L, V]
        logits[..., tpl.mask_id] = float("-inf")
        probs = logits.softmax(dim=-1)
        conf, proposal = probs.max(dim=-1)
        masked = ids == tpl.mask_id
        conf = torch.where(masked & canvas, conf, torch.full_like(conf, float("-inf")))
        pos = conf.argmax(dim=1)
        ids[rows, pos] = proposal[rows, pos]
    answers = []
    for r, p in enumerate(prompts):
        out = ids[r, len(p) : lengths[r]].tolist()
        if tpl.eos_id in out:
            out = out[: out.index(tpl.eos_id)]
        answers.append([t for t in out if t not in (tpl.pad_id, tpl.mask_id)])
    n = len(prompts)
    return {"ids": answers, "calls": canvas_length, "row_forwards": canvas_length * n,
            "tokens": canvas_length * n}


def ours_generate(model, prompts: list[list[int]], canvas_length: int, preset: str) -> dict:
    tpl = model.template
    result = generate(model.denoise, prompts, mask_id=tpl.mask_id, eos_id=tpl.eos_id, pad_id=tpl.pad_id,
                      canvas_length=canvas_length, sampler=SamplerConfig.preset(preset), seed=0,
                      max_length=model.max_length)
    return {"ids": result.ids, "calls": result.stats.nfe,
            "row_forwards": sum(s.nfe for s in result.row_stats), "tokens": result.stats.tokens}


def run_once(model, variant: str, prompts: list[list[int]], canvas_length: int, batch: int) -> dict:
    """All prompts, ``batch`` per call; returns answers, counts and the wall time."""
    out = {"ids": [], "calls": 0, "row_forwards": 0, "tokens": 0}
    t0 = time.perf_counter()
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo : lo + batch]
        part = naive_generate(model, chunk, canvas_length) if variant == "naive" else \
            ours_generate(model, chunk, canvas_length, variant)
        out["ids"] += part["ids"]
        for key in ("calls", "row_forwards", "tokens"):
            out[key] += part[key]
    out["seconds"] = time.perf_counter() - t0
    return out


def run_batch(model, variants: list[str], prompts: list[list[int]], canvas_length: int, batch: int,
              repeats: int) -> dict:
    """Median figures per variant. Variants are interleaved within each repeat, so a burst of load
    from other processes on a shared machine hits all of them alike."""
    for v in variants:  # warm-up
        run_once(model, v, prompts, canvas_length, batch)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            runs[v].append(run_once(model, v, prompts, canvas_length, batch))
    block = {}
    n = len(prompts)
    for v, rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        last = rs[-1]
        answer_tokens = sum(len(a) for a in last["ids"])
        block[v] = {
            "seconds": round(seconds, 4),
            "answer_tokens_per_s": round(answer_tokens / seconds, 1),
            "forwards_per_answer": round(last["row_forwards"] / n, 2),
            "tokens_per_forward": round(last["tokens"] / last["row_forwards"], 3),
            "denoiser_calls": last["calls"],
            "mean_answer_tokens": round(answer_tokens / n, 2),
            "rep3": round(sum(repeated_ngram_rate(a, 3) for a in last["ids"]) / n, 4),
        }
    return block


def build_scratch(max_positions: int):
    from diffusion_lm import MaskedDiffusionLM, ScratchBackbone

    backbone = ScratchBackbone(model_type="modernbert", hidden_size=256, num_hidden_layers=4,
                               num_attention_heads=4, intermediate_size=512,
                               max_position_embeddings=max_positions)
    return MaskedDiffusionLM(backbone, health_check=False).eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/demo/lightning_logs/version_0/checkpoints/last.ckpt",
                   help="a .ckpt or an export folder")
    p.add_argument("--scratch", action="store_true", help="use an untrained demo-size scratch model instead")
    p.add_argument("--canvas", type=int, default=None,
                   help="answer slots (default: the model's canvas_length)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--variants", nargs="+", default=["naive", "greedy", "fast", "quality"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    if args.scratch:
        model = build_scratch(256).to(args.device)
        source = "scratch (untrained, demo size)"
    else:
        from diffusion_lm import load_model

        model = load_model(args.model, map_location=args.device).eval()
        source = args.model
    canvas = args.canvas or int(model.hparams.canvas_length)
    prompts = [model.prompt_ids(text) for text in PROMPTS]
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "model": source,
        "parameters": sum(t.numel() for t in model.parameters()),
        "vocab": len(model.tokenizer),
        "canvas_length": canvas,
        "prompts": len(prompts),
        "repeats": args.repeats,
        "results": {},
    }
    for batch in args.batch_sizes:
        block = run_batch(model, args.variants, prompts, canvas, batch, args.repeats)
        if "naive" in block:
            base = block["naive"]["seconds"]
            for v, figures in block.items():
                figures["speedup_vs_naive"] = round(base / figures["seconds"], 2)
        report["results"][f"batch_{batch}"] = block
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
