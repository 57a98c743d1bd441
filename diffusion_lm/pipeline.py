"""Text in, text out: answering prompts, filling holes and chatting with a loaded model.

Plain functions that the commands (:mod:`diffusion_lm.cli`), the server and scripts share, with no
file or terminal I/O. Answers go through :meth:`MaskedDiffusionLM.generate
<diffusion_lm.module.MaskedDiffusionLM.generate>` (the one text -> answer path: prompt ids from the
chat template, the length check, the sampler, decoding); infilling lays out the ``[[MASK]]`` text
and calls the sampler's :func:`~diffusion_lm.sampling.infill` directly (its rows are not answers).

* :func:`build_sampler` -- preset + ``--sampler`` + flags (+ an export's stored presets) -> a
  :class:`~diffusion_lm.sampling.SamplerConfig`, via :meth:`SamplerConfig.resolve`;
* :func:`answer_prompts` -- :class:`PromptRecord` s -> output rows ``{id, prompt, answer, stats}``;
* :func:`infill_texts` -- texts with holes -> :class:`InfillOutput` s;
* :class:`ChatSession` -- a multi-turn conversation that drops its oldest exchanges to fit.

Input problems raise :class:`~diffusion_lm.errors.ConfigError` (one line, naming the flag or input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from .chat import ROLES, Turn
from .errors import ConfigError
from .loading import stored_sampler
from .sampling.config import SamplerConfig, SamplerSpec, check_options
from .sampling.loop import StepHook, infill
from .sampling.spans import Span, parse_spans, spans_to_ids
from .seeding import Seed

__all__ = [
    "ChatReply",
    "ChatSession",
    "InfillOutput",
    "InfillRow",
    "PromptRecord",
    "answer_prompts",
    "build_sampler",
    "describe_record",
    "infill_fills",
    "infill_rows",
    "infill_texts",
    "piece_decoder",
    "render_pieces",
    "row_stats",
    "splice_fills",
    "turns_from_messages",
]


# ------------------------------------------------------------------------------------- the sampler
def build_sampler(preset: Optional[str] = None, sampler: Union[SamplerSpec, SamplerConfig] = None, *,
                  model=None, **flags: Any) -> SamplerConfig:
    """The sampler of a command: :meth:`SamplerConfig.resolve` (``preset``, then the ``sampler``
    file/mapping on top of it, then the single ``flags`` -- ``steps``, ``temperature``, ``top_p``,
    ``top_k``, ``block_size``, ``threshold`` -- on top of both), where a preset name means the copy
    stored in ``model``'s export folder when it has one (and its default preset is the default)."""
    return SamplerConfig.resolve(preset, sampler, stored=stored_sampler(model), **flags)


# -------------------------------------------------------------------------------------------- prompts
@dataclass
class PromptRecord:
    """One prompt to answer: its ``id``, the conversation ``turns`` (ending with a user turn), the
    ``prompt`` text shown in outputs (the last user message) and an optional ``language``."""

    id: Any
    turns: list
    prompt: str
    language: Optional[str] = None


def turns_from_messages(messages: Any, where: str) -> list:
    """``[{role, content}, ...]`` -> turns, ending with the user's; a problem is a :class:`ConfigError`
    that starts with ``where`` and names the message."""
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
        raise ConfigError(f"{where}: the last message must be the user's (the one to answer), "
                          f"got {turns[-1].role!r}")
    return turns


def describe_record(record: PromptRecord, index: int) -> str:
    """How a prompt is named in errors: ``prompt 3 (id 'x') 'What is ...'``."""
    snippet = record.prompt if len(record.prompt) <= 40 else record.prompt[:37] + "..."
    label = f"prompt {index + 1}" + (f" (id {record.id!r})" if record.id != index else "")
    return f"{label} {snippet!r}"


def row_stats(stats) -> dict:
    """A row's :class:`~diffusion_lm.sampling.RowStats` as the ``stats`` of an output row."""
    return {"nfe": stats.nfe, "tokens": stats.tokens,
            "tokens_per_forward": round(stats.tokens_per_forward, 4), "seconds": round(stats.seconds, 4)}


def piece_decoder(tokenizer):
    """``[id] -> text`` for the trajectory views, keeping word-start spaces of SentencePiece/WordPiece
    vocabularies."""

    def piece(ids: Sequence[int]) -> str:
        text = tokenizer.decode(list(ids))
        token = tokenizer.convert_ids_to_tokens(int(ids[0])) or ""
        if token.startswith("##"):
            return token[2:]
        if token.startswith("▁") and not text.startswith(" "):
            return " " + text
        return text

    return piece


