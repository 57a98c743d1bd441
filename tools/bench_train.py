"""Training-step benchmark: our default path vs the naive padded, full-logits path, in one process.

A full optimizer step (forward, masked-diffusion loss, backward, gradient clipping, AdamW) on a
randomly initialised ModernBERT-architecture encoder (throughput does not depend on the weights)
and chat-like examples of variable length: total lengths drawn log-normal and clipped to
``--max-length``, about 30% of each example prompt and the rest answer (ending with EOS).

* **ours** -- what ``diffusion-lm fit`` runs by default: the data module's ``packed`` batching
  (:class:`~diffusion_lm.data.collate.DiffusionCollator` with ``pack=True``: several examples per row,
  each attending only to itself), the LM head only on the hidden states of the masked answer positions
  (:class:`~diffusion_lm.backbone.SparseHeadDenoiser`,
  :func:`~diffusion_lm.objective.masked_diffusion_nelbo`),
  one time per example; on CUDA also bf16 autocast and fused AdamW (``--compile`` adds ``torch.compile``).
* **naive** -- what dLLM and MDLM do: one example per row padded to the batch's longest, the Hugging
  Face forward with ``[B, L, V]`` logits, cross-entropy at the masked positions (same times, same
  optimizer settings, same precision).

Both variants see the same batches; they are interleaved (``ours, naive, ours, naive, ...``) and
repeated, and medians are reported, so a burst of load on a shared machine hits both alike::

    python tools/bench_train.py --size tiny --batch 8 --max-length 512                  # CPU
    python tools/bench_train.py --size modernbert-base --device cuda --precision bf16 --batch 32
    python tools/bench_train.py --size mmbert-base --device cuda --precision bf16 --batch 32

Prints one JSON object: the settings, the length distribution of the examples, and per variant
real (non-pad) tokens per second, model FLOP utilisation, step time and peak memory.

Model FLOPs count the useful work only, the same for both variants: ``6 * non-embedding parameters``
per real token, ``6 * hidden * vocab`` per masked token (the head where the loss needs it) and
``12 * hidden * span`` per token per layer for attention (span: the example's length in global
layers, at most the sliding window in local ones). Utilisation divides them by the step time and
the peak: ``--peak-tflops`` if given, else the dense bf16 peak of a known GPU, else (CPU) a dense
float32 matrix product measured at start-up on this machine. Peak memory: CUDA's
``max_memory_allocated`` per variant; on the CPU each variant's step runs once more in a fresh
process and the growth of its peak RSS over the RSS after building the model is reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

from diffusion_lm.backbone import SparseHeadDenoiser
from diffusion_lm.data.collate import CanvasPolicy, DiffusionCollator
from diffusion_lm.objective import masked_diffusion_nelbo
from diffusion_lm.schedules import LogLinearSchedule, stratified_times

# Encoder sizes (ModernBERT architecture). The base sizes are the published configs of
# answerdotai/ModernBERT-base (50,368-token vocabulary) and jhu-clsp/mmBERT-base (same body,
# Gemma's 256,000-token vocabulary); written out here because this benchmark needs no hub access.
SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                 vocab_size=50368),
    "modernbert-base": dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12,
                            intermediate_size=1152, vocab_size=50368),
    "mmbert-base": dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12,
                        intermediate_size=1152, vocab_size=256000),
}
PAD, EOS, MASK, FIRST_TOKEN = 0, 1, 2, 3

# Dense bf16 peak of GPUs the figures may come from (TFLOP/s, no sparsity).
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def build_model(size: str, max_length: int, attn: str = "sdpa"):
    """A randomly initialised ModernBERT masked LM of the given size."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.for_model(
        "modernbert", **SIZES[size], max_position_embeddings=max(max_length, 128), pad_token_id=PAD,
        eos_token_id=EOS, bos_token_id=EOS, cls_token_id=EOS, sep_token_id=EOS,
    )
    torch.manual_seed(0)
    return AutoModelForMaskedLM.from_config(config, attn_implementation=attn)


