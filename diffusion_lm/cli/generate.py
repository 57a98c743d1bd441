"""``diffusion-lm generate``: answer prompts from flags or a JSONL file; print them or write JSONL rows.

The command's typed signature is its command line (jsonargparse ``auto_cli``; the docstring becomes
``--help``); the work is :func:`diffusion_lm.pipeline.answer_prompts`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..chat import Turn
from ..errors import ConfigError
from ..files import read_utf8
from ..pipeline import PromptRecord, answer_prompts, piece_decoder, turns_from_messages
from ..sampling.config import SamplerSpec, check_options
from ..sampling.trajectory import render_trajectory_html
from .common import load_with_sampler, open_output, summary_line

__all__ = ["generate_command", "read_prompt_file"]


def read_prompt_file(path: str) -> list[PromptRecord]:
    """Read ``--input``: JSONL, one object per line with ``"prompt"`` (a user message) or
    ``"messages"`` (a conversation ending with a user message), optional ``"id"`` and ``"language"``.
    Blank lines are skipped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--input {path!r}: no such file")
    records: list[PromptRecord] = []
    text = read_utf8(file, path)
    for lineno, line in enumerate(text.split("\n"), start=1):  # JSON Lines: only \n ends a line
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: expected an object with \"prompt\" or \"messages\"")
        if "messages" in obj:
            turns = turns_from_messages(obj["messages"], where)
        elif "prompt" in obj:
            if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
                raise ConfigError(f"{where}: \"prompt\" is empty or not a string")
            turns = [Turn("user", obj["prompt"])]
        else:
            raise ConfigError(f"{where}: needs a \"prompt\" string or a \"messages\" list (keys: "
                              f"{sorted(obj)})")
        language = obj.get("language")
        records.append(PromptRecord(obj.get("id", len(records)), turns, turns[-1].content,
                                    str(language) if language is not None else None))
    if not records:
        raise ConfigError(f"--input {path!r} holds no prompts (one JSON object per line: "
                          f"{{\"prompt\": \"...\"}})")
    return records


def _records(prompt: Optional[Sequence[str]], input: Optional[str],
             system: Optional[str] = None) -> list[PromptRecord]:
    records: list[PromptRecord] = []
    for k, text in enumerate(prompt or []):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"--prompt number {k + 1} is empty")
        records.append(PromptRecord(k, [Turn("user", text)], text))
    if input is not None:
        file_records = read_prompt_file(input)
        if records:  # ids stay unique when both are given
            for r in file_records:
                if isinstance(r.id, int):
                    r.id += len(records)
        records += file_records
    if not records:
        raise ConfigError("no prompts: give --prompt TEXT (repeatable) or --input prompts.jsonl")
    if system:
        for r in records:
            if r.turns[0].role != "system":
                r.turns = [Turn("system", system)] + list(r.turns)
    return records


def generate_command(
    model: str,
    prompt: Optional[list[str]] = None,
    input: Optional[str] = None,
    output: Optional[str] = None,
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
    system: Optional[str] = None,
    seed: Optional[int] = 0,
    batch_size: int = 8,
    trajectory: Optional[str] = None,
    device: Optional[str] = None,
) -> None:
    """Answer prompts with a trained masked-diffusion model.

    Prompts come from --prompt (repeatable) and/or --input (JSONL: {"prompt": "..."} or
    {"messages": [{"role": "user", "content": "..."}, ...]} per line, optional "id" and "language").
    With --output, writes JSONL rows {id, prompt, answer, language?, stats: {nfe, tokens,
    tokens_per_forward, seconds}}; otherwise prints the answers.

    Sampler: --preset, then --sampler on top of it, then the individual flags on top of both.

    Args:
        model: a .ckpt checkpoint of `diffusion-lm fit` or a `diffusion-lm export` folder.
        prompt: a user message to answer (repeat the flag for several).
        input: JSONL file of prompts.
        output: JSONL file to write the answers to (default: print them).
        preset: sampler preset: quality (default), fast or greedy.
        sampler: a SamplerConfig as a YAML file (configs/sampler/fast.yaml) or an inline mapping
            ('{preset: fast, window: full}').
        canvas_length: answer slots per prompt (default: the model's canvas_length).
        steps: forward passes for the whole canvas (schedule selector; default one token per forward).
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling mass (needs temperature > 0).
        top_k: sample among the k most likely tokens (needs temperature > 0).
        block_size: semi-autoregressive block size (answer slots decided per block).
        threshold: confidence threshold selector (commit every slot with p >= threshold, at least one).
        guidance: classifier-free guidance scale w (0 = none): logits + w * (logits - logits with
            the prompt masked), both in one batched forward per step.
        system: a system message put before every prompt.
        seed: base seed (row i of the input draws from its own stream; null = random).
        batch_size: prompts decoded together.
        trajectory: write an HTML page of the decoding steps of every prompt to this file.
        device: cpu or cuda (default: cuda when available).
    """
    check_options(canvas_length=canvas_length, batch_size=batch_size)
    records = _records(prompt, input, system)
    lm, config = load_with_sampler(model, device, preset, sampler, steps=steps, temperature=temperature,
                                    top_p=top_p, top_k=top_k, block_size=block_size, threshold=threshold,
                                    guidance=guidance)
    rows, result = answer_prompts(lm, records, sampler=config, canvas_length=canvas_length, seed=seed,
                                  batch_size=batch_size, return_trajectory=trajectory is not None)
    if trajectory is not None:
        render_trajectory_html(result.trajectories, piece_decoder(lm.tokenizer), trajectory,
                               titles=[r.prompt for r in records], hide_ids=[lm.template.pad_id])
    summary = summary_line(f"{len(rows)} answer(s)", result)
    if output is not None:
        with open_output(output) as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {output}: {summary}", file=sys.stderr)
    else:
        for row in rows:
            s = row["stats"]
            print(f">>> {row['prompt']}")
            print(row["answer"])
            print(f"    [nfe {s['nfe']}, {s['tokens']} tokens, {s['tokens_per_forward']:.2f} tokens/forward, "
                  f"{s['seconds']:.2f} s]\n")
        print(summary, file=sys.stderr)
    if trajectory is not None:
        print(f"trajectory: {trajectory}", file=sys.stderr)