def answer_prompts(
    model,
    records: Sequence[PromptRecord],
    *,
    sampler: SamplerConfig,
    canvas_length: Optional[int] = None,
    seed: Seed = 0,
    batch_size: int = 8,
    return_trajectory: bool = False,
    on_step: Optional[StepHook] = None,
):
    """Answer ``records`` with ``model``; returns ``(rows, result)``: one output row per record
    (``{id, prompt, answer, language?, stats}``) and the sampler's :class:`GenerationResult`.

    Rows are decoded in batches of ``batch_size``; per-row seeds make results independent of it up to
    the float rounding of the model's batched kernels (see ``docs/sampling.md``). ``seed`` may be one
    seed per record and ``on_step`` a step hook, as in :func:`~diffusion_lm.sampling.generate`."""
    canvas = canvas_length if canvas_length is not None else int(model.hparams.canvas_length)
    check_options(canvas_length=canvas, batch_size=batch_size)
    result = model.generate([r.turns for r in records], sampler=sampler, canvas_length=canvas, seed=seed,
                            return_trajectory=return_trajectory, max_batch_size=batch_size, on_step=on_step,
                            labels=[describe_record(r, i) for i, r in enumerate(records)])
    rows = []
    for record, text, stats in zip(records, result.texts, result.row_stats):
        row: dict[str, Any] = {"id": record.id, "prompt": record.prompt, "answer": text}
        if record.language is not None:
            row["language"] = record.language
        row["stats"] = row_stats(stats)
        rows.append(row)
    return rows, result


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
        return {"id": self.id, "text": self.text, "filled": self.filled, "fills": self.fills,
                "stats": self.stats}


def splice_fills(pieces: list[tuple[str, Any]], fills: Sequence[str]) -> str:
    """The text of parsed ``pieces`` with its holes replaced by ``fills``, in order; the literal text
    is kept verbatim (see :class:`InfillOutput`), except that an empty fill between two spaces
    leaves one space, not two."""
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
        if not fill and out and out[-1].endswith(" ") and str(after)[:1] == " ":
            out[-1] = out[-1][:-1]  # an empty (variable-length) hole: the text closes up, one space left
        out.append(fill)
    return "".join(out)


def render_pieces(pieces: Sequence[Span]) -> str:
    """Parsed pieces back as text with ``[[MASK:n]]`` / ``[[MASK:<=n]]`` holes."""
    marks = {"mask": "[[MASK:{}]]", "flex": "[[MASK:<={}]]"}
    return "".join(str(value) if kind == "text" else marks[kind].format(value) for kind, value in pieces)


@dataclass
class InfillRow:
    """One text laid out for :func:`~diffusion_lm.sampling.infill`: the ``row`` of ids (``[MASK]`` in
    every hole slot), the parsed ``pieces`` of the text (``("text", str)`` / ``("mask", n)``) and, per
    hole, the positions of its slots in the row."""

    row: list[int]
    pieces: list
    holes: list[list[int]]
    flexible: list[bool] = field(default_factory=list)

    def flexible_slots(self) -> list[bool]:
        """Per position of ``row``: whether it is a slot of a variable-length (``[[MASK:<=n]]``) hole."""
        flags = [False] * len(self.row)
        for hole, flex in zip(self.holes, self.flexible):
            for p in hole:
                flags[p] = flex
        return flags


def _infill_row(model, label: str, text: Union[str, Sequence[Span]], head: list[int], default_slots: int,
                around: str) -> InfillRow:
    """One text with holes (a ``[[MASK]]`` string, or its parsed pieces: code with a literal ``[[`` is
    laid out from pieces) after ``head`` (BOS, or a chat prompt), ending with EOS."""
    tpl = model.template
    if isinstance(text, str):
        if not text.strip():
            raise ConfigError(f"{label} is empty")
        try:
            pieces = parse_spans(text, default_slots)
        except ValueError as err:
            raise ConfigError(f"{label}: {err}") from None
    else:
        pieces = [(str(kind), value) for kind, value in text]
        bad = [kind for kind, value in pieces if kind not in ("text", "mask", "flex")
               or (kind != "text" and (not isinstance(value, int) or value < 1))]
        if bad:
            raise ConfigError(f"{label}: a piece must be ('text', str), ('mask', n) or ('flex', n) with "
                              f"n >= 1, got {bad[0]!r}")
    if not any(kind != "text" for kind, _ in pieces):
        raise ConfigError(f"{label} has no hole to fill; mark one with [[MASK]] (default {default_slots} "
                          "slots), [[MASK:n]] (n slots) or [[MASK:<=n]] (at most n)")
    row = list(head)
    holes, flexible = [], []
    for kind, value in pieces:
        if kind == "text":
            row += spans_to_ids([(kind, value)], tpl.encode_text, tpl.mask_id)
        else:
            holes.append(list(range(len(row), len(row) + int(value))))
            flexible.append(kind == "flex")
            row += [tpl.mask_id] * int(value)
    row.append(tpl.eos_id)
    if len(row) > model.max_length:
        raise ConfigError(f"{label} is {len(row)} tokens with its holes (and the {around}), more than the "
                          f"model's limit of {model.max_length} positions; shorten the text or use fewer "
                          "mask slots")
    return InfillRow(row, pieces, holes, flexible)


