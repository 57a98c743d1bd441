"""Load benchmark of ``diffusion-lm serve``: requests/s and p50/p95 latency against concurrency, with
dynamic batching and without it (``--max_batch_size 1``, one request per sampler call) in the same run.

Each server configuration runs as its own ``diffusion-lm serve`` process on a free loopback port;
this script is the client (asyncio + httpx, one connection per concurrent request). At every
concurrency level ``c`` it keeps ``c`` requests in flight until ``--requests`` have been answered
(English and Russian prompts in turn, seed = request number), and reads the server's ``/stats`` for
the batch sizes it formed::

    python tools/bench_serve.py --model runs/demo/last.ckpt
    python tools/bench_serve.py --model runs/demo/last.ckpt --concurrency 1 8 32 --requests 96 --stream
    python tools/bench_serve.py --scratch 512 8        # an untrained 512-wide, 8-layer model, fixed work

With ``--scratch HIDDEN LAYERS`` the server gets an untrained ModernBERT of that size (the demo
tokenizer) and EOS is suppressed, so every answer fills its whole canvas: a fixed amount of work per
request, for seeing where batching pays off as the forward pass grows.

Prints one JSON object: machine, settings, and per configuration and concurrency: requests/s,
latency p50/p95/max (seconds), answer tokens/s, mean batch size and the batch-size histogram.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import httpx

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Server:
    """``diffusion-lm serve`` in a subprocess, for the duration of a ``with`` block."""

    def __init__(self, args: argparse.Namespace, max_batch_size: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "diffusion_lm", "serve", "--model", args.model, "--port",
                    str(self.port), "--preset", args.preset, "--max_batch_size", str(max_batch_size),
                    "--max_wait_ms", str(args.max_wait_ms), "--max_queue", "100000", "--served_model_name",
                    "bench", "--device", args.device, "--log_level", "warning"]
        if args.sampler:
            self.cmd += ["--sampler", args.sampler]
        self.threads = args.threads
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        env = dict(os.environ)
        if self.threads:  # intra-op threads of the server's torch (read at its start)
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).json().get("status") == "ok":
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start: "
                                   f"{self.proc.stderr.read() if self.proc.stderr else ''}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats", timeout=10).json()


async def _one(client: httpx.AsyncClient, url: str, i: int, args: argparse.Namespace) -> tuple[float, int]:
    body = {"model": "bench", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "seed": i,
            "max_tokens": args.max_tokens, "stream": args.stream}
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    if args.stream:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            tokens = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    else:
        r = await client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        tokens = r.json()["usage"]["completion_tokens"]
    return time.perf_counter() - t0, tokens


async def _level(url: str, concurrency: int, n: int, args: argparse.Namespace) -> dict:
    results: list[tuple[float, int]] = []
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker() -> None:
            for i in counter:
                results.append(await _one(client, url, i, args))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"concurrency": concurrency, "requests": n, "seconds": round(wall, 3),
            "requests_per_second": round(n / wall, 2), "answer_tokens_per_second": round(tokens / wall, 1),
            "latency_p50": round(_percentile(latencies, 0.5), 3),
            "latency_p95": round(_percentile(latencies, 0.95), 3), "latency_max": round(max(latencies), 3),
            "mean_answer_tokens": round(tokens / n, 2)}


def _batch_delta(before: dict, after: dict) -> dict:
    sizes = {k: after["batch_sizes"].get(k, 0) - before["batch_sizes"].get(k,
                                                                           0) for k in after["batch_sizes"]}
    sizes = {k: v for k, v in sizes.items() if v}
    batches = sum(sizes.values())
    return {"batches": batches,
            "mean_batch_size": round(sum(int(k) * v for k, v in sizes.items()) / batches, 2)
            if batches else 0.0, "batch_sizes": dict(sorted(sizes.items(), key=lambda kv: int(kv[0])))}


def build_scratch(hidden: int, layers: int, folder: str) -> tuple[str, int]:
    """An untrained ModernBERT (demo tokenizer) exported to ``folder``; returns (folder, EOS id)."""
    from diffusion_lm import MaskedDiffusionLM
    from diffusion_lm.backbone import ScratchBackbone
    from diffusion_lm.export import export_model

    backbone = ScratchBackbone(model_type="modernbert", hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=max(1, hidden // 64), intermediate_size=2 * hidden,
                               max_position_embeddings=256)
    model = MaskedDiffusionLM(backbone, canvas_length=32, health_check=False)
    params = sum(p.numel() for p in model.parameters())
    print(f"scratch model: hidden {hidden}, {layers} layers, {params / 1e6:.1f} M parameters",
          file=sys.stderr)
    return str(export_model(model, folder, verify=False)), model.template.eos_id


def run(args: argparse.Namespace) -> dict:
    if args.scratch:
        with tempfile.TemporaryDirectory() as tmp:
            args.model, eos = build_scratch(*args.scratch, f"{tmp}/scratch")
            args.sampler = args.sampler or f"{{suppress_tokens: [{eos}]}}"
            return _run(args)
    if not args.model:
        raise SystemExit("give --model PATH or --scratch HIDDEN LAYERS")
    return _run(args)


def _run(args: argparse.Namespace) -> dict:
    configs = {"batched": args.max_batch_size, "unbatched": 1}
    if args.no_baseline:
        configs.pop("unbatched")
    out: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {"model": f"scratch {args.scratch[0]}x{args.scratch[1]} (untrained)" if args.scratch
                     else args.model, "preset": args.preset, "sampler": args.sampler,
                     "max_tokens": args.max_tokens, "stream": args.stream,
                     "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                     "requests_per_level": args.requests, "device": args.device,
                     "server_threads": args.threads},
        "results": {},
    }
    try:
        import torch

        out["machine"]["torch"] = torch.__version__
        out["machine"]["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    for name, max_batch in configs.items():
        rows = []
        with Server(args, max_batch) as server:
            asyncio.run(_level(server.url, 2, 4, args))  # warm-up: first-call allocations, tokenizer caches
            for c in args.concurrency:
                before = server.stats()
                row = asyncio.run(_level(server.url, c, max(args.requests, c), args))
                row.update(_batch_delta(before, server.stats()))
                rows.append(row)
                print(f"{name:9s} c={c:3d}: {row['requests_per_second']:7.2f} req/s, p50 "
                      f"{row['latency_p50']:.3f} s, p95 {row['latency_p95']:.3f} s, mean batch "
                      f"{row['mean_batch_size']}", file=sys.stderr)
        out["results"][name] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a .ckpt checkpoint or an export folder")
    parser.add_argument("--scratch", type=int, nargs=2, metavar=("HIDDEN", "LAYERS"),
                        help="serve an untrained model of this size instead (EOS suppressed: fixed work)")
    parser.add_argument("--sampler", help="the server's --sampler (inline YAML), on top of --preset")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--max_tokens", type=int, default=32, help="answer canvas per request")
    parser.add_argument("--preset", default="greedy", help="server default sampler preset")
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--max_wait_ms", type=float, default=10.0)
    parser.add_argument("--stream", action="store_true", help="stream every request (SSE)")
    parser.add_argument("--no_baseline", action="store_true", help="skip the max_batch_size=1 server")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int,
                        help="the server's torch threads (OMP_NUM_THREADS); default: torch's")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
