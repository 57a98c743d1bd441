"""Training-step benchmark: logits only at masked positions (ours) vs full-vocabulary logits (naive).

The naive baseline is what dLLM and MDLM do: run the LM head at every position, then take the
cross-entropy at the masked ones. Both variants run in the same process on the same batches::

    python tools/bench_train.py --vocab 256000 --hidden 256 --layers 4 --batch 8 --length 256
    python tools/bench_train.py --device cuda --precision bf16 --vocab 256000 --hidden 768 --layers 22

Prints one JSON object: median step time, answer tokens per second and the size of the logits
tensor each variant materialises (plus peak GPU memory on CUDA).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from diffusion_lm.backbone import SparseHeadDenoiser
from diffusion_lm.objective import masked_diffusion_nelbo
from diffusion_lm.schedules import LogLinearSchedule, stratified_times


def build(args):
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.for_model(
        "modernbert",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        intermediate_size=args.hidden * 2,
        max_position_embeddings=max(args.length, 128),
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    return AutoModelForMaskedLM.from_config(config)


def naive_loss(model, ids, attn, loss_mask, t, schedule, mask_id, gen):
    """dLLM/MDLM style: [B, L, V] logits, then CE at the masked positions."""
    u = torch.rand(ids.shape, generator=gen, device=ids.device)
    masked = (u < schedule.mask_probability(t)[:, None]) & loss_mask
    noised = torch.where(masked, torch.full_like(ids, mask_id), ids)
    logits = model(input_ids=noised, attention_mask=attn).logits.float()
    nll = F.cross_entropy(logits[masked], ids[masked], reduction="none")
    w = schedule.weight(t)[masked.nonzero(as_tuple=True)[0]]
    return (w * nll).sum() / loss_mask.sum(), logits.numel() * 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=256000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--answer-frac", type=float, default=0.5, help="share of each row that is the answer")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args).to(device)
    mask_id = args.vocab - 1
    net = SparseHeadDenoiser(model, mask_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = LogLinearSchedule()
    ids = torch.randint(1, args.vocab - 1, (args.batch, args.length), device=device)
    attn = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, int(args.length * (1 - args.answer_frac)) :] = True
    answer_tokens = int(loss_mask.sum())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(variant: str) -> dict:
        times, logits_bytes = [], 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for step in range(args.warmup + args.steps):
            gen = torch.Generator(device=device).manual_seed(step)
            t = stratified_times(args.batch, generator=torch.Generator().manual_seed(step), device=device)
            sync()
            start = time.perf_counter()
            with autocast:
                if variant == "ours":
                    out = masked_diffusion_nelbo(net, ids, attn, loss_mask, t, schedule, mask_id,
                                                 generator=gen)
                    loss, logits_bytes = out.loss, out.num_masked * args.vocab * 4
                else:
                    loss, logits_bytes = naive_loss(model, ids, attn, loss_mask, t, schedule, mask_id, gen)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        med = statistics.median(times)
        result = {
            "step_ms_median": round(med * 1000, 2),
            "answer_tokens_per_s": round(answer_tokens / med, 1),
            "logits_mib_per_step": round(logits_bytes / 2**20, 1),
        }
        if device.type == "cuda":
            result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return result

    ours, naive = run("ours"), run("naive")
    print(
        json.dumps(
            {
                "benchmark": "train_step",
                "config": vars(args),
                "device": (torch.cuda.get_device_name() if device.type == "cuda"
                           else platform.processor() or "cpu"),
                "threads": torch.get_num_threads(),
                "ours_gathered_head": ours,
                "naive_full_logits": naive,
                "speedup": round(naive["step_ms_median"] / ours["step_ms_median"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
