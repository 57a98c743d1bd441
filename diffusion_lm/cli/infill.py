"""``diffusion-lm infill``: fill ``[[MASK]]`` holes of a text; every token outside the holes stays.

The work is :func:`diffusion_lm.pipeline.infill_texts`; this module reads ``--text``/``--input`` and
writes the filled texts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError
from ..files import read_utf8
from ..pipeline import infill_texts, piece_decoder
from ..sampling.config import SamplerSpec, check_options
from ..sampling.trajectory import render_trajectory_html
from .common import load_with_sampler, open_output, summary_line

__all__ = ["infill_command"]


def _unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` escapes of a --text given on one shell line."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _read_infill_input(path: str) -> tuple[list[Any], list[str]]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--input {path!r}: no such file")
    if file.suffix.lower() != ".jsonl":
        text = read_utf8(file, path)
        if not text.strip():
            raise ConfigError(f"--input {path!r} is empty")
        return [0], [text]
    ids, texts = [], []
    for lineno, line in enumerate(read_utf8(file, path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} line {lineno}: not valid JSON ({err.msg} at column {err.colno})") \
                from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ConfigError(f"{path} line {lineno}: expected an object with a \"text\" string")
        ids.append(obj.get("id", len(texts)))
        texts.append(obj["text"])
    if not texts:
        raise ConfigError(f"--input {path!r} holds no texts "
                          '(one JSON object per line: {"text": "..."})')
    return ids, texts


def infill_command(
    model: str,
    text: Optional[str] = None,
    input: Optional[str] = None,
    output: Optional[str] = None,
    prompt: Optional[str] = None,
    preset: Optional[str] = None,
    sampler: SamplerSpec = None,
    steps: Optional[int] = None,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    block_size: Optional[int] = None,
    threshold: Optional[float] = None,
    guidance: Optional[float] = None,
    default_slots: int = 8,
    seed: Optional[int] = 0,
    batch_size: int = 8,
    trajectory: Optional[str] = None,
    device: Optional[str] = None,
) -> None:
    """Fill [[MASK]] holes inside a text; every token outside the holes stays as written.

    Holes: [[MASK]] (default_slots tokens) or [[MASK:n]] (exactly n tokens). Uses: fill-in-the-middle
    of code, bridging two paragraphs, re-generating a chosen span of an answer (with --prompt).
    Prints the filled text, or writes it to --output (a .jsonl output gets rows {id, text, filled,
    fills, stats}).

    Args:
        model: a .ckpt checkpoint of `diffusion-lm fit` or a `diffusion-lm export` folder.
        text: the text with holes; \\n and \\t escapes are expanded (use --input for files).
        input: a text file (its whole content is one text) or a .jsonl file of {"text": ..., "id"?} lines.
        output: file to write the filled text(s) to (.jsonl: one JSON row per text).
        prompt: treat the text as the assistant's answer to this user message (chat template).
        preset: sampler preset: quality (default), fast or greedy.
        sampler: a SamplerConfig as a YAML file or an inline mapping ('{preset: greedy, window: full}').
        steps: forward passes for all holes together (schedule selector).
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling mass (needs temperature > 0).
        top_k: sample among the k most likely tokens (needs temperature > 0).
        block_size: semi-autoregressive block size over the hole slots.
        threshold: confidence threshold selector.
        guidance: classifier-free guidance scale w (0 = none): logits + w * (logits - logits with
            the prompt masked), both in one batched forward per step.
        default_slots: slots of a bare [[MASK]].
        seed: base seed (null = random).
        batch_size: texts decoded together.
        trajectory: write an HTML page of the decoding steps to this file.
        device: cpu or cuda (default: cuda when available).
    """
    if text is not None and input is not None:
        raise ConfigError("give --text or --input, not both")
    if text is not None:
        ids, texts = [0], [_unescape(text)]
    elif input is not None:
        ids, texts = _read_infill_input(input)
    else:
        raise ConfigError('no text: give --text "... [[MASK:8]] ..." or --input FILE')
    check_options(batch_size=batch_size, default_slots=default_slots)
    lm, config = load_with_sampler(model, device, preset, sampler, steps=steps, temperature=temperature,
                                    top_p=top_p, top_k=top_k, block_size=block_size, threshold=threshold,
                                    guidance=guidance)
    outputs, result = infill_texts(lm, texts, sampler=config, ids=ids, prompt=prompt, seed=seed,
                                   batch_size=batch_size, default_slots=default_slots,
                                   return_trajectory=trajectory is not None)
    if trajectory is not None:
        render_trajectory_html(result.trajectories, piece_decoder(lm.tokenizer), trajectory,
                               titles=[str(o.id) for o in outputs], hide_ids=[lm.template.pad_id])
    summary = summary_line(f"filled {len(outputs)} text(s)", result)
    if output is not None:
        with open_output(output) as handle:
            if output.lower().endswith(".jsonl"):
                for o in outputs:
                    handle.write(json.dumps(o.to_json(), ensure_ascii=False) + "\n")
            else:
                handle.write("\n\n".join(o.filled for o in outputs))
        print(f"wrote {output}: {summary}", file=sys.stderr)
    else:
        for o in outputs:
            if len(outputs) > 1:
                print(f"--- {o.id}")
            print(o.filled)
        print(summary, file=sys.stderr)
