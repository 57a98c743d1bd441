"""Sampling benchmark: our sampler vs the naive masked-diffusion loop vs GPT-2 ``generate``, one run.

Every prompt is exactly ``--prompt-tokens`` tokens (64; chat prompts of the chat template, their user
text grown character by character to that length) and every answer has ``--canvas`` slots (256).

* *naive* -- the plain MDLM/LLaDA loop: an eager forward of the whole canvas every step with the full
  ``[B, L, V]`` logits, greedy, one token per row per forward (the most confident masked slot anywhere
  in the canvas), ``canvas`` forwards for every row: no EOS stop, no finished-row skipping.
* *ours* -- :func:`diffusion_lm.sampling.generate` with a preset: ``greedy`` (one token per forward,
  blocks of 32, logits only at the block's masked slots, EOS policy, repetition guard, finished rows
  dropped, the vectorised step), ``fast`` (greedy + Fast-dLLM threshold 0.9: several tokens per
  forward), ``quality`` (temperature 0.7 / top-p 0.9, one token per forward); ``<preset>-plain`` runs the
  same preset with the plain per-row step (``vectorized=False``).
* *gpt2* -- autoregressive decoding with ``transformers``' ``generate`` and its KV cache: a randomly
  initialised GPT-2 with the diffusion model's width, depth, vocabulary and MLP parameter count (so
  about the same parameters), greedy, exactly ``--canvas`` new tokens per row (no early stop).

::

    python tools/bench_sample.py --model runs/demo/last.ckpt --canvas 192     # the demo model: 256 positions
    python tools/bench_sample.py --scratch modernbert-base --device cuda --batch-sizes 1 16 64

``--scratch SIZE`` uses an untrained model of that size (``demo``: the demo model's; ``modernbert-base``:
ModernBERT-base with its 50,368-token vocabulary) with EOS and pad suppressed, so every row fills its
canvas and every variant does the same amount of work. Batch ``b`` answers ``b`` prompts per call;
batch 1 answers ``--prompts`` of them one call each. Seconds are medians of ``--repeats`` rounds with
the variants interleaved. Prints one JSON object with, per batch size and variant: seconds, answer
tokens per second (tokens up to EOS; GPT-2: new tokens), denoiser calls and milliseconds per call,
forwards per answer, tokens committed per row-forward, mean answer length, repeated 3-grams, and the
speed-up over the naive loop and over GPT-2 (their seconds over ours for the same prompts; with
``--scratch`` every variant writes the same number of tokens, so it is also the tokens/s ratio).
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

SOURCE = ("Hello, how are you? What is your favorite book? Tell me about computers. Do you like music? "
          "Привет! Как дела? Что ты любишь есть? Расскажи мне о деньгах. Ты любишь музыку? ") * 8
SCRATCH = {
    "demo": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256),
    "modernbert-base": dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12,
                            intermediate_size=1152, config_overrides={"vocab_size": 50368}),
}


def exact_prompts(model, count: int, tokens: int) -> list[list[int]]:
    """``count`` different chat prompts of exactly ``tokens`` ids each."""
    out = []
    starts = [i for i, ch in enumerate(SOURCE) if ch in "?!." and SOURCE[i + 1:i + 2] == " "]
    for i in range(count):
        text = SOURCE[starts[i % len(starts)] + 2:]
        best = None
        for end in range(1, len(text)):
            ids = model.prompt_ids(text[:end])
            if len(ids) == tokens:
                best = ids
                break
            if len(ids) > tokens:
                break
        if best is None:
            raise SystemExit(f"could not build a prompt of exactly {tokens} tokens")
        out.append(best)
    return out


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


def ours_generate(model, prompts: list[list[int]], canvas_length: int, variant: str,
                  suppress: list[int]) -> dict:
    tpl = model.template
    preset, _, plain = variant.partition("-")
    sampler = SamplerConfig.preset(preset, suppress_tokens=suppress, vectorized=plain != "plain")
    result = generate(model.denoise, prompts, mask_id=tpl.mask_id, eos_id=tpl.eos_id, pad_id=tpl.pad_id,
                      canvas_length=canvas_length, sampler=sampler, seed=0, max_length=model.max_length)
    return {"ids": result.ids, "calls": result.stats.nfe,
            "row_forwards": sum(s.nfe for s in result.row_stats), "tokens": result.stats.tokens}


def build_gpt2(model, positions: int):
    """A random GPT-2 with about the diffusion model's parameters: same width, depth, heads and
    vocabulary; the MLP sized to the encoder's gated MLP (3 * hidden * intermediate weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.net.model.config
    config = GPT2Config(vocab_size=int(model.net.vocab_size), n_positions=positions, n_embd=cfg.hidden_size,
                        n_layer=cfg.num_hidden_layers, n_head=cfg.num_attention_heads,
                        n_inner=3 * cfg.intermediate_size // 2, bos_token_id=0, eos_token_id=None,
                        pad_token_id=0)
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(config).eval()
    gpt.generation_config.eos_token_id = None
    return gpt


@torch.no_grad()
def gpt2_generate(gpt, prompts: list[list[int]], canvas_length: int) -> dict:
    device = next(gpt.parameters()).device
    ids = torch.tensor(prompts, device=device)
    out = gpt.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=canvas_length,
                       min_new_tokens=canvas_length, do_sample=False, use_cache=True, pad_token_id=0)
    new = out[:, ids.shape[1]:].tolist()
    n = len(prompts)
    return {"ids": new, "calls": canvas_length, "row_forwards": canvas_length * n,
            "tokens": canvas_length * n}


