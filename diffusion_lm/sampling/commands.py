"""The ``diffusion-lm generate | infill | chat`` commands.

Each ``*_command`` function's typed signature is its command line (jsonargparse ``auto_cli``; the
docstrings become ``--help``). The work is done by plain functions that tests and scripts can call
without the CLI: :func:`build_sampler` (preset + YAML + flags -> :class:`SamplerConfig`),
:func:`answer_prompts`, :func:`infill_texts` and :class:`ChatSession`.

Input problems raise :class:`~diffusion_lm.errors.ConfigError`, which the CLI prints as one line
(exit code 2): missing model path, empty input, a prompt longer than the model's limit (naming the
prompt and the lengths), zero/negative lengths or steps, unknown preset or policy names, span syntax
errors.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, TextIO, Union

from ..errors import ConfigError
from ..files import append_line, atomic_write
from .config import PRESETS, SamplerConfig
from .policies import BlockWindow, GreedyProposer, SampleProposer, ScheduleSelector, ThresholdSelector

__all__ = [
    "ChatSession",
    "InfillOutput",
    "PromptRecord",
    "answer_prompts",
    "build_sampler",
    "chat_command",
    "generate_command",
    "infill_command",
    "infill_texts",
    "load_for_inference",
    "load_sampler_spec",
    "read_prompt_file",
]

SamplerSpec = Union[str, dict, None]


# ----------------------------------------------------------------------------------- model loading
def _resolve_device(device: Optional[str]) -> str:
    import torch

    if device is None or str(device).strip().lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device {device!r} is not a torch device ({err}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return str(dev)


def load_for_inference(path: str, device: Optional[str] = None):
    """Load a ``.ckpt`` checkpoint or an export folder in eval mode on ``device`` (default: cuda if
    available, else cpu); a missing or unreadable path is a :class:`ConfigError`."""
    from ..module import load_model

    if not path:
        raise ConfigError("--model is required: a .ckpt checkpoint of `diffusion-lm fit` or a `diffusion-lm export` folder")
    if not os.path.exists(path):
        raise ConfigError(f"--model {path!r}: no such checkpoint file or export folder")
    dev = _resolve_device(device)
    try:
        model = load_model(path, map_location=dev)
    except ConfigError:
        raise
    except Exception as err:  # a file that is not a checkpoint, a truncated download, ...
        raise ConfigError(f"--model {path!r} could not be loaded as a checkpoint or export folder: "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    return model.to(dev).eval()


# ------------------------------------------------------------------------------------- the sampler
def load_sampler_spec(spec: Union[SamplerSpec, SamplerConfig]) -> Union[None, str, dict, SamplerConfig]:
    """``--sampler``: a YAML/JSON file, an inline YAML mapping (``{preset: fast, window: full}``), a
    preset name, a mapping, or a :class:`SamplerConfig`; returned as a name, mapping or config."""
    if spec is None or isinstance(spec, (SamplerConfig, dict)):
        return spec
    if isinstance(spec, Mapping):
        return dict(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"--sampler must be a YAML file, an inline mapping or a preset name, got {type(spec).__name__}")
    import yaml

    text = spec.strip()
    if not text:
        raise ConfigError("--sampler is empty; give a YAML file (configs/sampler/fast.yaml) or a preset name")
    path = Path(text).expanduser()
    if path.is_file():
        try:
            data = yaml.safe_load(_read_utf8(path, f"--sampler {text}"))
        except yaml.YAMLError as err:
            raise ConfigError(f"--sampler {text}: not valid YAML ({str(err).splitlines()[0]})") from None
        where = text
    elif text.endswith((".yaml", ".yml", ".json")) or os.sep in text:
        raise ConfigError(f"--sampler {text!r}: no such file")
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--sampler {text!r}: neither a file nor valid inline YAML ({str(err).splitlines()[0]})") from None
        where = "--sampler"
    if data is None:
        raise ConfigError(f"{where}: empty sampler config")
    if not isinstance(data, (str, dict)):
        raise ConfigError(f"{where}: a sampler config must be a mapping of SamplerConfig fields (or a preset name), "
                          f"got {type(data).__name__}")
    return data


def _preset(name: str, model=None) -> SamplerConfig:
    """A preset by name: the export folder's stored copy when the model has one, else the built-in."""
    key = str(name).strip().lower()
    stored = ((getattr(model, "diffusion_config", None) or {}).get("sampler") or {}).get("presets") or {}
    if key in stored and key in PRESETS:
        return SamplerConfig.from_dict(stored[key])
    return SamplerConfig.preset(key)


