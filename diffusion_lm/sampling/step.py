"""One denoising step of the sampler, cut into named parts (plain torch, no Lightning).

:func:`~diffusion_lm.sampling.loop.generate` and :func:`~diffusion_lm.sampling.loop.infill` decode
rows in chunks; each chunk is a :class:`Canvas` (its state, on the CPU) and every forward pass is:

1. :func:`forward` -- the active rows, trimmed to their width: the window picks the slots that may
   be decided, only those are queried, the denoiser returns their logits (a :class:`Step`);
2. :func:`decide` -- logits processors edit the logits, the proposer picks a token per slot, the
   scorer ranks the slots (a :class:`Decisions`, as Python lists);
3. :func:`advance_row`, per active row -- the selector chooses how many to commit
   (:func:`choose`), step checkers veto same-step conflicts (:func:`pick`), the tokens are written
   (:func:`commit`), the stop rule ends the row at its first EOS (:func:`stop_at_eos`) and the
   remasker may re-open a few committed slots (:func:`remask`).

The state lives on the CPU (a few KB); only the active sub-batch travels to the denoiser's device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..denoiser import Denoiser
from .config import SamplerConfig
from .context import StepContext
from .policies import NoRemasker, Remasker
from .trajectory import Trajectory, TrajectoryStep

__all__ = ["Canvas", "Decisions", "GenerationStats", "RowState", "RowStats", "Step", "advance_row", "decide",
           "forward", "pick"]


@dataclass
class RowStats:
    """Cost of one row: forward passes it took part in, tokens the sampler committed (EOS included,
    pad filler not), tokens re-masked, and seconds from the start of its batch until it finished."""

    nfe: int = 0
    tokens: int = 0
    remasked: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.nfe if self.nfe else 0.0


@dataclass
class GenerationStats:
    """Cost of a whole call.

    Attributes:
        nfe: denoiser calls (batched forward passes).
        row_forwards: rows summed over those calls (the compute actually spent, in row-forwards).
        tokens: tokens committed over all rows.
        seconds: wall time of the call.
    """

    nfe: int = 0
    row_forwards: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens committed per denoiser call (batch parallelism included)."""
        return self.tokens / self.nfe if self.nfe else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RowState:
    """Per-row decoding state: its editable slots, the remasker's budget, the window it is in, the
    step inside that window, the selector's plan, the slots re-opened since the last step, whether
    EOS was committed, and its running cost."""

    total_slots: int
    remask: dict
    window: Optional[int] = None
    step: int = 0
    plan: Optional[list[int]] = None
    carry: int = 0
    has_eos: bool = False
    stats: RowStats = field(default_factory=RowStats)


@dataclass
class Canvas:
    """One chunk of rows being decoded, right-padded to ``width`` with ``attention_mask = 0``.

    ``ids`` holds the current tokens (``mask_id`` at undecided editable slots), ``masked`` the editable
    slots still masked, ``confidence`` each committed slot's probability at commit time (for the
    remasker), ``generators`` the per-row random streams (made on the logits device at the first
    forward).
    """

    rows: list[int]
    lengths: list[int]
    ids: torch.Tensor
    attn: torch.Tensor
    editable: torch.Tensor
    region: torch.Tensor
    masked: torch.Tensor
    confidence: torch.Tensor
    states: list[RowState]
    generators: list[Optional[torch.Generator]]
    t0: float
    flexible: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, chunk: list[int], rows: list[list[int]], editable_rows: list[list[bool]],
              region_rows: list[list[bool]], row_stats: list[RowStats], remasker: Remasker, *, mask_id: int,
              pad_id: int, flexible_rows: Optional[list[list[bool]]] = None) -> "Canvas":
        """The canvas of rows ``chunk``; each row's stats object is shared with ``row_stats``.
        ``flexible_rows`` marks the slots of variable-length infill holes (None: no such holes)."""
        t0 = time.perf_counter()
        b = len(chunk)
        lengths = [len(rows[g]) for g in chunk]
        width = max(lengths)
        ids = torch.full((b, width), pad_id, dtype=torch.long)
        attn = torch.zeros((b, width), dtype=torch.long)
        editable = torch.zeros((b, width), dtype=torch.bool)
        region = torch.zeros((b, width), dtype=torch.bool)
        for r, g in enumerate(chunk):
            n = lengths[r]
            ids[r, :n] = torch.tensor(rows[g], dtype=torch.long)
            attn[r, :n] = 1
            editable[r, :n] = torch.tensor(editable_rows[g], dtype=torch.bool)
            region[r, :n] = torch.tensor(region_rows[g], dtype=torch.bool)
        ids[editable] = mask_id
        states = [RowState(int(editable[r].sum()),
                           remasker.start_row(int(editable[r].sum()))) for r in range(b)]
        for r, g in enumerate(chunk):
            states[r].stats = row_stats[g]
        flexible = None
        if flexible_rows is not None:
            flexible = torch.zeros((b, width), dtype=torch.bool)
            for r, g in enumerate(chunk):
                flexible[r, : lengths[r]] = torch.tensor(flexible_rows[g], dtype=torch.bool)
        return cls(list(chunk), lengths, ids, attn, editable, region, editable.clone(),
                   torch.zeros((b, width), dtype=torch.float32), states, [None] * b, t0, flexible)

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def pending(self) -> list[int]:
        """Chunk rows with slots to decide."""
        return [r for r, st in enumerate(self.states) if st.total_slots > 0]

    def max_forwards(self) -> int:
        """Every forward commits >= 1 token per active row and remasking is budgeted: a loop bound."""
        return max([s.total_slots + s.remask.get("left", 0) for s in self.states] + [0]) + 1

    def row_ids(self, r: int) -> list[int]:
        """Chunk row ``r``'s current ids, without batch padding."""
        return self.ids[r, : self.lengths[r]].tolist()