def run_once(ctx: dict, variant: str, prompts: list[list[int]], batch: int) -> dict:
    """All prompts, ``batch`` per call; returns answers, counts and the wall time."""
    out = {"ids": [], "calls": 0, "row_forwards": 0, "tokens": 0}
    sync = torch.cuda.synchronize if ctx["device"].startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo : lo + batch]
        if variant == "naive":
            part = naive_generate(ctx["model"], chunk, ctx["canvas"])
        elif variant == "gpt2":
            part = gpt2_generate(ctx["gpt2"], chunk, ctx["canvas"])
        else:
            part = ours_generate(ctx["model"], chunk, ctx["canvas"], variant, ctx["suppress"])
        out["ids"] += part["ids"]
        for key in ("calls", "row_forwards", "tokens"):
            out[key] += part[key]
    sync()
    out["seconds"] = time.perf_counter() - t0
    return out


def run_batch(ctx: dict, variants: list[str], prompts: list[list[int]], batch: int, repeats: int) -> dict:
    """Median figures per variant, variants interleaved within each repeat."""
    for v in variants:  # warm-up
        run_once(ctx, v, prompts[:batch], batch)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            runs[v].append(run_once(ctx, v, prompts, batch))
    block = {}
    n = len(prompts)
    for v, rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        last = rs[-1]
        answer_tokens = sum(len(a) for a in last["ids"])
        block[v] = {
            "seconds": round(seconds, 4),
            "answer_tokens_per_s": round(answer_tokens / seconds, 1),
            "denoiser_calls": last["calls"],
            "ms_per_call": round(1000 * seconds / max(last["calls"], 1), 2),
            "forwards_per_answer": round(last["row_forwards"] / n, 2),
            "tokens_per_forward": round(last["tokens"] / max(last["row_forwards"], 1), 3),
            "mean_answer_tokens": round(answer_tokens / n, 2),
            "rep3": round(sum(repeated_ngram_rate(a, 3) for a in last["ids"]) / n, 4),
        }
    for ref in ("naive", "gpt2"):  # time to answer the same prompts
        if ref in block:
            for figures in block.values():
                figures[f"speedup_vs_{ref}"] = round(block[ref]["seconds"] / figures["seconds"], 2)
    return block


def build_scratch(size: str, max_positions: int):
    from diffusion_lm import MaskedDiffusionLM, ScratchBackbone

    spec = dict(SCRATCH[size])
    overrides = spec.pop("config_overrides", {})
    backbone = ScratchBackbone(model_type="modernbert", max_position_embeddings=max_positions,
                               config_overrides=overrides, **spec)
    torch.manual_seed(0)
    return MaskedDiffusionLM(backbone, health_check=False).eval()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/demo/last.ckpt", help="a .ckpt or an export folder")
    p.add_argument("--scratch", choices=sorted(SCRATCH), default=None,
                   help="an untrained model of this size instead (EOS and pad suppressed)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--canvas", type=int, default=256, help="answer slots")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompts", type=int, default=4, help="prompts answered at batch 1 (one call each)")
    p.add_argument("--variants", nargs="+",
                   default=["naive", "greedy", "fast", "quality", "greedy-plain", "gpt2"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder body (ours and naive)")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    positions = args.prompt_tokens + args.canvas
    if args.scratch:
        model = build_scratch(args.scratch, max(positions, 512)).to(args.device)
        source = f"scratch {args.scratch} (untrained)"
        suppress = [model.template.eos_id, model.template.pad_id]
    else:
        from diffusion_lm import load_model

        model = load_model(args.model, map_location=args.device).eval()
        source, suppress = args.model, []
    if positions > model.max_length:
        raise SystemExit(f"--prompt-tokens {args.prompt_tokens} + --canvas {args.canvas} = {positions} > the "
                         f"model's {model.max_length} positions; lower --canvas")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model.to(dtype)
    if args.compile:  # the encoder body, which both our denoiser and the naive loop call
        hf = model.net.model
        setattr(hf, hf.base_model_prefix, torch.compile(getattr(hf, hf.base_model_prefix), dynamic=True))
    ctx = {"model": model, "canvas": args.canvas, "device": args.device, "suppress": suppress}
    if "gpt2" in args.variants:
        ctx["gpt2"] = build_gpt2(model, positions).to(args.device, dtype)
    most = max(max(args.batch_sizes), args.prompts)
    all_prompts = exact_prompts(model, most, args.prompt_tokens)
    report = {
        "benchmark": "sample",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "precision": args.precision,
        "compile": args.compile,
        "model": source,
        "parameters": sum(t.numel() for t in model.parameters()),
        "gpt2_parameters": sum(t.numel() for t in ctx["gpt2"].parameters()) if "gpt2" in ctx else None,
        "vocab": int(model.net.vocab_size),
        "prompt_tokens": args.prompt_tokens,
        "canvas_length": args.canvas,
        "repeats": args.repeats,
        "results": {},
    }
    for batch in args.batch_sizes:
        prompts = all_prompts[: args.prompts] if batch == 1 else all_prompts[:batch]
        report["results"][f"batch_{batch}"] = run_batch(ctx, args.variants, prompts, batch, args.repeats)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