def infill_rows(model, texts: Sequence[Union[str, Sequence[Span]]], *, ids: Optional[Sequence[Any]] = None,
                prompt: Optional[str] = None, default_slots: int = 8) -> list[InfillRow]:
    """Parse and lay out the ``[[MASK]]`` / ``[[MASK:n]]`` texts of :func:`infill_texts` (see there);
    a text with no hole, a syntax error or a row longer than the model is a :class:`ConfigError`."""
    check_options(default_slots=default_slots)
    if not texts:
        raise ConfigError("no text to fill: give --text or --input")
    tpl = model.template
    ids = list(ids) if ids is not None else list(range(len(texts)))
    if prompt is not None and not prompt.strip():
        raise ConfigError("--prompt is empty")
    head = tpl.prompt_ids([Turn("user",
                                prompt)]) if prompt else ([tpl.bos_id] if tpl.bos_id is not None else [])
    return [_infill_row(model, f"text {k + 1}" + (f" (id {rid!r})" if rid != k else ""), text, head,
                        default_slots, "prompt" if prompt else "BOS/EOS")
            for k, (rid, text) in enumerate(zip(ids, texts))]


def infill_fills(model, row: InfillRow, filled: Sequence[int]) -> list[str]:
    """The decoded text of each hole of ``row`` in ``filled`` (the row after sampling; special ids
    skipped)."""
    tpl = model.template
    special = {tpl.mask_id, tpl.pad_id, tpl.eos_id, tpl.bos_id}
    return [model.tokenizer.decode([filled[p] for p in hole if filled[p] not in special],
                                   skip_special_tokens=True)
            for hole in row.holes]


def infill_texts(
    model,
    texts: Sequence[Union[str, Sequence[Span]]],
    *,
    sampler: SamplerConfig,
    ids: Optional[Sequence[Any]] = None,
    prompt: Optional[str] = None,
    seed: Seed = 0,
    batch_size: int = 8,
    default_slots: int = 8,
    return_trajectory: bool = False,
    on_step: Optional[StepHook] = None,
):
    """Fill the ``[[MASK]]`` / ``[[MASK:n]]`` / ``[[MASK:<=n]]`` holes of each text; returns ``(outputs,
    result)``. A text may also be given as parsed pieces (``[("text", "def f():"), ("mask", 6), ...]``),
    for text that holds a literal ``[[`` (code).

    Without ``prompt`` a text is laid out as the encoder saw text in pretraining, ``[BOS] text [EOS]``;
    with ``prompt`` it is the assistant's answer to that user message (the chat template:
    ``prompt ids + text + [EOS]``), for re-generating part of an answer. ``seed`` may be one seed per
    text and ``on_step`` a step hook, as in :func:`~diffusion_lm.sampling.infill`.
    """
    check_options(batch_size=batch_size, default_slots=default_slots)
    tpl = model.template
    ids = list(ids) if ids is not None else list(range(len(texts)))
    laid_out = infill_rows(model, texts, ids=ids, prompt=prompt, default_slots=default_slots)
    result = infill(model.denoise, [r.row for r in laid_out], mask_id=tpl.mask_id, eos_id=tpl.eos_id,
                    pad_id=tpl.pad_id, sampler=sampler, seed=seed, return_trajectory=return_trajectory,
                    max_batch_size=batch_size, max_length=model.max_length, on_step=on_step,
                    flexible=[r.flexible_slots() for r in laid_out])
    outputs = []
    for rid, text, r, out, stats in zip(ids, texts, laid_out, result.ids, result.row_stats):
        fills = infill_fills(model, r, out)
        shown = text if isinstance(text, str) else render_pieces(r.pieces)
        outputs.append(InfillOutput(rid, shown, splice_fills(r.pieces, fills), [f.strip() for f in fills],
                                    r.row, list(out), r.holes, row_stats(stats)))
    return outputs, result


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

    def __init__(self, model, sampler: SamplerConfig, canvas_length: Optional[int] = None,
                 seed: Optional[int] = 0, system: Optional[str] = None) -> None:
        self.model = model
        self.sampler = sampler
        self.canvas_length = canvas_length if canvas_length is not None else int(model.hparams.canvas_length)
        check_options(canvas_length=self.canvas_length)
        self.budget = model.prompt_budget(self.canvas_length)
        self.seed = seed
        self.system = [Turn("system", system)] if system else []
        self.turns: list = []

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.turns = []

    def _fit(self, user_turn) -> tuple[list, int]:
        turns, dropped = list(self.turns), 0
        while True:
            context = self.system + turns + [user_turn]
            n = len(self.model.template.prompt_ids(context))
            if n <= self.budget:
                return context, dropped
            if not turns:
                raise ConfigError(f"this message is {n} tokens with its context; the model takes at most "
                                  f"{self.budget} prompt tokens with --canvas_length {self.canvas_length}: "
                                  "write a shorter message or lower --canvas_length")
            # drop the oldest exchange: everything up to and including the first assistant turn
            cut = next((i + 1 for i, t in enumerate(turns) if t.role == "assistant"), len(turns))
            turns, dropped = turns[cut:], dropped + 1

    def ask(self, text: str) -> ChatReply:
        """Answer ``text`` in the context of the conversation so far, and record the exchange."""
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
