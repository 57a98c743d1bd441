"""The vectorised sampling step: the same decisions as :mod:`~diffusion_lm.sampling.step`, as tensor ops.

The plain step (``step.py``) walks every active row, and inside a row every candidate slot, in
Python: sorting, the selector's count, the repetition guard's same-step checks, the commit, the stop
rule. At batch 16 x 256 answer slots that Python work costs more than a small model's forward pass,
and on a GPU every per-row ``.tolist()`` is a host-device sync. This module keeps the whole chunk's
state in tensors on the sampler's device and does the per-step work after the forward for all rows
at once:

* logits processors as tensor ops (the repetition guard's n-gram ban included,
  :func:`~diffusion_lm.sampling.ngrams.ngram_bans`);
* per-row ranking by one stable sort of a ``[rows, slots]`` score table;
* the selector's count per row in closed form (:class:`ScheduleSelector` with the default
  log-linear schedule: ``floor(n (s+1) / S) - floor(n s / S)``; :class:`ThresholdSelector`);
* the repetition guard's same-step rules (:func:`~diffusion_lm.sampling.ngrams.ngram_allowed`, no
  identical neighbours): with one
  token per row per step they reduce to "the best candidate its n-gram rule allows", one tensor op;
  when a row commits several tokens in a step the rows advance together through their ranked
  candidates, one rank per iteration (at most the step's largest count, not one per row);
* commit, the EOS stop rule and the per-row counters as scatters.

It gives the same ids as the plain step for the same seed (``tests/test_sampling_fast.py``): the
same proposer and scorer run on the same logits, and every rule above is the plain step's rule.
:func:`supports` says when it applies; other configurations (a remasker, a custom selector,
schedule or logits processor, the random scorer, trajectories) run the plain step.
``SamplerConfig(vectorized=False)`` turns it off.

Host-device syncs: a few per step (the step's width, the query count, the largest count of
candidates), none per row. The sampling proposer still draws its Gumbel noise from one generator
per row (:class:`~diffusion_lm.sampling.policies.SampleProposer`), which keeps a row's draws
independent of its batch neighbours: one small random call per row per step.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from ..denoiser import Denoiser
from .config import SamplerConfig
from .context import StepContext
from .policies import (
    EntropyScorer,
    GreedyProposer,
    MarginScorer,
    NoRemasker,
    ProbabilityScorer,
    SampleProposer,
    ScheduleSelector,
    ThresholdSelector,
)
from .ngrams import ngram_allowed
from .processors import EosPolicy, RepetitionGuard, SuppressTokens
from .step import Canvas, GenerationStats, RowStats, _ranking_logits, apply_processors

__all__ = ["decode_chunk_fast", "supports"]

_PROCESSORS = (EosPolicy, RepetitionGuard, SuppressTokens)
_SCORERS = (ProbabilityScorer, MarginScorer, EntropyScorer)


def supports(config: SamplerConfig, processors: list, return_trajectory: bool) -> bool:
    """Whether the vectorised step reproduces the plain step for this sampler."""
    if not getattr(config, "vectorized", True) or return_trajectory:
        return False
    selector = config.selector
    schedule_ok = isinstance(selector, ScheduleSelector) and selector.schedule is None
    return (type(config.remasker) is NoRemasker and (schedule_ok or type(selector) is ThresholdSelector)
            and type(config.proposer) in (GreedyProposer, SampleProposer)
            and type(config.scorer) in _SCORERS and all(type(p) in _PROCESSORS for p in processors))


# ------------------------------------------------------------------------------------------ selection
def _guards(processors: list) -> list[RepetitionGuard]:
    return [p for p in processors if isinstance(p, RepetitionGuard)
            and (p.no_adjacent_duplicates or p.ngram_size >= 2)]


def _quota(config: SamplerConfig, st: dict, rows: torch.Tensor, window: torch.Tensor, counts: torch.Tensor,
           table: torch.Tensor) -> torch.Tensor:
    """Tokens each active row commits this step (the selector's ``quota``, clamped to ``[1, count]``)."""
    selector = config.selector
    if isinstance(selector, ThresholdSelector):
        k = (table >= selector.threshold).sum(dim=1).clamp_min(1)
    else:
        entering = st["window"][rows] != window
        total = st["total"][rows]
        if selector.steps is None:
            planned = counts
        else:
            planned = (selector.steps * counts + total.clamp_min(1) - 1) // total.clamp_min(1)
        planned = torch.minimum(planned.clamp_min(1), counts.clamp_min(1))
        st["window"][rows] = window
        st["step"][rows] = torch.where(entering, 0, st["step"][rows])
        st["plan_n"][rows] = torch.where(entering, counts, st["plan_n"][rows])
        st["plan_s"][rows] = torch.where(entering, planned, st["plan_s"][rows])
        s, n_w, s_w = st["step"][rows], st["plan_n"][rows], st["plan_s"][rows]
        k = torch.where(s < s_w, (n_w * (s + 1)) // s_w - (n_w * s) // s_w, counts)
        st["step"][rows] = s + 1
    return torch.minimum(k, counts).clamp_min(1)


def _choose(order: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor,
            k: torch.Tensor, exact: bool, guards: list[RepetitionGuard], ctx: StepContext) -> torch.Tensor:
    """``[b, C]`` bool over ranks: which ranked candidates to commit (``pick`` in ``step.py``)."""
    b, c = order.shape
    rank = torch.arange(c, device=order.device)[None, :].expand(b, c)
    if not guards:
        return rank < k[:, None]
    specials = (ctx.eos_id, ctx.pad_id)
    ids = ctx.ids.clone()
    usable = ctx.known & ctx.region & (ids != ctx.eos_id) & (ids != ctx.pad_id)
    rows = torch.arange(b, device=order.device)[:, None].expand(b, c)
    if int(k.max()) == 1:
        # One token per row: nothing was committed before it in this step, so only the n-gram rule
        # can veto it; an exact count takes the best candidate the rule allows, a threshold the best.
        if not exact:
            return rank == 0
        # The processors already banned what the n-gram rule forbids, so the best candidate almost
        # always passes: check it first, and every candidate only when some row's best is vetoed.
        top = rows[:, 0]
        top_ok = torch.ones_like(valid[:, 0])
        for guard in guards:
            if guard.ngram_size >= 2:
                top_ok &= ngram_allowed(ids, usable, top, pos[:, 0], tok[:, 0], guard.ngram_size, specials)
        if bool(top_ok.all()):
            return rank == 0
        allowed = valid.clone()
        for guard in guards:
            if guard.ngram_size >= 2:
                allowed[valid] &= ngram_allowed(ids, usable, rows[valid], pos[valid], tok[valid],
                                                guard.ngram_size, specials)
        first = torch.where(allowed, rank, torch.full_like(rank, c)).min(dim=1).values
        first = torch.where(first == c, torch.zeros_like(first), first)
        return rank == first[:, None]
    return _choose_sequential(rank, valid, pos, tok, k, exact, guards, ids, usable, specials)


def _choose_sequential(rank: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor,
                       k: torch.Tensor, exact: bool, guards: list[RepetitionGuard], ids: torch.Tensor,
                       usable: torch.Tensor, specials: tuple[int, int]) -> torch.Tensor:
    """Several tokens per row: all rows walk their ranked candidates together, one rank per
    iteration, accepting a candidate unless a same-step rule vetoes it (``pick`` in ``step.py``)."""
    b, c = rank.shape
    dev = rank.device
    all_rows = torch.arange(b, device=dev)
    chosen = torch.zeros(b, c, dtype=torch.bool, device=dev)
    skipped = torch.zeros_like(chosen)
    taken = torch.zeros(b, dtype=torch.long, device=dev)
    now = torch.full_like(ids, -1)  # tokens committed earlier in this step
    w = ids.shape[1]
    limit = valid.sum(dim=1) if exact else k
    for i in range(int(limit.max())):
        live = valid[:, i] & (taken < k) & (i < limit)
        p, t = pos[:, i], tok[:, i]
        ok = live.clone()
        if any(g.no_adjacent_duplicates for g in guards):
            left = torch.where(p > 0, now[all_rows, (p - 1).clamp_min(0)], -1)
            right = torch.where(p < w - 1, now[all_rows, (p + 1).clamp_max(w - 1)], -1)
            ok &= (left != t) & (right != t)
        for guard in guards:
            if guard.ngram_size >= 2:
                ok &= ngram_allowed(ids, usable, all_rows, p, t, guard.ngram_size, specials)
        accept = live & ok
        chosen[:, i] = accept
        skipped[:, i] = live & ~ok
        taken += accept.long()
        r_acc, p_acc, t_acc = all_rows[accept], p[accept], t[accept]
        now[r_acc, p_acc] = t_acc
        ids[r_acc, p_acc] = t_acc
        usable[r_acc, p_acc] = (t_acc != specials[0]) & (t_acc != specials[1])
    if exact:  # refill from the vetoed candidates, best first, when the count would fall short
        deficit = (k - taken).clamp_min(0)
        chosen |= skipped & (skipped.long().cumsum(dim=1) <= deficit[:, None])
    none = ~chosen.any(dim=1)
    chosen[none, 0] = True  # progress guarantee: at least the best candidate
    return chosen


# -------------------------------------------------------------------------------------------- the loop
def decode_chunk_fast(
    denoiser: Denoiser,
    chunk: list[int],
    canvas: Canvas,
    config: SamplerConfig,
    processors: list,
    row_stats: list[RowStats],
    total: GenerationStats,
    *,
    mask_id: int,
    eos_id: int,
    pad_id: int,
    stop_on_eos: bool,
    row_seeds: list[int],
    device: torch.device,
    on_step: Optional[Callable[[list[int], list[list[int]]], None]],
) -> None:
    """Decode ``canvas`` (the rows ``chunk``) to the end with the vectorised step; the canvas holds
    the final ids afterwards and ``row_stats``/``total`` the costs, as the plain loop leaves them."""
    dev = device
    ids, attn = canvas.ids.to(dev), canvas.attn.to(dev)
    editable, region, masked = canvas.editable.to(dev), canvas.region.to(dev), canvas.masked.to(dev)
    b, width = ids.shape
    lengths = torch.tensor(canvas.lengths, device=dev)
    total_slots = editable.sum(dim=1)
    st = {"window": torch.full((b,), -1, dtype=torch.long, device=dev), "total": total_slots,
          "step": torch.zeros(b, dtype=torch.long, device=dev), "plan_n": torch.zeros_like(total_slots),
          "plan_s": torch.ones_like(total_slots)}
    nfe = torch.zeros(b, dtype=torch.long, device=dev)
    tokens = torch.zeros(b, dtype=torch.long, device=dev)
    has_eos = torch.zeros(b, dtype=torch.bool, device=dev)
    finished_at = torch.zeros(b, dtype=torch.float64)
    guards = _guards(processors)
    exact = isinstance(config.selector, ScheduleSelector)
    positions = torch.arange(width, device=dev)
    active = (total_slots > 0).nonzero().flatten()
    max_forwards = int(total_slots.max()) + 1 if b else 0
    for n_forward in range(max_forwards + 1):
        if active.numel() == 0:
            break
        if n_forward == max_forwards:
            raise RuntimeError("sampler did not terminate within its step bound")
        w = int(lengths[active].max())
        s_ids, s_attn = ids[active, :w], attn[active, :w]
        s_edit, s_masked, s_region = editable[active, :w], masked[active, :w], region[active, :w]
        window_ids, in_window = config.window(s_edit, s_masked)
        query = s_masked & in_window
        q_rows, q_pos = query.nonzero(as_tuple=True)
        logits = denoiser(s_ids, s_attn, query)
        if logits.dim() != 2 or logits.shape[0] != q_rows.numel():
            raise ValueError(f"denoiser returned logits of shape {tuple(logits.shape)}; expected [N, V] with "
                             f"N = query.sum() = {q_rows.numel()} (logits only at the queried slots)")
        total.nfe += 1
        total.row_forwards += int(active.numel())
        gens = [canvas.generators[r] for r in active.tolist()] if isinstance(config.proposer,
                                                                               SampleProposer) else []
        if gens and gens[0] is None:  # made once per chunk, seeded per row as in the plain step
            for r in active.tolist():
                canvas.generators[r] = torch.Generator(device=logits.device).manual_seed(row_seeds[chunk[r]])
            gens = [canvas.generators[r] for r in active.tolist()]
        known = s_attn.bool() & ~s_masked
        ctx = StepContext(ids=s_ids, attention_mask=s_attn, editable=s_edit, masked=s_masked, region=s_region,
                          query=query, q_rows=q_rows, q_pos=q_pos, mask_id=mask_id, eos_id=eos_id,
                          pad_id=pad_id, generators=gens, ids_cpu=s_ids, region_cpu=s_region, known_cpu=known,
                          vectorized=True)
        raw = logits.float()
        proposals = config.proposer(apply_processors(raw, processors, ctx), ctx)
        scores = config.scorer(_ranking_logits(raw, eos_id, pad_id), proposals, ctx)

        # Candidates as a [rows, slots] table in query order, ranked by a stable sort (ties: left first).
        counts = query.sum(dim=1)
        c = int(counts.max())
        starts = counts.cumsum(0) - counts
        slot = torch.arange(q_rows.numel(), device=dev) - starts[q_rows]
        table = torch.full((active.numel(), c), float("-inf"), device=dev)
        table[q_rows, slot] = scores.to(dev).float()
        valid = torch.zeros_like(table, dtype=torch.bool)
        valid[q_rows, slot] = True
        pos_t = torch.zeros_like(valid, dtype=torch.long)
        pos_t[q_rows, slot] = q_pos
        tok_t = torch.zeros_like(pos_t)
        tok_t[q_rows, slot] = proposals.to(dev)
        order = torch.sort(table, dim=1, descending=True, stable=True).indices
        k = _quota(config, st, active, window_ids, counts, torch.where(valid, table, float("-inf")))
        ranked = lambda x: x.gather(1, order)  # noqa: E731
        chosen = _choose(order, ranked(valid), ranked(pos_t), ranked(tok_t), k, exact, guards, ctx)
        chosen &= ranked(valid)

        # Commit, count, stop at EOS.
        r_local, rank_i = chosen.nonzero(as_tuple=True)
        rows_g = active[r_local]
        p_c, t_c = ranked(pos_t)[r_local, rank_i], ranked(tok_t)[r_local, rank_i]
        ids[rows_g, p_c] = t_c
        masked[rows_g, p_c] = False
        nfe[active] += 1
        tokens.index_add_(0, rows_g, torch.ones_like(rows_g))
        if stop_on_eos:
            hit = torch.zeros(b, dtype=torch.bool, device=dev)
            hit[rows_g[t_c == eos_id]] = True
            stop = hit & ~has_eos
            is_eos = editable & ~masked & (ids == eos_id) & stop[:, None]
            first = torch.where(is_eos, positions, width).min(dim=1).values
            tail = editable & (positions[None, :] > first[:, None]) & stop[:, None]
            ids[tail] = pad_id
            masked[tail] = False
            has_eos |= stop
        if on_step is not None:
            rows_l = active.tolist()
            on_step([chunk[r] for r in rows_l], [ids[r, : canvas.lengths[r]].tolist() for r in rows_l])
        still = masked[active].any(dim=1)
        done = active[~still]
        if done.numel():
            finished_at[done.cpu()] = time.perf_counter() - canvas.t0
        active = active[still]
    canvas.ids, canvas.masked = ids.cpu(), masked.cpu()
    for r, g in enumerate(chunk):  # once per chunk, after decoding
        stats = row_stats[g]
        stats.nfe += int(nfe[r])
        stats.tokens += int(tokens[r])
        if total_slots[r] > 0:
            stats.seconds = float(finished_at[r])
