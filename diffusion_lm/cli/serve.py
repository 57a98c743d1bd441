"""``diffusion-lm serve``: load a model and serve it over HTTP (OpenAI-compatible API + web page); the
server itself is :mod:`diffusion_lm.serve`."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from typing import Optional

from ..errors import ConfigError
from ..loading import load_for_inference
from ..pipeline import build_sampler
from ..sampling.config import SamplerSpec
from ..serve.app import create_app, default_api_key

__all__ = ["serve_command"]

log = logging.getLogger("diffusion_lm.serve")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    preset: Optional[str] = None,
    sampler: SamplerSpec = None,
    canvas_length: Optional[int] = None,
    steps: Optional[int] = None,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    block_size: Optional[int] = None,
    threshold: Optional[float] = None,
    max_batch_size: int = 16,
    max_wait_ms: float = 10.0,
    max_queue: int = 256,
    api_key: Optional[str] = None,
    served_model_name: Optional[str] = None,
    device: Optional[str] = None,
    log_level: str = "info",
) -> None:
    """Serve a model over HTTP: an OpenAI-compatible API and a chat page.

    Endpoints: POST /v1/chat/completions (streaming too), GET /v1/models, POST /v1/infill, GET /health,
    GET /stats, and the chat page at /. Concurrent requests with the same sampler settings and
    max_tokens are decoded together (dynamic batching); each request keeps its own seed, so its
    answer does not depend on its batch. API reference: docs/serving.md.

    Args:
        model: a .ckpt checkpoint of `diffusion-lm fit` or a `diffusion-lm export` folder.
        host: address to bind (default loopback only; use 0.0.0.0 with --api_key to serve others).
        port: TCP port.
        preset: default sampler preset: quality (default), fast or greedy.
        sampler: default SamplerConfig as a YAML file or an inline mapping.
        canvas_length: answer slots when a request gives no max_tokens (default: the model's).
        steps: default forward passes per answer (schedule selector).
        temperature: default sampling temperature (0 = greedy).
        top_p: default nucleus sampling mass.
        top_k: default top-k.
        block_size: default semi-autoregressive block size.
        threshold: default confidence threshold selector.
        max_batch_size: most requests decoded together.
        max_wait_ms: how long the oldest queued request waits for others to join its batch.
        max_queue: most requests waiting; beyond it requests get HTTP 429 with Retry-After.
        api_key: require 'Authorization: Bearer KEY' on /v1/* and /stats (default: $DIFFUSION_LM_API_KEY, else
            none).
        served_model_name: the model id of the API (default: the --model path).
        device: cpu or cuda (default: cuda when available).
        log_level: uvicorn's and the server's log level (debug, info, warning, error).
    """
    import uvicorn

    for name, value, low in (("port", port, 0), ("max_batch_size", max_batch_size, 1),
                             ("max_queue", max_queue, 1)):
        if value < low:
            raise ConfigError(f"--{name} must be >= {low}, got {value}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {port}")
    if max_wait_ms < 0:
        raise ConfigError(f"--max_wait_ms must be >= 0, got {max_wait_ms}")
    level = str(log_level).lower()
    if level not in ("critical", "error", "warning", "info", "debug"):
        raise ConfigError(f"--log_level {log_level!r}: use debug, info, warning or error")
    defaults = {"preset": preset, "sampler": sampler, "steps": steps, "temperature": temperature,
                "top_p": top_p, "top_k": top_k, "block_size": block_size, "threshold": threshold}
    build_sampler(**defaults)  # bad sampler flags fail before the (slow) model load
    key = default_api_key(api_key)
    if not _is_loopback(host) and key is None:
        print(f"diffusion-lm serve: warning: binding {host} without an API key: anyone who can reach this "
              "port can use the model (set --api_key or DIFFUSION_LM_API_KEY)", file=sys.stderr)
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusion_lm.serve").setLevel(level.upper())
    lm = load_for_inference(model, device)
    app = create_app(lm, model_name=served_model_name or model, sampler=defaults, canvas_length=canvas_length,
                     max_batch_size=max_batch_size, max_wait=max_wait_ms / 1000.0, max_queue=max_queue,
                     api_key=key)
    print(f"diffusion-lm serve: {served_model_name or model} on http://{host}:{port}/ "
          f"(API: http://{host}:{port}/v1, pid {os.getpid()})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=level)