def chat_lengths(n: int, max_length: int, median: float, sigma: float, prompt_share: float,
                 generator: torch.Generator) -> list[tuple[int, int]]:
    """``(prompt, answer)`` lengths of ``n`` chat-like examples: totals log-normal around ``median``
    (clipped to ``[8, max_length]``), the prompt about ``prompt_share`` of each, the answer the rest
    (its EOS included)."""
    totals = torch.exp(math.log(median) + sigma * torch.randn(n, generator=generator, dtype=torch.float64))
    out = []
    for total in totals.clamp(8, max_length).round().long().tolist():
        jitter = 0.8 + 0.4 * float(torch.rand((), generator=generator, dtype=torch.float64))
        prompt = min(max(1, round(total * prompt_share * jitter)), total - 2)
        out.append((prompt, total - prompt))
    return out


def make_batches(args, vocab: int) -> list[list[dict]]:
    """``--batches`` batches of ``--batch`` examples (random token ids: speed does not depend on them)."""
    gen = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(args.batches):
        examples = []
        for prompt, answer in chat_lengths(args.batch, args.max_length, args.median_length, args.sigma,
                                           args.prompt_share, gen):
            ids = torch.randint(FIRST_TOKEN, vocab, (prompt + answer - 1,), generator=gen).tolist()
            examples.append({"prompt_ids": ids[:prompt], "answer_ids": ids[prompt:] + [EOS]})
        batches.append(examples)
    return batches


def length_summary(batches: list[list[dict]]) -> dict:
    """The length distribution written into the report."""
    totals = sorted(len(e["prompt_ids"]) + len(e["answer_ids"]) for b in batches for e in b)
    prompts = sum(len(e["prompt_ids"]) for b in batches for e in b)

    def q(p: float) -> int:
        return totals[min(len(totals) - 1, int(p * len(totals)))]

    return {"examples": len(totals), "mean": round(sum(totals) / len(totals), 1), "min": totals[0],
            "p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "max": totals[-1],
            "prompt_share": round(prompts / sum(totals), 3)}


def collate(examples: list[dict], variant: str, multiple: int) -> dict:
    """``ours``: packed rows (the data module's default); ``naive``: one example per row."""
    collator = DiffusionCollator(PAD, CanvasPolicy(mode="none", length=10**6), pad_to_multiple_of=multiple,
                                 pack=variant == "ours")
    return collator(examples)


def model_flops(model, batch: dict, masked: int, config) -> float:
    """Useful FLOPs of one training step (see the module docstring)."""
    embed = model.get_input_embeddings().weight.numel()
    head_out = config.hidden_size * config.vocab_size
    body = sum(p.numel() for p in model.parameters()) - embed
    real = int((batch["attention_mask"] > 0).sum())
    window = getattr(config, "sliding_window", None) or config.local_attention // 2
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    lengths = [int(n) for n in torch.bincount(batch["example"][batch["example"] >= 0]).tolist() if n]
    attention = 0.0
    for kind in layer_types:
        for n in lengths:
            span = n if kind == "full_attention" else min(n, 2 * window + 1)
            attention += 12 * config.hidden_size * n * span
    return 6.0 * body * real + 6.0 * head_out * masked + attention


