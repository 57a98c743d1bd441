"""LoRA vs full fine-tuning: trainable parameters, optimizer state and peak memory of training steps.

Each mode runs in its own subprocess (so peak resident memory is per mode): it builds the same
ModernBERT-architecture model from a config (``MaskedDiffusionLM`` with a ``ScratchBackbone``),
runs ``--steps`` AdamW steps of the masked-diffusion loss on random answer tokens, and reports::

    python tools/bench_peft.py --hidden 512 --layers 8 --batch 8 --length 128 --steps 3

Prints one JSON object: per mode the trainable and total parameters, the bytes of gradients and
AdamW state, the peak resident memory of the process and its rise over the built model (CPU), or
the peak CUDA memory (``--device cuda``), and the median step time.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_mode(args) -> dict:
    from diffusion_lm import MaskedDiffusionLM
    from diffusion_lm.backbone import ScratchBackbone
    from diffusion_lm.objective import masked_diffusion_nelbo
    from diffusion_lm.schedules import LogLinearSchedule, stratified_times

    torch.manual_seed(0)
    spec = ScratchBackbone(model_type="modernbert", hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=max(args.hidden // 64, 1), intermediate_size=args.hidden * 2,
                           max_position_embeddings=max(args.length, 128))
    peft = {"r": args.rank, "alpha": 2.0 * args.rank, "dropout": 0.0, "train_head": False} \
        if args.mode == "lora" else None
    model = MaskedDiffusionLM(spec, peft=peft, health_check=False).to(args.device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    trainable, total = model.trainable_parameters()
    vocab = model.net.vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (args.batch, args.length), generator=gen).to(args.device)
    attn = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, args.length // 2:] = 1  # the second half is the answer
    built = _rss_mb()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        t = stratified_times(args.batch, generator=torch.Generator().manual_seed(step)).to(args.device)
        start = time.perf_counter()
        out = masked_diffusion_nelbo(model.net, ids, attn, loss_mask, t, LogLinearSchedule(), model.mask_id)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradients allocated: their memory counts
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                      if torch.is_tensor(v))
    out = {"trainable_params": trainable, "total_params": total,
           "trainable_share": round(trainable / total, 5),
           "grad_mib": round(grad_bytes / 2**20, 2), "adamw_state_mib": round(state_bytes / 2**20, 2),
           "median_step_ms": round(1000 * statistics.median(times), 1)}
    if args.device == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        peak = _rss_mb()
        out["peak_rss_mib"] = round(peak, 1)
        out["training_rss_rise_mib"] = round(peak - built, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # one subprocess's mode
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    report = {"config": {k: v for k, v in vars(args).items() if k != "mode"},
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(),
                          "cpu": platform.processor() or platform.machine()}}
    for mode in ("full", "lora"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        report[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    report["trainable_ratio_full_over_lora"] = round(report["full"]["trainable_params"]
                                                     / report["lora"]["trainable_params"], 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