@dataclass
class Step:
    """One forward over the active rows (``active``: chunk row indices), trimmed to ``width``: the
    step context, the logits at the queried slots, each row's window (id and slots), its number of
    queried slots and the queried positions (in ``ctx.q_rows`` order)."""

    active: list[int]
    width: int
    ctx: StepContext
    logits: torch.Tensor
    in_window: torch.Tensor
    window: list[int]
    counts: list[int]
    positions: list[int]


@dataclass
class Decisions:
    """Per queried slot, in ``ctx.q_rows`` order: its proposed token, score and (when the remasker
    needs it) the proposal's probability; per active row, its tokens before the step and the
    positions holding answer text (when a processor checks same-step commits)."""

    tokens: list[int]
    scores: list[float]
    probs: Optional[list[float]]
    ids: Optional[list[list[int]]] = None
    usable: Optional[list[list[bool]]] = None


def _generators(canvas: Canvas, active: list[int], row_seeds: list[int], device: torch.device) -> list:
    for r in active:
        if canvas.generators[r] is None:
            canvas.generators[r] = torch.Generator(device=device).manual_seed(row_seeds[canvas.rows[r]])
    return [canvas.generators[r] for r in active]


def forward(denoiser: Denoiser, canvas: Canvas, active: list[int], config: SamplerConfig, *,
            device: torch.device, row_seeds: list[int], total: GenerationStats, mask_id: int, eos_id: int,
            pad_id: int) -> Step:
    """Query the masked slots of the active rows' windows and call the denoiser once."""
    sel = torch.tensor(active)
    w = max(canvas.lengths[r] for r in active)  # trim the batch padding of rows that finished
    s_ids, s_attn = canvas.ids[sel, :w], canvas.attn[sel, :w]
    s_edit, s_masked, s_region = canvas.editable[sel, :w], canvas.masked[sel, :w], canvas.region[sel, :w]
    window_ids, in_window = config.window(s_edit, s_masked)
    query = s_masked & in_window
    q_rows_cpu, q_pos_cpu = query.nonzero(as_tuple=True)
    counts = query.sum(dim=1).tolist()

    logits = denoiser(s_ids.to(device), s_attn.to(device), query.to(device))
    n_query = int(q_rows_cpu.numel())
    if logits.dim() != 2 or logits.shape[0] != n_query:
        raise ValueError(
            f"denoiser returned logits of shape {tuple(logits.shape)}; expected [N, V] with "
            f"N = query.sum() = {n_query} (logits only at the queried slots, row-major order)"
        )
    total.nfe += 1
    total.row_forwards += len(active)
    ldev = logits.device
    ctx = StepContext(
        ids=s_ids.to(ldev), attention_mask=s_attn.to(ldev), editable=s_edit.to(ldev),
                      masked=s_masked.to(ldev),
        region=s_region.to(ldev), query=query.to(ldev), q_rows=q_rows_cpu.to(ldev), q_pos=q_pos_cpu.to(ldev),
        mask_id=mask_id, eos_id=eos_id, pad_id=pad_id,
                      generators=_generators(canvas, active, row_seeds, ldev),
        ids_cpu=s_ids, region_cpu=s_region, known_cpu=s_attn.bool() & ~s_masked,
        flexible=None if canvas.flexible is None else canvas.flexible[sel, :w].to(ldev),
    )
    return Step(active, w, ctx, logits, in_window, window_ids.tolist(), counts, q_pos_cpu.tolist())