def naive_loss(model, batch: dict, t: torch.Tensor, schedule,
               gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """dLLM/MDLM style: HF forward on padded rows, ``[B, L, V]`` logits, CE at the masked positions."""
    ids, attn, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    u = torch.rand(ids.shape, generator=gen, device=ids.device)
    masked = (u < schedule.mask_probability(t)[:, None]) & loss_mask
    noised = torch.where(masked, torch.full_like(ids, MASK), ids)
    logits = model(input_ids=noised, attention_mask=attn).logits.float()
    rows, cols = masked.nonzero(as_tuple=True)
    nll = F.cross_entropy(logits[rows, cols], ids[rows, cols], reduction="none")
    return (schedule.weight(t)[rows] * nll).sum() / loss_mask.sum(), int(rows.numel())


def ours_loss(net: SparseHeadDenoiser, batch: dict, t: torch.Tensor, schedule,
              gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """The module's path: packed rows, one time per example, the head at masked positions only."""
    t_tok = t[batch["example"].clamp_min(0)]
    out = masked_diffusion_nelbo(lambda i, a, q: net(i, a, q, packed=True), batch["input_ids"],
                                 batch["attention_mask"], batch["loss_mask"], t_tok, schedule, MASK,
                                 loss_weight=batch["loss_weight"], generator=gen)
    return out.loss, out.num_masked


class Variant:
    """One training path: its model copy, optimizer and (optionally compiled) loss function."""

    def __init__(self, name: str, args, device: torch.device) -> None:
        self.name = name
        self.model = build_model(args.size, args.max_length).to(device)
        self.model.train()
        fused = device.type == "cuda" and name == "ours"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=fused or None)
        self.net = SparseHeadDenoiser(self.model, MASK)
        if args.compile and name == "ours":
            self.net = torch.compile(self.net, dynamic=True)
        self.schedule = LogLinearSchedule()
        self.device = device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(self, batch: dict, index: int) -> int:
        """One optimizer step; returns the number of masked (scored) tokens."""
        n = int(batch["sample_index"].shape[0])
        t = stratified_times(n, generator=torch.Generator().manual_seed(index), device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(index)
        with self.autocast:
            if self.name == "ours":
                loss, masked = ours_loss(self.net, batch, t, self.schedule, gen)
            else:
                loss, masked = naive_loss(self.model, batch, t, self.schedule, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return masked


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def cpu_peak_flops(seconds: float = 1.0) -> float:
    """Dense float32 matmul FLOP/s this process reaches now (the CPU's practical peak)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    return 2 * 1024**3 * done / (time.perf_counter() - start)


def peak_flops(args, device: torch.device) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{key} dense bf16 peak"
        return float("nan"), f"unknown GPU {name!r}: pass --peak-tflops"
    return cpu_peak_flops(), "measured float32 1024x1024 matmul, this process"


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_probe(args) -> dict:
    """Peak RSS growth of one step of ``args.probe`` (run in a fresh process by :func:`cpu_memory`):
    the kernel's high-water mark is reset to the current RSS just before the step (Linux
    ``/proc/self/clear_refs``), so earlier peaks (imports, model construction) do not count."""
    device = torch.device("cpu")
    variant = Variant(args.probe, args, device)
    batch = collate(make_batches(args, variant.model.config.vocab_size)[0], args.probe,
                    args.multiple if args.probe == "ours" else 1)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    variant.step(batch, 0)
    return {"peak_rss_growth_mib": round((_status_kib("VmHWM") - before) / 1024, 1)}


def cpu_memory(argv: list[str], variant: str) -> Optional[float]:
    out = subprocess.run([sys.executable, __file__, *argv, "--probe", variant], capture_output=True,
                         text=True, check=False)
    try:
        return json.loads(out.stdout)["peak_rss_growth_mib"]
    except (ValueError, KeyError):
        return None


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--max-length", type=int, default=1024, help="longest example (tokens)")
    p.add_argument("--median-length", type=float, default=None,
                   help="median example length (default: max-length / 4)")
    p.add_argument("--sigma", type=float, default=0.9, help="log-normal spread of the lengths")
    p.add_argument("--prompt-share", type=float, default=0.3)
    p.add_argument("--batches", type=int, default=3, help="distinct batches, each run by both variants")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--variants", nargs="+", default=["ours", "naive"], choices=["ours", "naive"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile our denoiser (dynamic shapes)")
    p.add_argument("--multiple", type=int, default=64, help="round row widths up to this (shape buckets)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the CPU memory probes (fresh processes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", choices=["ours", "naive"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.median_length is None:
        args.median_length = args.max_length / 4
    return args


def _timed_round(variant: Variant, batches: list[dict], r: int, config, device: torch.device) -> dict:
    """One optimizer step per batch; seconds, real tokens and model FLOPs of the round."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    masked = [variant.step(batch, i + r * len(batches)) for i, batch in enumerate(batches)]
    sync()
    entry = {"seconds": time.perf_counter() - start,
             "real": sum(int((b["attention_mask"] > 0).sum()) for b in batches),
             "flops": sum(model_flops(variant.model, b, m, config) for b, m in zip(batches, masked))}
    if device.type == "cuda":
        entry["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return entry


def measure(args, device: torch.device) -> tuple[dict, dict, int]:
    """Interleaved, repeated rounds; per variant the median of each round's throughput."""
    variants = {name: Variant(name, args, device) for name in args.variants}
    config = next(iter(variants.values())).model.config
    batches = make_batches(args, config.vocab_size)
    # Naive rows are padded to the longest row only; ours round widths up to shape buckets.
    data = {name: [to_device(collate(b, name, args.multiple if name == "ours" else 1), device)
                   for b in batches] for name in variants}
    rounds: dict[str, list[dict]] = {name: [] for name in variants}
    oom: set[str] = set()
    for r in range(args.warmup + args.repeats):
        for name, variant in variants.items():
            if name in oom:
                continue
            try:
                entry = _timed_round(variant, data[name], r, config, device)
            except torch.OutOfMemoryError:  # the naive path at a 256k vocabulary: a result, not a crash
                oom.add(name)
                variant.opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                continue
            if r >= args.warmup:
                rounds[name].append(entry)
    shapes = {name: {"rows_per_batch": round(statistics.mean(b["input_ids"].shape[0] for b in data[name]), 2),
                     "row_width_mean": round(statistics.mean(b["input_ids"].shape[1] for b in data[name]), 1),
                     "padding_share": round(1 - sum(int((b["attention_mask"] > 0).sum()) for b in data[name])
                                            / sum(b["input_ids"].numel() for b in data[name]), 3)}
              for name in variants}
    return rounds, shapes, sum(p.numel() for p in next(iter(variants.values())).model.parameters())


def report(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        return memory_probe(args)
    device = torch.device(args.device)
    peak, peak_source = peak_flops(args, device)
    rounds, shapes, params = measure(args, device)
    results = {}
    for name, rs in rounds.items():
        if not rs:
            results[name] = {"out_of_memory": True, **shapes[name]}
            continue
        med = statistics.median(r["seconds"] for r in rs)
        tps = statistics.median(r["real"] / r["seconds"] for r in rs)
        mfu = statistics.median(r["flops"] / r["seconds"] / peak for r in rs)
        results[name] = {
            "real_tokens_per_s": round(tps, 1),
            "mfu": round(mfu, 4),
            "step_ms_median": round(med * 1000 / args.batches, 1),
            **shapes[name],
        }
        if device.type == "cuda":
            results[name]["peak_memory_mib"] = round(max(r["peak_mib"] for r in rs), 1)
    if device.type == "cpu" and not args.no_memory:
        argv_list = list(argv if argv is not None else sys.argv[1:])
        for name in results:
            results[name]["peak_memory_mib"] = cpu_memory(argv_list, name)
    out = {
        "benchmark": "train_step",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in vars(args).items() if k != "probe"},
        "model": {**SIZES[args.size], "parameters": params},
        "lengths": length_summary(make_batches(args, SIZES[args.size]["vocab_size"])),
        "peak_flops": peak,
        "peak_source": peak_source,
        "memory": ("cuda max_memory_allocated" if device.type == "cuda"
                   else "peak RSS growth, one step, fresh process"),
        "results": results,
    }
    if all(results.get(v, {}).get("real_tokens_per_s") for v in ("ours", "naive")):
        out["speedup_real_tokens_per_s"] = round(results["ours"]["real_tokens_per_s"]
                                                 / results["naive"]["real_tokens_per_s"], 2)
        mem_o, mem_n = results["ours"].get("peak_memory_mib"), results["naive"].get("peak_memory_mib")
        if mem_o and mem_n:
            out["memory_ratio"] = round(mem_o / mem_n, 3)
    return out


def main(argv=None) -> dict:
    out = report(argv)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