def build_sampler(
    preset: Optional[str] = None,
    sampler: Union[SamplerSpec, SamplerConfig] = None,
    *,
    steps: Optional[int] = None,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    block_size: Optional[int] = None,
    threshold: Optional[float] = None,
    model=None,
) -> SamplerConfig:
    """The sampler of a command: ``preset`` (default ``quality``, or the export's default), then the
    ``sampler`` file/mapping on top of it, then the individual flags on top of both.

    * ``steps``: the schedule selector with that many forward passes for the canvas;
    * ``threshold``: the threshold selector (Fast-dLLM) at that confidence;
    * ``temperature`` / ``top_p`` / ``top_k``: the sampling proposer (``temperature=0``: greedy);
    * ``block_size``: semi-autoregressive blocks of that size.
    """
    _check_flags(steps=steps, temperature=temperature, top_p=top_p, top_k=top_k, block_size=block_size,
                 threshold=threshold)
    spec = load_sampler_spec(sampler)
    if isinstance(spec, SamplerConfig):
        if preset is not None:
            raise ConfigError("give either --preset or a SamplerConfig, not both")
        config = spec
    else:
        if isinstance(spec, str):  # a bare preset name
            spec = {"preset": spec}
        spec = dict(spec or {})
        inner = spec.pop("preset", None)
        if preset is not None and inner is not None and str(preset).strip().lower() != str(inner).strip().lower():
            raise ConfigError(f"--preset {preset} and the --sampler config's preset {inner!r} disagree; give one")
        name = preset or inner
        if name is None:
            default = ((getattr(model, "diffusion_config", None) or {}).get("sampler") or {}).get("default_preset")
            name = default if default in PRESETS else "quality"
        config = _preset(name, model)
        if spec:
            unknown = set(spec) - set(config.to_dict())
            if unknown:
                raise ConfigError(f"unknown sampler field(s) {sorted(unknown)}; valid: {sorted(config.to_dict())}")
            config = config.replace(**spec)

    changes: dict[str, Any] = {}
    if steps is not None and threshold is not None:
        raise ConfigError("--steps (fixed number of forwards) and --threshold (confidence threshold) choose "
                          "different selectors; give one of them")
    if steps is not None:
        schedule = getattr(config.selector, "schedule", None)
        changes["selector"] = ScheduleSelector(steps=steps, schedule=schedule)
    if threshold is not None:
        changes["selector"] = ThresholdSelector(threshold)
    if block_size is not None:
        changes["window"] = BlockWindow(block_size)
    if temperature is not None or top_p is not None or top_k is not None:
        current = config.proposer
        if isinstance(current, SampleProposer):
            base = {"temperature": current.temperature, "top_k": current.top_k, "top_p": current.top_p,
                    "max_candidates": current.max_candidates}
        elif temperature is None:
            raise ConfigError("--top_p/--top_k only apply when sampling, and this sampler's proposer is greedy; "
                              "add --temperature T (e.g. 0.7)")
        else:
            base = {"temperature": 1.0, "top_k": None, "top_p": 1.0, "max_candidates": 1024}
        if temperature is not None:
            base["temperature"] = temperature
        if top_p is not None:
            base["top_p"] = top_p
        if top_k is not None:
            base["top_k"] = top_k
        if base["temperature"] == 0 and base["top_k"] is None and base["top_p"] == 1.0:
            changes["proposer"] = GreedyProposer()
        else:
            changes["proposer"] = SampleProposer(**base)
    return config.replace(**changes) if changes else config