def apply_processors(raw: torch.Tensor, processors: list, ctx: StepContext) -> torch.Tensor:
    """The logits after the processors; a slot where every token is banned keeps the model's own."""
    if not processors:
        return raw
    processed = raw.clone()
    for processor in processors:
        processed = processor(processed, ctx)
    dead = torch.isneginf(processed.max(dim=-1).values)
    if bool(dead.any()):
        processed[dead] = raw[dead]
    return processed


def _ranking_logits(raw: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """The model's own (unprocessed, untempered) logits with pad filler and EOS counted as one "the
    answer has ended" event: a content token proposed in the padded tail (where the model puts its
    mass on filler) then ranks last instead of being renormalised into a confident-looking junk token."""
    if eos_id == pad_id:
        return raw
    score_logits = raw.clone()
    score_logits[:, eos_id] = torch.logaddexp(raw[:, eos_id], raw[:, pad_id])
    score_logits[:, pad_id] = float("-inf")
    return score_logits


def decide(step: Step, config: SamplerConfig, processors: list, needs_confidence: bool) -> Decisions:
    """Propose a token for every queried slot and score it."""
    ctx = step.ctx
    raw = step.logits.float()
    processed = apply_processors(raw, processors, ctx)
    proposals = config.proposer(processed, ctx)
    scores = config.scorer(_ranking_logits(raw, ctx.eos_id, ctx.pad_id), proposals, ctx)
    probs = None
    if needs_confidence:
        probs = processed.log_softmax(dim=-1).gather(-1, proposals[:, None]).squeeze(-1).exp().tolist()
    out = Decisions(proposals.tolist(), scores.tolist(), probs)
    if processors:  # inputs of the processors' same-step checkers
        s_ids = ctx.ids_cpu
        out.usable = (ctx.known_cpu & ctx.region_cpu & (s_ids != ctx.eos_id) & (s_ids != ctx.pad_id)).tolist()
        out.ids = s_ids.tolist()
    return out


def pick(order: list[int], pos: list[int], tok: list[int], k: int, exact: bool, checkers: list) -> list[int]:
    """Indices (into the row's candidates) to commit: the ``k`` best by ``order``, skipping candidates a
    step checker vetoes (e.g. a duplicate of a neighbour committed in the same step). ``exact``
    refills skipped candidates if the count would otherwise fall short; otherwise only the ``k``
    best are considered (threshold: the skipped ones wait for the next step)."""
    if not checkers:
        return order[:k]
    chosen: list[int] = []
    skipped: list[int] = []
    for i in order if exact else order[:k]:
        if len(chosen) == k:
            break
        if all(c.allows(pos[i], tok[i]) for c in checkers):
            chosen.append(i)
            for c in checkers:
                c.accept(pos[i], tok[i])
        else:
            skipped.append(i)
    if exact and len(chosen) < k:
        chosen += skipped[: k - len(chosen)]
    return chosen or order[:1]  # progress guarantee: every step commits at least one slot


@dataclass
class _Row:
    """One active row's candidates at this step (slices of :class:`Decisions`)."""

    j: int
    r: int
    pos: list[int]
    tok: list[int]
    score: list[float]
    prob: Optional[list[float]]


def choose(st: RowState, row: _Row, window: int, config: SamplerConfig, checkers: list) -> list[int]:
    """The candidates to commit: the selector's count (planned anew when the row enters a window) of
    the best-scored slots, with the step checkers' vetoes."""
    k_n = len(row.pos)
    if st.window != window:
        st.window, st.step, st.carry = window, 0, 0
        st.plan = config.selector.plan(k_n, st.total_slots)
    order = sorted(range(k_n), key=lambda i: -row.score[i])  # stable: ties go left to right
    k, exact = config.selector.quota([row.score[i] for i in order], st.plan, st.step, st.carry)
    st.carry = 0
    st.step += 1
    return pick(order, row.pos, row.tok, max(1, min(k, k_n)), exact, checkers)


def commit(canvas: Canvas, row: _Row, chosen: list[int], record: Optional[TrajectoryStep]) -> set[int]:
    """Write the chosen tokens; returns their positions."""
    r = row.r
    committed_now = set()
    for i in chosen:
        p = row.pos[i]
        canvas.ids[r, p] = row.tok[i]
        canvas.masked[r, p] = False
        committed_now.add(p)
        if row.prob is not None:
            canvas.confidence[r, p] = row.prob[i]
        if record is not None:
            record.committed.append((p, row.tok[i]))
    return committed_now


def stop_at_eos(canvas: Canvas, r: int, eos_id: int, pad_id: int, record: Optional[TrajectoryStep]) -> None:
    """Stop rule: the answer ends at its first EOS; the rest of the canvas becomes filler."""
    canvas.states[r].has_eos = True
    editable = canvas.editable[r]
    is_eos = editable & ~canvas.masked[r] & (canvas.ids[r] == eos_id)
    first = int(is_eos.nonzero()[0, 0])
    tail = editable.clone()
    tail[: first + 1] = False
    if record is not None:
        record.filled = tail.nonzero().flatten().tolist()
    canvas.ids[r, tail] = pad_id
    canvas.masked[r, tail] = False


def remask(canvas: Canvas, step: Step, row: _Row, remasker: Remasker, committed_now: set[int], *,
           mask_id: int, eos_id: int, pad_id: int, record: Optional[TrajectoryStep]) -> None:
    """Let the remasker re-open low-confidence committed slots of the row's current window."""
    r, st = row.r, canvas.states[row.r]
    in_win = torch.zeros(canvas.width, dtype=torch.bool)
    in_win[: step.width] = step.in_window[row.j]
    if not bool((canvas.masked[r] & in_win).any()):  # never delay a window that is complete
        return
    ids = canvas.ids[r]
    cand_mask = in_win & canvas.editable[r] & ~canvas.masked[r] & (ids != eos_id) & (ids != pad_id)
    candidates = [(p, float(canvas.confidence[r, p])) for p in cand_mask.nonzero().flatten().tolist()
                  if p not in committed_now]
    reopened = remasker.choose(candidates, st.remask, canvas.generators[r])  # type: ignore[arg-type]
    if reopened:
        canvas.ids[r, reopened] = mask_id
        canvas.masked[r, reopened] = True
        st.carry += len(reopened)
        st.stats.remasked += len(reopened)
        if record is not None:
            record.remasked = list(reopened)


def advance_row(canvas: Canvas, step: Step, row: _Row, decisions: Decisions, config: SamplerConfig,
                processors: list, *, stop_on_eos: bool, mask_id: int, eos_id: int, pad_id: int,
                trajectory: Optional[Trajectory]) -> bool:
    """Commit, stop and remask one active row; returns whether it still has masked slots."""
    r, st = row.r, canvas.states[row.r]
    checkers = []
    if processors:
        made = (p.step_checker(decisions.ids[row.j], decisions.usable[row.j], step.ctx) for p in processors)
        checkers = [c for c in made if c is not None]
    chosen = choose(st, row, step.window[row.j], config, checkers)
    record = TrajectoryStep(forward=st.stats.nfe) if trajectory is not None else None
    st.stats.nfe += 1
    st.stats.tokens += len(chosen)
    committed_now = commit(canvas, row, chosen, record)
    if stop_on_eos and not st.has_eos and any(row.tok[i] == eos_id for i in chosen):
        stop_at_eos(canvas, r, eos_id, pad_id, record)
    if not isinstance(config.remasker, NoRemasker) and not st.has_eos:
        remask(canvas, step, row, config.remasker, committed_now, mask_id=mask_id, eos_id=eos_id,
               pad_id=pad_id, record=record)
    if record is not None:
        trajectory.steps.append(record)  # type: ignore[union-attr]
    if bool(canvas.masked[r].any()):
        return True
    st.stats.seconds = time.perf_counter() - canvas.t0
    return False


def rows_of(step: Step, decisions: Decisions) -> list[_Row]:
    """The active rows' candidate slices, in row order (queries are grouped by row)."""
    out, offset = [], 0
    for j, (r, n) in enumerate(zip(step.active, step.counts)):
        probs = decisions.probs[offset:offset + n] if decisions.probs is not None else None
        out.append(_Row(j, r, step.positions[offset:offset + n], decisions.tokens[offset:offset + n],
                        decisions.scores[offset:offset + n], probs))
        offset += n
    return out
