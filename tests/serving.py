"""Helpers of the server tests: an echo model on the real demo tokenizer, and a uvicorn server on a
free loopback port in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace
from typing import Optional

import torch
import uvicorn

from diffusion_lm.data import ChatTemplate
from diffusion_lm.module import TextGeneration


class EchoLM(TextGeneration):
    """Stands in for a loaded ``MaskedDiffusionLM``: the real chat template and tokenizer, and a
    denoiser whose answer is the last user message, echoed, then EOS (``generate`` is the model's own,
    :class:`~diffusion_lm.module.TextGeneration`).

    Logits are exact small numbers computed row by row (target 8, one fixed alternative token 7,
    everything else -20, slightly less confident further right), so answers cannot depend on batch
    neighbours or float rounding, and sampling at temperature > 0 still depends on the seed.
    ``delay`` seconds per forward stand in for a real model's compute.
    """

    def __init__(self, template: ChatTemplate, *, max_length: int = 128, canvas_length: int = 16,
                 delay: float = 0.0) -> None:
        self.template = template
        self.tokenizer = template.tokenizer
        self.max_length = max_length
        self.hparams = SimpleNamespace(canvas_length=canvas_length)
        self.diffusion_config = None
        self.delay = delay
        self.batch_sizes: list[int] = []
        self.alternative = template.encode_text("la")[-1]
        self._user = template.header_ids("user")
        self._answer_head = [template.eos_id] + template.header_ids("assistant")

    def _layout(self, row: list[int]) -> tuple[int, list[int]]:
        """(canvas start, the last user message's ids) of a row built by ``prompt_ids``; an infill row
        (no assistant header) is (0, []): every hole slot gets the alternative token."""
        head = self._answer_head
        starts = [i + len(head) for i in range(len(row) - len(head) + 1) if row[i:i + len(head)] == head]
        if not starts:
            return 0, []
        start = max(starts)
        end = start - len(head)
        user = max(i + len(self._user) for i in range(end) if row[i:i + len(self._user)] == self._user)
        return start, row[user:end]

    def denoise(self, ids: torch.Tensor, attention_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        self.batch_sizes.append(int(ids.shape[0]))
        tpl = self.template
        vocab = len(self.tokenizer)
        out = []
        for r in range(ids.shape[0]):
            row = ids[r][attention_mask[r].bool()].tolist()
            start, user = self._layout(row)
            for p in query[r].nonzero().flatten().tolist():
                k = p - start
                logits = torch.full((vocab,), -20.0)
                if not user:  # infill
                    target = self.alternative
                else:
                    target = user[k] if k < len(user) else (tpl.eos_id if k == len(user) else tpl.pad_id)
                logits[target] = 8.0 - 0.01 * k
                if k < len(user) and target != self.alternative:
                    logits[self.alternative] = 7.0 - 0.01 * k
                logits[tpl.mask_id] = float("-inf")
                out.append(logits)
        return torch.stack(out) if out else torch.zeros((0, vocab))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """``with ServerThread(app) as url:`` serves ``app`` on a free loopback port until the block ends."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(30)
        self.sock.close()