def _load_with_sampler(model: str, device: Optional[str], preset: Optional[str], sampler: SamplerSpec, **flags: Any):
    """The model and the command's sampler; the sampler options are checked before the (slow) load."""
    config = build_sampler(preset, sampler, **flags)
    lm = load_for_inference(model, device)
    if getattr(lm, "diffusion_config", None):  # an export folder: its stored presets and default preset
        config = build_sampler(preset, sampler, model=lm, **flags)
    return lm, config


def _check_flags(**flags: Any) -> None:
    rules = {
        "steps": (lambda v: v >= 1, "must be >= 1 (forward passes for the whole canvas)"),
        "canvas_length": (lambda v: v >= 1, "must be >= 1 (answer slots per prompt)"),
        "block_size": (lambda v: v >= 1, "must be >= 1"),
        "batch_size": (lambda v: v >= 1, "must be >= 1"),
        "top_k": (lambda v: v >= 1, "must be >= 1"),
        "temperature": (lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
        "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
        "threshold": (lambda v: v > 0, "must be > 0 (e.g. 0.9; above 1 commits one token per forward)"),
        "default_slots": (lambda v: v >= 1, "must be >= 1"),
    }
    for name, value in flags.items():
        if value is None:
            continue
        ok, what = rules[name]
        if not ok(value):
            raise ConfigError(f"--{name} {what}, got {value}")


# -------------------------------------------------------------------------------------- prompts I/O
@dataclass
class PromptRecord:
    """One prompt to answer: its ``id``, the conversation ``turns`` (ending with a user turn), the
    ``prompt`` text shown in outputs (the last user message) and an optional ``language``."""

    id: Any
    turns: list
    prompt: str
    language: Optional[str] = None


def _turns_from_messages(messages: Any, where: str) -> list:
    from ..chat import ROLES, Turn

    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: \"messages\" must be a non-empty list of {{role, content}} objects")
    turns = []
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ConfigError(f"{where}: message {k} is not an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConfigError(f"{where}: message {k} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ConfigError(f"{where}: message {k} ({role}) has no text content")
        turns.append(Turn(role, content))
    if turns[-1].role != "user":
        raise ConfigError(f"{where}: the last message must be the user's (the one to answer), got {turns[-1].role!r}")
    return turns


def read_prompt_file(path: str) -> list[PromptRecord]:
    """Read ``--input``: JSONL, one object per line with ``"prompt"`` (a user message) or
    ``"messages"`` (a conversation ending with a user message), optional ``"id"`` and ``"language"``.
    Blank lines are skipped."""
    from ..chat import Turn

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--input {path!r}: no such file")
    records: list[PromptRecord] = []
    text = _read_utf8(file, path)
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
            turns = _turns_from_messages(obj["messages"], where)
        elif "prompt" in obj:
            if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
                raise ConfigError(f"{where}: \"prompt\" is empty or not a string")
            turns = [Turn("user", obj["prompt"])]
        else:
            raise ConfigError(f"{where}: needs a \"prompt\" string or a \"messages\" list (keys: {sorted(obj)})")
        language = obj.get("language")
        records.append(PromptRecord(obj.get("id", len(records)), turns, turns[-1].content,
                                    str(language) if language is not None else None))
    if not records:
        raise ConfigError(f"--input {path!r} holds no prompts (one JSON object per line: {{\"prompt\": \"...\"}})")
    return records


def _records(prompt: Optional[Sequence[str]], input: Optional[str], system: Optional[str] = None) -> list[PromptRecord]:
    from ..chat import Turn

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


def _describe(record: PromptRecord, index: int) -> str:
    snippet = record.prompt if len(record.prompt) <= 40 else record.prompt[:37] + "..."
    label = f"prompt {index + 1}" + (f" (id {record.id!r})" if record.id != index else "")
    return f"{label} {snippet!r}"


def _check_lengths(model, records: Sequence[PromptRecord], prompt_ids: Sequence[Sequence[int]], canvas_length: int) -> None:
    limit = model.max_length
    if canvas_length >= limit:
        raise ConfigError(f"--canvas_length {canvas_length} leaves no room for a prompt: the model takes {limit} "
                          f"positions in all; lower --canvas_length")
    for i, (record, ids) in enumerate(zip(records, prompt_ids)):
        if len(ids) + canvas_length > limit:
            fix = f"shorten the prompt to at most {limit - canvas_length} tokens"
            if len(ids) < limit:
                fix += f" or lower --canvas_length to at most {limit - len(ids)}"
            raise ConfigError(
                f"{_describe(record, i)} is {len(ids)} tokens; with --canvas_length {canvas_length} that is "
                f"{len(ids) + canvas_length} > the model's limit of {limit} positions: {fix}"
            )


def _piece_decoder(tokenizer):
    """``[id] -> text`` for the trajectory views, keeping word-start spaces of SentencePiece/WordPiece vocabularies."""

    def piece(ids: Sequence[int]) -> str:
        text = tokenizer.decode(list(ids))
        token = tokenizer.convert_ids_to_tokens(int(ids[0])) or ""
        if token.startswith("##"):
            return token[2:]
        if token.startswith("▁") and not text.startswith(" "):
            return " " + text
        return text

    return piece


def _summary(what: str, result) -> str:
    st = result.stats
    per_row = st.tokens / st.row_forwards if st.row_forwards else 0.0
    return (f"{what} in {st.seconds:.2f} s: {st.nfe} batched forward passes, {per_row:.2f} tokens per forward "
            f"per row, seed {result.seed}")


def _row_stats(stats) -> dict:
    return {"nfe": stats.nfe, "tokens": stats.tokens, "tokens_per_forward": round(stats.tokens_per_forward, 4),
            "seconds": round(stats.seconds, 4)}


def _open_output(path: str):
    """``--output``: written whole or not at all (a failed run leaves the previous file untouched)."""
    return atomic_write(Path(path).expanduser())


def _open_transcript(path: str):
    """``--transcript``: appended to, one durable line per turn."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.open("a", encoding="utf-8")


def _not_utf8(where: str, raw: bytes, err: UnicodeDecodeError, offset: int = 0) -> ConfigError:
    line = raw[: err.start].count(b"\n") + 1
    return ConfigError(f"{where} line {line}: not valid UTF-8 (byte offset {offset + err.start}); "
                       "save the file as UTF-8")


def _read_utf8(path: Path, where: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(where, raw, err) from None


# ------------------------------------------------------------------------------------------ generate
def answer_prompts(
    model,
    records: Sequence[PromptRecord],
    *,
    sampler: SamplerConfig,
    canvas_length: Optional[int] = None,
    seed: Optional[int] = 0,
    batch_size: int = 8,
    return_trajectory: bool = False,
):
    """Answer ``records`` with ``model``; returns ``(rows, result)``: one output row per record
    (``{id, prompt, answer, language?, stats}``) and the sampler's :class:`GenerationResult`.

    Rows are decoded in batches of ``batch_size``; per-row seeds make results independent of it up to
    the float rounding of the model's batched kernels (see ``docs/sampling.md``)."""
    from .loop import generate

    canvas = canvas_length if canvas_length is not None else int(model.hparams.canvas_length)
    _check_flags(canvas_length=canvas, batch_size=batch_size)
    prompt_ids = [model.template.prompt_ids(r.turns) for r in records]
    _check_lengths(model, records, prompt_ids, canvas)
    tpl = model.template
    result = generate(
        model.denoise, prompt_ids, mask_id=tpl.mask_id, eos_id=tpl.eos_id, pad_id=tpl.pad_id,
        canvas_length=canvas, sampler=sampler, seed=seed, return_trajectory=return_trajectory,
        max_batch_size=batch_size, max_length=model.max_length,
    )
    result.texts = [tpl.decode_answer(ids) for ids in result.ids]
    rows = []
    for record, text, stats in zip(records, result.texts, result.row_stats):
        row: dict[str, Any] = {"id": record.id, "prompt": record.prompt, "answer": text}
        if record.language is not None:
            row["language"] = record.language
        row["stats"] = _row_stats(stats)
        rows.append(row)
    return rows, result


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
        system: a system message put before every prompt.
        seed: base seed (row i of the input draws from its own stream; null = random).
        batch_size: prompts decoded together.
        trajectory: write an HTML page of the decoding steps of every prompt to this file.
        device: cpu or cuda (default: cuda when available).
    """
    _check_flags(canvas_length=canvas_length, batch_size=batch_size)
    records = _records(prompt, input, system)
    lm, config = _load_with_sampler(model, device, preset, sampler, steps=steps, temperature=temperature,
                                    top_p=top_p, top_k=top_k, block_size=block_size, threshold=threshold)
    rows, result = answer_prompts(lm, records, sampler=config, canvas_length=canvas_length, seed=seed,
                                  batch_size=batch_size, return_trajectory=trajectory is not None)
    if trajectory is not None:
        from .trajectory import render_trajectory_html

        render_trajectory_html(result.trajectories, _piece_decoder(lm.tokenizer), trajectory,
                               titles=[r.prompt for r in records], hide_ids=[lm.template.pad_id])
    summary = _summary(f"{len(rows)} answer(s)", result)
    if output is not None:
        with _open_output(output) as handle:
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


# -------------------------------------------------------------------------------------------- infill
@dataclass
class InfillOutput:
    """One filled text.

    Attributes:
        id: the record id.
        text: the input text with its ``[[MASK]]`` spans.
        filled: the text with every hole replaced by the model's fill; the text outside the holes is
            copied verbatim from ``text`` (not re-decoded), so it is untouched character for character.
        fills: the decoded fill of each hole, in order.
        input_ids / output_ids: the row before and after sampling (``[MASK]`` slots in ``input_ids``;
            every other id is equal in both).
        holes: per hole, the positions of its slots in the row.
        stats: ``{nfe, tokens, tokens_per_forward, seconds}``.
    """

    id: Any
    text: str
    filled: str
    fills: list[str]
    input_ids: list[int]
    output_ids: list[int]
    holes: list[list[int]]
    stats: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"id": self.id, "text": self.text, "filled": self.filled, "fills": self.fills, "stats": self.stats}


def _splice(pieces: list[tuple[str, Any]], fills: list[str]) -> str:
    out: list[str] = []
    k = 0
    for i, (kind, value) in enumerate(pieces):
        if kind == "text":
            out.append(str(value))
            continue
        fill = fills[k]
        k += 1
        before = pieces[i - 1][1] if i > 0 and pieces[i - 1][0] == "text" else ""
        after = pieces[i + 1][1] if i + 1 < len(pieces) and pieces[i + 1][0] == "text" else ""
        # The literal text owns the spacing around a hole: drop the fill's own edge spaces where the
        # neighbour already has one (a SentencePiece/BPE fill decodes with a leading space).
        if not before or str(before)[-1:].isspace():
            fill = fill.lstrip()
        if not after or str(after)[:1].isspace():
            fill = fill.rstrip()
        out.append(fill)
    return "".join(out)


def infill_texts(
    model,
    texts: Sequence[str],
    *,
    sampler: SamplerConfig,
    ids: Optional[Sequence[Any]] = None,
    prompt: Optional[str] = None,
    seed: Optional[int] = 0,
    batch_size: int = 8,
    default_slots: int = 8,
    return_trajectory: bool = False,
):
    """Fill the ``[[MASK]]`` / ``[[MASK:n]]`` holes of each text; returns ``(outputs, result)``.

    Without ``prompt`` a text is laid out as the encoder saw text in pretraining, ``[BOS] text [EOS]``;
    with ``prompt`` it is the assistant's answer to that user message (the chat template:
    ``prompt ids + text + [EOS]``), for re-generating part of an answer.
    """
    from ..chat import Turn
    from .loop import infill
    from .spans import parse_spans, spans_to_ids

    _check_flags(batch_size=batch_size, default_slots=default_slots)
    if not texts:
        raise ConfigError("no text to fill: give --text or --input")
    tpl = model.template
    ids = list(ids) if ids is not None else list(range(len(texts)))
    if prompt is not None and not prompt.strip():
        raise ConfigError("--prompt is empty")
    head = tpl.prompt_ids([Turn("user", prompt)]) if prompt else ([tpl.bos_id] if tpl.bos_id is not None else [])
    rows, pieces_per_text, holes_per_text = [], [], []
    for k, (rid, text) in enumerate(zip(ids, texts)):
        label = f"text {k + 1}" + (f" (id {rid!r})" if rid != k else "")
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{label} is empty")
        try:
            pieces = parse_spans(text, default_slots)
        except ValueError as err:
            raise ConfigError(f"{label}: {err}") from None
        if not any(kind == "mask" for kind, _ in pieces):
            raise ConfigError(f"{label} has no hole to fill; mark one with [[MASK]] (default {default_slots} slots) "
                              "or [[MASK:n]] (n slots)")
        row = list(head)
        holes = []
        for kind, value in pieces:
            if kind == "text":
                row += spans_to_ids([(kind, value)], tpl.encode_text, tpl.mask_id)
            else:
                holes.append(list(range(len(row), len(row) + int(value))))
                row += [tpl.mask_id] * int(value)
        row.append(tpl.eos_id)
        if len(row) > model.max_length:
            raise ConfigError(f"{label} is {len(row)} tokens with its holes (and the {'prompt' if prompt else 'BOS/EOS'}), "
                              f"more than the model's limit of {model.max_length} positions; shorten the text or use "
                              "fewer mask slots")
        rows.append(row)
        pieces_per_text.append(pieces)
        holes_per_text.append(holes)
    result = infill(model.denoise, rows, mask_id=tpl.mask_id, eos_id=tpl.eos_id, pad_id=tpl.pad_id, sampler=sampler,
                    seed=seed, return_trajectory=return_trajectory, max_batch_size=batch_size,
                    max_length=model.max_length)
    special = {tpl.mask_id, tpl.pad_id, tpl.eos_id, tpl.bos_id}
    outputs = []
    for rid, text, row, out, pieces, holes, stats in zip(ids, texts, rows, result.ids, pieces_per_text,
                                                          holes_per_text, result.row_stats):
        fills = [model.tokenizer.decode([out[p] for p in hole if out[p] not in special], skip_special_tokens=True)
                 for hole in holes]
        outputs.append(InfillOutput(rid, text, _splice(pieces, fills), [f.strip() for f in fills], row, list(out),
                                    holes, _row_stats(stats)))
    return outputs, result


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
        text = _read_utf8(file, path)
        if not text.strip():
            raise ConfigError(f"--input {path!r} is empty")
        return [0], [text]
    ids, texts = [], []
    for lineno, line in enumerate(_read_utf8(file, path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} line {lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ConfigError(f"{path} line {lineno}: expected an object with a \"text\" string")
        ids.append(obj.get("id", len(texts)))
        texts.append(obj["text"])
    if not texts:
        raise ConfigError(f"--input {path!r} holds no texts (one JSON object per line: {{\"text\": \"...\"}})")
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
    _check_flags(batch_size=batch_size, default_slots=default_slots)
    lm, config = _load_with_sampler(model, device, preset, sampler, steps=steps, temperature=temperature,
                                    top_p=top_p, top_k=top_k, block_size=block_size, threshold=threshold)
    outputs, result = infill_texts(lm, texts, sampler=config, ids=ids, prompt=prompt, seed=seed,
                                   batch_size=batch_size, default_slots=default_slots,
                                   return_trajectory=trajectory is not None)
    if trajectory is not None:
        from .trajectory import render_trajectory_html

        render_trajectory_html(result.trajectories, _piece_decoder(lm.tokenizer), trajectory,
                               titles=[str(o.id) for o in outputs], hide_ids=[lm.template.pad_id])
    summary = _summary(f"filled {len(outputs)} text(s)", result)
    if output is not None:
        with _open_output(output) as handle:
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


# ---------------------------------------------------------------------------------------------- chat
@dataclass
class ChatReply:
    """One chat turn: the answer, the turns the prompt was built from (the kept context plus the new
    user message), how many earlier exchanges were dropped to fit the model, and the row's stats."""

    answer: str
    context: list
    dropped: int
    stats: dict


