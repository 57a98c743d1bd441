"""The model side of the server: requests -> validated tasks (prompt ids, sampler, seed, batch key),
a batch of tasks -> one call of the text-level sampler functions, and sampler rows -> stream states.

Tasks are validated when the request arrives, so one bad request never fails the batch it would
have joined. Generation itself is :func:`~diffusion_lm.pipeline.answer_prompts` and
:func:`~diffusion_lm.pipeline.infill_texts`, with per-request seeds (a request's answer does
not depend on what it is batched with) and the sampler's ``on_step`` hook for streaming.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..errors import ConfigError
from ..pipeline import (
    InfillRow,
    PromptRecord,
    answer_prompts,
    build_sampler,
    infill_rows,
    infill_texts,
    piece_decoder,
    splice_fills,
    turns_from_messages,
)
from ..sampling.config import SamplerConfig
from .errors import APIError
from .scheduler import BatchCancelled, Job
from .schemas import ChatCompletionRequest, DiffusionOptions, InfillRequest

__all__ = ["MASK_PLACEHOLDER", "ChatResult", "ChatTask", "Engine", "InfillResult", "InfillTask",
           "SAMPLER_FLAGS"]

MASK_PLACEHOLDER = "\u2592"  # "▒": a still-masked answer slot in a stream state's text
SAMPLER_FLAGS = ("steps", "threshold", "block_size", "temperature", "top_p", "top_k")

# A sampler flag in a ConfigError -> the request field that sets it.
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "diffusion.top_k",
           "steps": "diffusion.steps", "threshold": "diffusion.threshold",
           "block_size": "diffusion.block_size", "preset": "diffusion.preset", "sampler": "diffusion.preset"}


@dataclass
class ChatTask:
    """A validated chat request: its prompt, canvas, sampler and seed; ``key`` groups batchable tasks."""

    record: PromptRecord
    prompt_ids: list[int]
    canvas_length: int
    sampler: SamplerConfig
    seed: int
    key: tuple


@dataclass
class InfillTask:
    """A validated infill request (see :class:`~diffusion_lm.pipeline.InfillRow`)."""

    text: str
    prompt: Optional[str]
    default_slots: int
    layout: InfillRow
    sampler: SamplerConfig
    seed: int
    key: tuple


@dataclass
class ChatResult:
    """A finished answer: ``finish_reason`` is ``stop`` when the model committed EOS, else ``length``."""

    answer: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stats: dict
    seed: int
    batch_size: int
    slots: list = field(default_factory=list)


@dataclass
class InfillResult:
    """A filled text and the fill of each hole."""

    text: str
    fills: list[str]
    prompt_tokens: int
    completion_tokens: int
    stats: dict
    seed: int
    batch_size: int
    holes: list = field(default_factory=list)


class Engine:
    """Validates requests against one loaded model and runs batches of them.

    Args:
        model: a loaded :class:`~diffusion_lm.MaskedDiffusionLM` (anything with ``template``,
            ``tokenizer``, ``max_length``, ``hparams.canvas_length`` and ``denoise``).
        sampler: the server's default sampler as :func:`build_sampler` arguments (``preset``,
            ``sampler`` and the single flags); a request's settings go on top.
        canvas_length: answer slots when a request gives no ``max_tokens`` (default: the model's).
    """

    def __init__(self, model, *, sampler: Optional[dict] = None, canvas_length: Optional[int] = None) -> None:
        self.model = model
        self.template = model.template
        self.max_length = int(model.max_length)
        self.canvas_length = int(canvas_length if canvas_length is not None else model.hparams.canvas_length)
        if not 1 <= self.canvas_length < self.max_length:
            raise ConfigError(f"--canvas_length {self.canvas_length} must be in [1, {self.max_length - 1}] "
                              f"(the model takes {self.max_length} positions, prompt included)")
        self.defaults = {k: v for k, v in (sampler or {}).items() if v is not None}
        self.default_sampler = self._build(dict(self.defaults))  # fails early on a bad server flag
        self._piece = piece_decoder(model.tokenizer)
        self._pieces: dict[int, str] = {}
        self._hidden = {self.template.pad_id, self.template.eos_id}
        if self.template.bos_id is not None:
            self._hidden.add(self.template.bos_id)

    # ------------------------------------------------------------------------------ validation
    def _build(self, args: dict) -> SamplerConfig:
        return build_sampler(args.pop("preset", None), args.pop("sampler", None), model=self.model, **args)

    def sampler_for(self, temperature: Optional[float], top_p: Optional[float],
                    options: Optional[DiffusionOptions]) -> SamplerConfig:
        """The request's sampler: the server's default (or ``diffusion.preset``), then the request's
        settings."""
        options = options or DiffusionOptions()
        args = dict(self.defaults) if options.preset is None else {"preset": options.preset}
        if options.steps is not None or options.threshold is not None:  # the request picks the selector
            args.pop("steps", None)
            args.pop("threshold", None)
        given = {"steps": options.steps, "threshold": options.threshold, "block_size": options.block_size,
                 "top_k": options.top_k, "temperature": temperature, "top_p": top_p}
        args.update({k: v for k, v in given.items() if v is not None})
        try:
            return self._build(args)
        except ConfigError as err:
            raise _sampler_error(err) from None

    def _seed(self, seed: Optional[int]) -> int:
        # A drawn seed stays below 2**53 so JavaScript clients read it back exactly and can reproduce
        # the answer.
        return secrets.randbits(53) if seed is None else int(seed)

    def chat_task(self, req: ChatCompletionRequest) -> ChatTask:
        """Validate a chat request (messages, lengths, sampler) into a task; a problem is an
        :class:`APIError`."""
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, f"max_tokens ({req.max_tokens}) and max_completion_tokens "
                           f"({req.max_completion_tokens}) disagree; give one", param="max_completion_tokens")
        canvas = req.max_completion_tokens or req.max_tokens or self.canvas_length
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if canvas >= self.max_length:
            raise APIError(400,
                           f"{param} {canvas} is out of range: the model takes {self.max_length} positions "
                           f"in all, prompt included, so at most {self.max_length - 1}", param=param,
                           code="invalid_value")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.text()} for m in req.messages]
        try:
            turns = turns_from_messages(messages, "messages")
        except ConfigError as err:
            found = re.search(r"message (\d+)", str(err))
            raise APIError(400, str(err), param=f"messages[{found.group(1)}]" if found else "messages",
                           code="invalid_value") from None
        prompt_ids = self.template.prompt_ids(turns)
        n = len(prompt_ids)
        if n + canvas > self.max_length:
            fix = f"shorten the conversation to at most {self.max_length - canvas} tokens"
            if n < self.max_length:
                fix += f" or lower {param} to at most {self.max_length - n}"
            raise APIError(400,
                           f"messages: the prompt is {n} tokens; with {param} {canvas} that is {n + canvas} "
                           f"> the model's {self.max_length} positions: {fix}", param="messages",
                           code="context_length_exceeded")
        sampler = self.sampler_for(req.temperature, req.top_p, req.diffusion)
        record = PromptRecord(0, turns, turns[-1].content)
        key = ("chat", f"canvas {canvas}", _digest(sampler.to_dict()))
        return ChatTask(record, prompt_ids, canvas, sampler, self._seed(req.seed), key)

    def infill_task(self, req: InfillRequest) -> InfillTask:
        """Validate an infill request (hole syntax, length, sampler) into a task."""
        try:
            layout = infill_rows(self.model, [req.text], prompt=req.prompt,
                                 default_slots=req.default_slots)[0]
        except ConfigError as err:
            message = str(err).replace("text 1", "text").replace("--prompt", "prompt")
            raise APIError(400, message, param="prompt" if message.startswith("prompt") else "text",
                           code="invalid_value") from None
        sampler = self.sampler_for(req.temperature, req.top_p, req.diffusion)
        key = ("infill", f"slots {req.default_slots}", _digest([req.prompt, sampler.to_dict()]))
        return InfillTask(req.text, req.prompt, req.default_slots, layout, sampler, self._seed(req.seed), key)

    # ------------------------------------------------------------------------------ batches
    def run_batch(self, jobs: list[Job]) -> None:
        """Run one batch (all tasks share a key) and deliver each job's result; stream jobs also get
        ``(step, row ids)`` after every forward they take part in. Runs on the scheduler's thread."""
        tasks = [job.payload for job in jobs]
        steps = [0] * len(jobs)

        def on_step(rows: list[int], ids: list[list[int]]) -> None:
            if all(job.cancelled for job in jobs):  # every client left: stop spending compute on them
                raise BatchCancelled()
            for r, row in zip(rows, ids):
                steps[r] += 1
                if jobs[r].stream:
                    jobs[r].emit((steps[r], row))

        first = tasks[0]
        seeds = [t.seed for t in tasks]
        if isinstance(first, ChatTask):
            rows, result = answer_prompts(self.model, [t.record for t in tasks], sampler=first.sampler,
                                          canvas_length=first.canvas_length, seed=seeds,
                                          batch_size=len(tasks), on_step=on_step)
            for job, task, row, seq, ids in zip(jobs, tasks, rows, result.sequences, result.ids):
                canvas = seq[len(task.prompt_ids):]
                job.finish(ChatResult(
                    answer=row["answer"],
                                      finish_reason="stop" if self.template.eos_id in canvas else "length",
                    prompt_tokens=len(task.prompt_ids), completion_tokens=len(ids), stats=row["stats"],
                                      seed=task.seed,
                    batch_size=len(jobs), slots=self.chat_state(task, seq)["slots"],
                ))
        else:
            outputs, _ = infill_texts(self.model, [t.text for t in tasks], sampler=first.sampler,
                                      prompt=first.prompt, seed=seeds, batch_size=len(tasks),
                                      default_slots=first.default_slots, on_step=on_step)
            for job, task, out in zip(jobs, tasks, outputs):
                job.finish(InfillResult(
                    text=out.filled, fills=out.fills, prompt_tokens=len(task.layout.row),
                    completion_tokens=sum(len(h) for h in task.layout.holes), stats=out.stats, seed=task.seed,
                    batch_size=len(jobs), holes=self.infill_state(task, out.output_ids)["holes"],
                ))

    # ------------------------------------------------------------------------------ stream states
    def piece(self, token: int) -> Optional[str]:
        """Display text of one committed slot; None while masked, "" for pad/EOS/BOS."""
        if token == self.template.mask_id:
            return None
        if token in self._hidden:
            return ""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self._piece([token])
        return text

    def chat_state(self, task: ChatTask, ids: Sequence[int]) -> dict[str, Any]:
        """The answer as it stands: ``slots`` (one per canvas slot up to a committed EOS: its text, or
        None while masked), ``state`` (their text, masks as ``MASK_PLACEHOLDER``) and ``masked``."""
        canvas = list(ids[len(task.prompt_ids):])
        if self.template.eos_id in canvas:
            canvas = canvas[: canvas.index(self.template.eos_id)]
        slots = [self.piece(t) for t in canvas]
        return {"slots": slots, "state": _text(slots), "masked": sum(s is None for s in slots)}

    def infill_state(self, task: InfillTask, ids: Sequence[int]) -> dict[str, Any]:
        """The text as it stands: ``holes`` (per hole, its slots' text or None), ``state`` (the whole
        text, masks as ``MASK_PLACEHOLDER``) and ``masked``."""
        holes = [[self.piece(ids[p]) for p in hole] for hole in task.layout.holes]
        state = splice_fills(task.layout.pieces, [_text(h) for h in holes])
        return {"holes": holes, "state": state, "masked": sum(s is None for h in holes for s in h)}

    def initial_state(self, task) -> dict[str, Any]:
        """The state before the first step (every slot masked)."""
        if isinstance(task, ChatTask):
            return self.chat_state(task, task.prompt_ids + [self.template.mask_id] * task.canvas_length)
        return self.infill_state(task, task.layout.row)


def _text(slots: Sequence[Optional[str]]) -> str:
    return "".join(MASK_PLACEHOLDER if s is None else s for s in slots).strip()


def _digest(value: Any) -> str:
    """A short stable name for batch-relevant settings (equal settings, equal name)."""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return "settings " + hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


def _sampler_error(err: ConfigError) -> APIError:
    """A sampler ConfigError (worded for command-line flags) as a 400 naming the request field."""
    text = str(err)
    names = re.findall(r"--(\w+)", text)
    if not names and "preset" in text:
        names = ["preset"]
    param = _FIELDS.get(names[0]) if names else "diffusion"
    message = re.sub(r"--(\w+)", lambda m: _FIELDS.get(m.group(1), m.group(1)), text)
    return APIError(400, message, param=param, code="invalid_value")
