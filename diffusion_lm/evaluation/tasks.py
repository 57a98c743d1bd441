"""Evaluation tasks: chat answers, code fill-in-the-middle, bridging, span edits.

Each task reads a local JSONL file (one record per line; schemas in ``docs/evaluation.md``), runs the
model on every record that fits it, and returns one row of figures per record and their means overall,
per language and per source (:class:`~diffusion_lm.metrics.GroupedMeans`).

* ``chat``   -- ``{id, language, messages | prompt, reference?}``: answer the last user message;
  answer metrics (:func:`~diffusion_lm.sampling.metrics.answer_metrics`) and, with a reference,
  exact match and chrF.
* ``fim``    -- ``{id, prefix, middle, suffix}``: fill the masked middle of a Python function; exact
  match, chrF, and whether the filled function parses (``ast.parse``).
* ``bridge`` -- ``{id, language, before, bridge, after}``: the NELBO of the original bridge between
  the two texts (per token) and a generated bridge's chrF.
* ``edit``   -- ``{id, language, text, span: [start, end], reference?}``: replace the marked span;
  whether every token and character outside it is unchanged, exact match and chrF to the reference.

The infill tasks (``fim``, ``bridge``, ``edit``) run each record twice: with a fixed-size hole of the
original's token count (``holes=fixed``) and with a variable-length hole of up to ``slack`` times that
(``holes=variable``, ``[[MASK:<=n]]``); figures carry the mode as a prefix (``fixed/chrf``).
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch

from ..errors import ConfigError
from ..files import read_utf8
from ..metrics import GroupedMeans, chrf, exact_match
from ..objective import masked_diffusion_nelbo
from ..pipeline import PromptRecord, answer_prompts, infill_rows, infill_texts, turns_from_messages
from ..sampling.config import SamplerConfig
from ..sampling.metrics import answer_metrics
from ..seeding import counter_uniform

__all__ = ["TASK_KINDS", "TaskSpec", "TaskResult", "bridge_nelbo", "edit_figures", "fim_figures", "parses",
           "read_task", "run_task"]

TASK_KINDS = ("chat", "fim", "bridge", "edit")
_REQUIRED = {"chat": (), "fim": ("prefix", "middle", "suffix"), "bridge": ("before", "bridge", "after"),
             "edit": ("text", "span")}
HOLE_MODES = ("fixed", "variable")


@dataclass
class TaskSpec:
    """One task of an evaluation suite.

    Args:
        kind: ``chat``, ``fim``, ``bridge`` or ``edit``.
        path: the task's JSONL file (relative paths are relative to the working directory).
        name: the task's name in the report (default: ``kind``).
        max_records: use at most this many records (the first ones).
        slack: a variable-length hole has up to ``ceil(slack * n)`` slots, n = the original's tokens.
        nelbo_samples: times per record for the bridge NELBO estimate (stratified over (0, 1]).
    """

    kind: Literal["chat", "fim", "bridge", "edit"]
    path: str
    name: Optional[str] = None
    max_records: Optional[int] = None
    slack: float = 1.5
    nelbo_samples: int = 8

    @property
    def label(self) -> str:
        return self.name or self.kind

    @classmethod
    def coerce(cls, spec: Union["TaskSpec", dict], where: str = "task") -> "TaskSpec":
        """A spec from itself or a mapping (LightningCLI may hand dataclass arguments over as dicts)."""
        if isinstance(spec, TaskSpec):
            out = spec
        elif isinstance(spec, dict):
            try:
                out = cls(**spec)
            except TypeError as err:
                raise ConfigError(f"{where}: {err}") from None
        else:
            raise ConfigError(f"{where}: expected {{kind, path, ...}}, got {type(spec).__name__}")
        if out.kind not in TASK_KINDS:
            raise ConfigError(f"{where}: kind {out.kind!r} is not one of {', '.join(TASK_KINDS)}")
        if out.max_records is not None and out.max_records < 1:
            raise ConfigError(f"{where}: max_records must be >= 1, got {out.max_records}")
        if not out.slack >= 1:
            raise ConfigError(f"{where}: slack must be >= 1, got {out.slack}")
        if out.nelbo_samples < 1:
            raise ConfigError(f"{where}: nelbo_samples must be >= 1, got {out.nelbo_samples}")
        return out


@dataclass
class TaskResult:
    """A task's outcome: its per-record ``rows`` (id, language, source, outputs, figures), ``metrics``
    (means: ``<figure>`` overall, ``<figure>_<language>``, ``<figure>_src:<source>``) and how many
    records were ``skipped`` because they do not fit the model (with one reason each)."""

    spec: TaskSpec
    rows: list[dict]
    metrics: dict[str, float]
    skipped: list[str] = field(default_factory=list)

    @property
    def figures(self) -> list[str]:
        """The figure names the rows carry, sorted."""
        return sorted({k for r in self.rows for k in r["figures"]})

    @property
    def languages(self) -> list[str]:
        """The languages of the rows (their first group label), sorted."""
        return sorted({_groups(r)[0] for r in self.rows} - {""})


# ------------------------------------------------------------------------------------------ reading
def _check_record(obj: Any, kind: str, where: str) -> dict:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in _REQUIRED[kind]:
        if key not in obj:
            raise ConfigError(f"{where}: a {kind} record needs {', '.join(_REQUIRED[kind])}; "
                              f"{key!r} is missing")
    for key in ("prefix", "middle", "suffix", "before", "bridge", "after", "text", "reference"):
        if key in obj and not isinstance(obj[key], str):
            raise ConfigError(f"{where}: {key!r} must be a string")
    if kind == "chat" and not isinstance(obj.get("prompt"), str) and "messages" not in obj:
        raise ConfigError(f"{where}: a chat record needs \"messages\" (ending with the user's) or \"prompt\"")
    for key in ("middle", "bridge"):
        if key in obj and not obj[key].strip():
            raise ConfigError(f"{where}: {key!r} is empty")
    if kind == "edit":
        span, text = obj["span"], obj["text"]
        if (not isinstance(span, list) or len(span) != 2 or not all(isinstance(v, int) for v in span)
                or not 0 <= span[0] < span[1] <= len(text)):
            raise ConfigError(f"{where}: span must be [start, end] character offsets with 0 <= start < end "
                              f"<= {len(text)} (the text's length), got {span!r}")
    return obj


def read_task(spec: TaskSpec) -> list[dict]:
    """The records of ``spec.path`` (the first ``max_records``); a bad line is a one-line
    :class:`ConfigError` naming the file and line."""
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"task {spec.label!r}: no such file {spec.path!r}")
    records = []
    for lineno, line in enumerate(read_utf8(path, spec.path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{spec.path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        rec = _check_record(obj, spec.kind, where)
        rec.setdefault("id", f"{spec.label}-{len(records)}")
        rec["_where"] = where
        records.append(rec)
        if spec.max_records is not None and len(records) >= spec.max_records:
            break
    if not records:
        raise ConfigError(f"task {spec.label!r}: {spec.path} holds no records")
    return records


def _groups(rec: dict) -> list[str]:
    lang = rec.get("language") or ("python" if "middle" in rec or "fixed" in rec else "")
    return [str(lang), f"src:{rec['source']}" if rec.get("source") else ""]


# ------------------------------------------------------------------------------------------ running
def run_task(model, spec: TaskSpec, sampler: SamplerConfig, *, seed: int = 0, batch_size: int = 16,
             canvas_length: Optional[int] = None, records: Optional[Sequence[dict]] = None) -> TaskResult:
    """Run one task with ``model`` (a :class:`~diffusion_lm.MaskedDiffusionLM`) and ``sampler``."""
    spec = TaskSpec.coerce(spec)
    records = list(records) if records is not None else read_task(spec)
    runner = {"chat": _run_chat, "fim": _run_fim, "bridge": _run_bridge, "edit": _run_edit}[spec.kind]
    rows, skipped = runner(model, spec, records, sampler, seed=seed, batch_size=batch_size,
                           canvas_length=canvas_length)
    names = sorted({k for r in rows for k in r["figures"]})
    means = GroupedMeans(names)
    means.update([r["figures"] for r in rows], [_groups(r) for r in rows])
    return TaskResult(spec, rows, means.compute() if rows else {}, skipped)


def _row(rec: dict, figures: dict, **outputs: Any) -> dict:
    return {"id": rec["id"], "language": rec.get("language"), "source": rec.get("source"), **outputs,
            "figures": figures}


def _run_chat(model, spec, records, sampler, *, seed, batch_size, canvas_length):
    canvas = canvas_length or int(model.hparams.canvas_length)
    kept, prompts, skipped = [], [], []
    for rec in records:
        if "messages" in rec:
            turns = turns_from_messages(rec["messages"], rec["_where"])
        else:
            turns = turns_from_messages([{"role": "user", "content": rec["prompt"]}], rec["_where"])
        problem = model.length_problem(f"{rec['_where']} (id {rec['id']!r})", len(model.prompt_ids(turns)),
                                       canvas)
        if problem is not None:
            skipped.append(problem)
            continue
        kept.append(rec)
        prompts.append(PromptRecord(rec["id"], turns, turns[-1].content, rec.get("language")))
    if not kept:
        return [], skipped
    out_rows, result = answer_prompts(model, prompts, sampler=sampler, canvas_length=canvas, seed=seed,
                                      batch_size=batch_size)
    eos = model.template.eos_id
    rows = []
    for rec, prompt, out, ids, seq in zip(kept, prompts, out_rows, result.ids, result.sequences):
        answer = seq[len(model.prompt_ids(prompt.turns)):]
        figures = answer_metrics(ids, answer.index(eos) if eos in answer else None)
        figures["nfe"] = float(out["stats"]["nfe"])
        if isinstance(rec.get("reference"), str):
            figures["exact"] = exact_match(out["answer"], rec["reference"])
            figures["chrf"] = chrf(out["answer"], rec["reference"])
        rows.append(_row(rec, figures, prompt=prompt.prompt, answer=out["answer"],
                         reference=rec.get("reference")))
    return rows, skipped


def _hole(model, original: str, mode: str, slack: float) -> tuple[str, int]:
    n = max(1, len(model.template.encode_text(original)))
    return ("mask", n) if mode == "fixed" else ("flex", max(n, math.ceil(slack * n)))


def _pieces(before: str, hole: tuple[str, int], after: str) -> list:
    return [p for p in (("text", before), hole, ("text", after)) if p[0] != "text" or p[1]]


def _fill_all(model, laid: list[tuple[dict, list]], sampler, seed, batch_size):
    """Infill ``(record, pieces)`` pairs that fit the model; returns ``[(record, pieces, output)]`` and the
    reasons of the ones skipped."""
    fits, skipped = [], []
    for rec, pieces in laid:
        try:
            infill_rows(model, [pieces], ids=[rec["id"]])
        except ConfigError as err:
            skipped.append(f"{rec['_where']}: {err}")
            continue
        fits.append((rec, pieces))
    if not fits:
        return [], skipped
    outputs, _ = infill_texts(model, [p for _, p in fits], sampler=sampler, ids=[r["id"] for r, _ in fits],
                              seed=seed, batch_size=batch_size)
    return [(rec, pieces, out) for (rec, pieces), out in zip(fits, outputs)], skipped


def _fill_length(model, out) -> int:
    special = {model.template.pad_id, model.template.eos_id, model.template.mask_id}
    return sum(1 for p in out.holes[0] if out.output_ids[p] not in special)


def parses(code: str) -> float:
    """1.0 when ``code`` parses as Python (``ast.parse``), else 0.0."""
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return 0.0
    return 1.0


def fim_figures(middle: str, fill: str, filled: str) -> dict[str, float]:
    """A FIM record's figures: ``exact`` (the fill equals the masked middle, whitespace-normalised),
    ``chrf`` against it, ``parses`` (the whole filled function) and ``empty``."""
    return {"exact": exact_match(fill, middle), "chrf": chrf(fill, middle), "parses": parses(filled),
            "empty": float(not fill.strip())}


def edit_figures(text: str, span: tuple[int, int], reference: str, fill: str,
                 filled: str) -> dict[str, float]:
    """An edit record's figures: ``rest_identical`` (the filled text keeps the text before and after the
    span byte for byte; an empty fill may close up one space before it), ``exact`` and ``chrf``
    against ``reference``, ``changed`` (the fill differs from the original span) and ``empty``."""
    start, end = span
    before, original, after = text[:start], text[start:end], text[end:]
    head = before[:-1] if not fill and before.endswith(" ") and after.startswith(" ") else before
    rest = filled.startswith(head) and filled.endswith(after) and len(filled) >= len(head) + len(after)
    return {"rest_identical": float(rest), "exact": exact_match(fill, reference),
            "chrf": chrf(fill, reference),
            "changed": float(fill.strip() != original.strip()), "empty": float(not fill.strip())}


def _run_infill_modes(model, spec, records, sampler, seed, batch_size, build, score, extra=None):
    """Both hole modes for every record: ``build(rec, mode)`` -> pieces; ``score(rec, out, mode)`` ->
    (figures, outputs). Rows hold both modes' figures, prefixed ``fixed/`` and ``variable/``, and the
    figures of ``extra(rec)`` (not tied to a mode) for records that were filled."""
    merged: dict[int, dict] = {}  # by the record's position: ids need not be unique
    skipped: list[str] = []
    for mode in HOLE_MODES:
        done, skip = _fill_all(model, [(rec, build(rec, mode)) for rec in records], sampler, seed, batch_size)
        skipped += skip if mode == "fixed" else []
        for rec, _, out in done:
            figures, outputs = score(rec, out, mode)
            entry = merged.setdefault(id(rec), {"rec": rec, "figures": {}, "outputs": {}})
            entry["figures"].update({f"{mode}/{k}": v for k, v in figures.items()})
            entry["outputs"][mode] = outputs
    if extra is not None:
        for e in merged.values():
            e["figures"].update(extra(e["rec"]))
    rows = [_row(e["rec"], e["figures"], **e["outputs"]) for e in merged.values()]
    return rows, skipped


def _run_fim(model, spec, records, sampler, *, seed, batch_size, canvas_length):
    def build(rec, mode):
        return _pieces(rec["prefix"], _hole(model, rec["middle"], mode, spec.slack), rec["suffix"])

    def score(rec, out, mode):
        fill = out.fills[0]
        figures = fim_figures(rec["middle"], fill, out.filled)
        figures["length"] = float(_fill_length(model, out))
        return figures, {"fill": fill}

    return _run_infill_modes(model, spec, records, sampler, seed, batch_size, build, score)


def _run_edit(model, spec, records, sampler, *, seed, batch_size, canvas_length):
    def build(rec, mode):
        start, end = rec["span"]
        text = rec["text"]
        return _pieces(text[:start], _hole(model, text[start:end], mode, spec.slack), text[end:])

    def score(rec, out, mode):
        start, end = rec["span"]
        fill = out.fills[0]
        hole = set(out.holes[0])
        ids_kept = all(a == b for i, (a, b) in enumerate(zip(out.input_ids, out.output_ids)) if i not in hole)
        figures = edit_figures(rec["text"], (start, end), rec.get("reference", rec["text"][start:end]), fill,
                               out.filled)
        figures["rest_identical"] *= float(ids_kept)
        figures["length"] = float(_fill_length(model, out))
        return figures, {"fill": fill, "filled": out.filled}

    return _run_infill_modes(model, spec, records, sampler, seed, batch_size, build, score)


def _run_bridge(model, spec, records, sampler, *, seed, batch_size, canvas_length):
    def build(rec, mode):
        return _pieces(rec["before"] + " ", _hole(model, rec["bridge"], mode, spec.slack), " " + rec["after"])

    def score(rec, out, mode):
        fill = out.fills[0]
        return ({"chrf": chrf(fill, rec["bridge"]), "exact": exact_match(fill, rec["bridge"]),
                 "empty": float(not fill.strip()), "length": float(_fill_length(model, out))}, {"fill": fill})

    def nelbo(rec):
        return {"nelbo": bridge_nelbo(model, rec["before"] + " ", rec["bridge"], " " + rec["after"],
                                      samples=spec.nelbo_samples, seed=seed)}

    return _run_infill_modes(model, spec, records, sampler, seed, batch_size, build, score, nelbo)


@torch.no_grad()
def bridge_nelbo(model, before: str, bridge: str, after: str, *, samples: int = 8, seed: int = 0) -> float:
    """NELBO per token (nats) of ``bridge`` between ``before`` and ``after``, laid out as infill lays out
    text (``[BOS] before bridge after [EOS]``, pieces tokenized apart): the masked-diffusion bound with
    only the bridge noised, averaged over ``samples`` stratified times and fixed masks."""
    tpl = model.template
    head = [tpl.bos_id] if tpl.bos_id is not None else []
    left, middle, right = tpl.encode_text(before), tpl.encode_text(bridge), tpl.encode_text(after)
    row = head + left + middle + right + [tpl.eos_id]
    start = len(head) + len(left)
    device = next(model.parameters()).device
    ids = torch.tensor([row] * samples, device=device)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, start:start + len(middle)] = True
    t = (torch.arange(samples, device=device, dtype=torch.float32) + 0.5) / samples
    uniforms = counter_uniform(seed, 0, torch.arange(samples, device=device), ids.shape[1]).to(device)
    was_training = model.training
    model.eval()
    try:
        out = masked_diffusion_nelbo(model.denoise, ids, torch.ones_like(ids), loss_mask, t, model.schedule,
                                     tpl.mask_id, uniforms=uniforms)
    finally:
        model.train(was_training)
    return float(out.seq_nelbo.sum() / out.seq_tokens.sum())
