"""``diffusion-lm chat``: a conversation on stdin, one answer per line on stdout.

The work is :class:`diffusion_lm.pipeline.ChatSession`; this module reads the lines, handles
``/reset`` and ``/quit`` and appends the transcript.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator, Optional, TextIO

from ..errors import ConfigError
from ..files import append_line
from ..pipeline import ChatSession
from ..sampling.config import SamplerSpec, check_options
from .common import load_with_sampler

__all__ = ["chat_command"]


def open_transcript(path: str):
    """``--transcript``: appended to, one durable line per turn."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.open("a", encoding="utf-8")


def _input_lines(stream: TextIO, interactive: bool) -> Iterator[str]:
    """The user's messages; a line that is not UTF-8 is reported in one line and skipped."""
    if interactive:
        while True:
            try:
                yield input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return
            except UnicodeDecodeError as err:
                print(f"diffusion-lm: error: that message is not valid UTF-8 (byte {err.start}); not sent",
                      file=sys.stderr)
        return
    raw_stream = getattr(stream, "buffer", None)
    if raw_stream is None:  # already decoded text (an io.StringIO)
        for line in stream:
            yield line.rstrip("\r\n")
        return
    offset = 0
    for lineno, raw in enumerate(raw_stream, start=1):
        start, offset = offset, offset + len(raw)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            print(f"diffusion-lm: error: stdin line {lineno} is not valid UTF-8 (byte offset "
                  f"{start + err.start}); skipped", file=sys.stderr)
            continue
        yield line.rstrip("\r\n")


def chat_command(
    model: str,
    system: Optional[str] = None,
    preset: Optional[str] = None,
    sampler: SamplerSpec = None,
    canvas_length: Optional[int] = None,
    steps: Optional[int] = None,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    block_size: Optional[int] = None,
    threshold: Optional[float] = None,
    guidance: Optional[float] = None,
    seed: Optional[int] = 0,
    transcript: Optional[str] = None,
    device: Optional[str] = None,
) -> None:
    """Chat with a model: each line read from stdin is a user message; the conversation so far is
    the context of every answer (the oldest exchanges are dropped when it no longer fits).

    Commands: /reset (start a new conversation), /quit (or end of input). Works with piped stdin:
    `printf 'Hello\\nAnd you?\\n' | diffusion-lm chat --model run/checkpoints/last.ckpt` prints one answer per
    line.

    Args:
        model: a .ckpt checkpoint of `diffusion-lm fit` or a `diffusion-lm export` folder.
        system: a system message at the start of the conversation.
        preset: sampler preset: quality (default), fast or greedy.
        sampler: a SamplerConfig as a YAML file or an inline mapping.
        canvas_length: answer slots per turn (default: the model's canvas_length).
        steps: forward passes per answer (schedule selector).
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling mass (needs temperature > 0).
        top_k: sample among the k most likely tokens (needs temperature > 0).
        block_size: semi-autoregressive block size.
        threshold: confidence threshold selector.
        guidance: classifier-free guidance scale w (0 = none): logits + w * (logits - logits with
            the prompt masked), both in one batched forward per step.
        seed: base seed; turn k uses seed + k (null = random).
        transcript: append one JSON row per turn ({turn, messages, answer, dropped, stats}) to this file.
        device: cpu or cuda (default: cuda when available).
    """
    check_options(canvas_length=canvas_length)
    lm, config = load_with_sampler(model, device, preset, sampler, steps=steps, temperature=temperature,
                                    top_p=top_p, top_k=top_k, block_size=block_size, threshold=threshold,
                                    guidance=guidance)
    session = ChatSession(lm, config, canvas_length=canvas_length, seed=seed, system=system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message; /reset starts over, /quit exits", file=sys.stderr)
    log = open_transcript(transcript) if transcript else None
    turn = 0
    try:
        for line in _input_lines(sys.stdin, interactive):
            message = line.strip()
            if not message:
                continue
            if message.startswith("/"):
                command = message.split()[0].lower()
                if command in ("/quit", "/exit"):
                    break
                if command == "/reset":
                    session.reset()
                    print("(conversation reset)", file=sys.stderr)
                    continue
                print(f"unknown command {command}; commands: /reset, /quit", file=sys.stderr)
                continue
            try:
                reply = session.ask(message)
            except ConfigError as err:  # a message too long for the model: say so, keep chatting
                print(f"diffusion-lm: error: {err}", file=sys.stderr)
                continue
            turn += 1
            if reply.dropped:
                print(f"(dropped the {reply.dropped} oldest exchange(s) to fit the model)", file=sys.stderr)
            print(f"bot> {reply.answer}" if interactive else reply.answer, flush=True)
            if log is not None:
                row = {"turn": turn,
                       "messages": [{"role": t.role, "content": t.content} for t in reply.context],
                       "answer": reply.answer, "dropped": reply.dropped, "stats": reply.stats}
                append_line(log, json.dumps(row, ensure_ascii=False))
    finally:
        if log is not None:
            log.close()