class ChatSession:
    """A multi-turn conversation with a model: every prompt is built from the whole conversation by
    the chat template (the same ids as in training). When the conversation no longer fits
    (``prompt + canvas_length > max_length``) the oldest exchanges are dropped (the system message is kept).

    Args:
        model: a loaded :class:`~diffusion_lm.MaskedDiffusionLM`.
        sampler: the sampler config.
        canvas_length: answer slots (default: the model's).
        seed: base seed; turn ``k`` (counted from the last reset) uses ``seed + k``.
        system: optional system message.
    """

    def __init__(self, model, sampler: SamplerConfig, canvas_length: Optional[int] = None, seed: Optional[int] = 0,
                 system: Optional[str] = None) -> None:
        from ..chat import Turn

        self.model = model
        self.sampler = sampler
        self.canvas_length = canvas_length if canvas_length is not None else int(model.hparams.canvas_length)
        _check_flags(canvas_length=self.canvas_length)
        if self.canvas_length >= model.max_length:
            raise ConfigError(f"--canvas_length {self.canvas_length} leaves no room for a prompt: the model takes "
                              f"{model.max_length} positions in all; lower --canvas_length")
        self.seed = seed
        self.system = [Turn("system", system)] if system else []
        self.turns: list = []

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.turns = []

    def _fit(self, user_turn) -> tuple[list, int]:
        turns, dropped = list(self.turns), 0
        limit = self.model.max_length - self.canvas_length
        while True:
            context = self.system + turns + [user_turn]
            n = len(self.model.template.prompt_ids(context))
            if n <= limit:
                return context, dropped
            if not turns:
                raise ConfigError(f"this message is {n} tokens with its context; the model takes at most {limit} "
                                  f"prompt tokens with --canvas_length {self.canvas_length}: write a shorter message "
                                  "or lower --canvas_length")
            # drop the oldest exchange: everything up to and including the first assistant turn
            cut = next((i + 1 for i, t in enumerate(turns) if t.role == "assistant"), len(turns))
            turns, dropped = turns[cut:], dropped + 1

    def ask(self, text: str) -> ChatReply:
        """Answer ``text`` in the context of the conversation so far, and record the exchange."""
        from ..chat import Turn

        if not text.strip():
            raise ConfigError("empty message")
        context, dropped = self._fit(Turn("user", text))
        record = PromptRecord(len(self.turns) // 2, context, text)
        seed = None if self.seed is None else self.seed + len([t for t in self.turns if t.role == "user"])
        rows, _ = answer_prompts(self.model, [record], sampler=self.sampler, canvas_length=self.canvas_length,
                                 seed=seed, batch_size=1)
        answer = rows[0]["answer"]
        self.turns = context[len(self.system):] + [Turn("assistant", answer)]
        return ChatReply(answer, context, dropped, rows[0]["stats"])


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
            print(f"diffusion-lm: error: stdin line {lineno} is not valid UTF-8 (byte offset {start + err.start}); "
                  "skipped", file=sys.stderr)
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
    seed: Optional[int] = 0,
    transcript: Optional[str] = None,
    device: Optional[str] = None,
) -> None:
    """Chat with a model: each line read from stdin is a user message; the conversation so far is
    the context of every answer (the oldest exchanges are dropped when it no longer fits).

    Commands: /reset (start a new conversation), /quit (or end of input). Works with piped stdin:
    `printf 'Hello\\nAnd you?\\n' | diffusion-lm chat --model run/checkpoints/last.ckpt` prints one answer per line.

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
        seed: base seed; turn k uses seed + k (null = random).
        transcript: append one JSON row per turn ({turn, messages, answer, dropped, stats}) to this file.
        device: cpu or cuda (default: cuda when available).
    """
    _check_flags(canvas_length=canvas_length)
    lm, config = _load_with_sampler(model, device, preset, sampler, steps=steps, temperature=temperature,
                                    top_p=top_p, top_k=top_k, block_size=block_size, threshold=threshold)
    session = ChatSession(lm, config, canvas_length=canvas_length, seed=seed, system=system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message; /reset starts over, /quit exits", file=sys.stderr)
    log = _open_transcript(transcript) if transcript else None
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
                row = {"turn": turn, "messages": [{"role": t.role, "content": t.content} for t in reply.context],
                       "answer": reply.answer, "dropped": reply.dropped, "stats": reply.stats}
                append_line(log, json.dumps(row, ensure_ascii=False))
    finally:
        if log is not None:
            log.close()
