"""The sampling loop: ``generate`` (answer prompts on a [MASK] canvas) and ``infill`` (fill holes).

Plain torch; any callable with the denoiser contract (:class:`~diffusion_lm.denoiser.Denoiser`:
logits only at the queried slots, [MASK] at ``-inf``) works; ``MaskedDiffusionLM.denoise`` is one.

Per step and per active row: the window picks the slots that may be decided, only those are queried,
logits processors edit the logits, the proposer picks a token per slot, the scorer ranks the slots,
the selector commits the best ones, the remasker may re-open a few, and the stop rule ends the row
(EOS committed: the rest of its canvas becomes pad; or no masked slot left). Finished rows are
dropped from the batch passed to the denoiser (dLLM PR #68 review: done rows kept being computed).

Reproducibility: every row has its own ``torch.Generator`` seeded from ``(seed, row index)`` and all
per-row decisions read only that row. Rows are right-padded after their canvas with
``attention_mask = 0``; prompts are never left-padded (dLLM leaked left-padded prompts into
outputs, PR #86/#87). Batch-size invariance, precisely: when the denoiser's logits for a row are
bitwise independent of the rest of the batch (its other rows, size and padded width), batched
generation equals one-by-one generation (``max_batch_size=1``) exactly, for the same seed and row
order. A real encoder's kernels round differently for different batch shapes, thread counts and
CPUs, so with it batched and single answers agree wherever the model is sure and may differ at
near-tied logits (an untrained model); see ``docs/sampling.md``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from ..denoiser import Denoiser
from ..errors import ConfigError
from ..seeding import row_seed
from .config import SamplerConfig
from .context import StepContext
from .policies import NoRemasker
from .trajectory import Trajectory, TrajectoryStep

__all__ = ["Denoiser", "RowStats", "GenerationStats", "GenerationResult", "generate", "infill", "row_seed"]


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
class GenerationResult:
    """Output of :func:`generate` / :func:`infill`.

    Attributes:
        ids: per row, the answer ids (``generate``: canvas cut at the first EOS, EOS excluded, pad
            stripped) or the filled sequence (``infill``: every non-hole token unchanged).
        sequences: per row, the final full row (prompt + canvas, pad filler included).
        row_stats: per-row cost; ``stats``: whole-call cost.
        seed: the base seed used (drawn at random when ``seed=None``; pass it back to reproduce).
        trajectories: per row, the decoding history (``return_trajectory=True``).
        texts: decoded answers, filled in by callers that own a tokenizer (the model's ``generate``).
    """

    ids: list[list[int]]
    sequences: list[list[int]]
    row_stats: list[RowStats]
    stats: GenerationStats
    seed: int
    trajectories: Optional[list[Trajectory]] = None
    texts: Optional[list[str]] = None


def _infer_device(denoiser: Denoiser, device: Union[None, str, torch.device]) -> torch.device:
    if device is not None:
        return torch.device(device)
    owner = denoiser if isinstance(denoiser, torch.nn.Module) else getattr(denoiser, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        for tensor in owner.parameters():
            return tensor.device
        for tensor in owner.buffers():
            return tensor.device
    return torch.device("cpu")


def _as_rows(rows: Sequence[Sequence[int]], what: str) -> list[list[int]]:
    if isinstance(rows, torch.Tensor):
        raise ConfigError(f"{what} must be a list of id lists (rows may differ in length), not a tensor; use .tolist()")
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)) or len(rows) == 0:
        raise ConfigError(f"{what} must be a non-empty list of token-id lists, got {type(rows).__name__} of length "
                          f"{len(rows) if hasattr(rows, '__len__') else '?'}")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, torch.Tensor)):
            raise ConfigError(f"{what}[{i}] must be a list of token ids (tokenize text first), got {type(row).__name__}")
        out.append([int(t) for t in row])
    return out


def _check_common(max_batch_size: Optional[int]) -> None:
    if max_batch_size is not None and max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    prompts: Sequence[Sequence[int]],
    *,
    mask_id: int,
    eos_id: int,
    pad_id: int,
    canvas_length: int = 64,
    sampler: Union[None, str, SamplerConfig, dict] = None,
    seed: Optional[int] = None,
    return_trajectory: bool = False,
    max_batch_size: Optional[int] = None,
    max_length: Optional[int] = None,
    device: Union[None, str, torch.device] = None,
) -> GenerationResult:
    """Answer each prompt by unmasking ``canvas_length`` [MASK] slots appended after it.

    Args:
        denoiser: the model (see the module docstring for the contract).
        prompts: complete prompt ids per row (BOS and the assistant header already included).
        mask_id, eos_id, pad_id: special ids; the answer ends at EOS, pad fills the canvas after it.
        canvas_length: answer slots per row.
        sampler: a :class:`SamplerConfig`, a preset name (``quality``, ``fast``, ``greedy``), a
            mapping (``SamplerConfig.from_dict``), or None for the default (= ``quality``).
        seed: base seed; row ``i`` draws from ``row_seed(seed, i)``. None draws a fresh one (see ``result.seed``).
        return_trajectory: record every step (for :func:`render_trajectory_html`).
        max_batch_size: rows per denoiser call (None = all at once); results do not depend on it when the
            denoiser is batch-invariant (see the module docstring for a real encoder).
        max_length: the model's longest sequence; a longer prompt + canvas is an error.
        device: where to build the inputs; default: the denoiser's module's device, else CPU.
    """
    prompt_rows = _as_rows(prompts, "prompts")
    if canvas_length <= 0:
        raise ConfigError(f"canvas_length must be >= 1 (answer slots per prompt), got {canvas_length}")
    _check_common(max_batch_size)
    for i, p in enumerate(prompt_rows):
        if mask_id in p:
            raise ConfigError(f"prompt {i} contains the mask id {mask_id} at position {p.index(mask_id)}; "
                              "generate() only fills the appended canvas, use infill() to fill holes")
        if max_length is not None and len(p) + canvas_length > max_length:
            raise ConfigError(
                f"prompt {i} has {len(p)} tokens + canvas_length {canvas_length} = {len(p) + canvas_length}, "
                f"longer than max_length {max_length}; lower canvas_length or shorten the prompt "
                f"(to at most {max_length - canvas_length} tokens)"
            )
    config = SamplerConfig.coerce(sampler)
    rows = [p + [mask_id] * canvas_length for p in prompt_rows]
    editable = [[False] * len(p) + [True] * canvas_length for p in prompt_rows]
    result = _decode(
        denoiser, rows, editable, editable, [len(p) for p in prompt_rows], config,
        mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, stop_on_eos=config.stop_on_eos, eos_policy=True,
        seed=seed, return_trajectory=return_trajectory, max_batch_size=max_batch_size, device=device,
    )
    for i, (seq, start) in enumerate(zip(result.sequences, (len(p) for p in prompt_rows))):
        canvas = seq[start:]
        if eos_id in canvas:
            canvas = canvas[: canvas.index(eos_id)]
        result.ids[i] = [t for t in canvas if t not in (pad_id, mask_id)]
    return result


@torch.no_grad()
def infill(
    denoiser: Denoiser,
    ids: Sequence[Sequence[int]],
    *,
    mask_id: int,
    eos_id: int,
    pad_id: int,
    sampler: Union[None, str, SamplerConfig, dict] = None,
    seed: Optional[int] = None,
    return_trajectory: bool = False,
    max_batch_size: Optional[int] = None,
    max_length: Optional[int] = None,
    device: Union[None, str, torch.device] = None,
    eos_policy: bool = False,
) -> GenerationResult:
    """Fill the ``mask_id`` slots of each row, leaving every other token untouched.

    No canvas is appended and no row is cut: ``result.ids[i]`` is row ``i`` with its holes filled
    (it may contain EOS/pad inside a hole if the model chose them; decode with special tokens
    skipped). The EOS policy (which assumes an answer growing after a prompt) is off unless
    ``eos_policy=True``; a committed EOS never stops an infill row. Other arguments as in :func:`generate`.
    Build rows from text with :func:`diffusion_lm.sampling.spans_to_ids`.
    """
    rows = _as_rows(ids, "ids")
    _check_common(max_batch_size)
    for i, row in enumerate(rows):
        if max_length is not None and len(row) > max_length:
            raise ConfigError(f"row {i} has {len(row)} tokens, longer than max_length {max_length}; "
                              "shorten the text or use fewer mask slots")
    config = SamplerConfig.coerce(sampler)
    editable = [[t == mask_id for t in row] for row in rows]
    region = [[True] * len(row) for row in rows]
    result = _decode(
        denoiser, rows, editable, region, [0] * len(rows), config,
        mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, stop_on_eos=False, eos_policy=eos_policy,
        seed=seed, return_trajectory=return_trajectory, max_batch_size=max_batch_size, device=device,
    )
    result.ids = [list(seq) for seq in result.sequences]
    return result


# ------------------------------------------------------------------------------------------ the loop
@dataclass
class _RowState:
    total_slots: int
    remask: dict
    window: Optional[int] = None
    step: int = 0
    plan: Optional[list[int]] = None
    carry: int = 0
    has_eos: bool = False
    stats: RowStats = field(default_factory=RowStats)


def _decode(
    denoiser: Denoiser,
    rows: list[list[int]],
    editable: list[list[bool]],
    region: list[list[bool]],
    starts: list[int],
    config: SamplerConfig,
    *,
    mask_id: int,
    eos_id: int,
    pad_id: int,
    stop_on_eos: bool,
    eos_policy: bool,
    seed: Optional[int],
    return_trajectory: bool,
    max_batch_size: Optional[int],
    device: Union[None, str, torch.device],
) -> GenerationResult:
    seed = secrets.randbits(63) if seed is None else int(seed)
    dev = _infer_device(denoiser, device)
    processors = config.logits_processors(eos_policy=eos_policy)
    n = len(rows)
    size = max_batch_size or n
    sequences: list[list[int]] = [[] for _ in range(n)]
    row_stats: list[RowStats] = [RowStats() for _ in range(n)]
    trajectories = [Trajectory(list(r), s, mask_id) for r, s in zip(rows, starts)] if return_trajectory else None
    total = GenerationStats()
    t_call = time.perf_counter()
    for lo in range(0, n, size):
        chunk = list(range(lo, min(n, lo + size)))
        _decode_chunk(
            denoiser, chunk, rows, editable, region, config, processors, sequences, row_stats, trajectories, total,
            mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, stop_on_eos=stop_on_eos, seed=seed, device=dev,
        )
    total.seconds = time.perf_counter() - t_call
    total.tokens = sum(s.tokens for s in row_stats)
    return GenerationResult(
        ids=[list(s) for s in sequences], sequences=sequences, row_stats=row_stats, stats=total, seed=seed,
        trajectories=trajectories,
    )


def _pick(order: list[int], pos: list[int], tok: list[int], k: int, exact: bool, checkers: list) -> list[int]:
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


def _decode_chunk(
    denoiser: Denoiser,
    chunk: list[int],
    rows: list[list[int]],
    editable_rows: list[list[bool]],
    region_rows: list[list[bool]],
    config: SamplerConfig,
    processors: list,
    sequences: list[list[int]],
    row_stats: list[RowStats],
    trajectories: Optional[list[Trajectory]],
    total: GenerationStats,
    *,
    mask_id: int,
    eos_id: int,
    pad_id: int,
    stop_on_eos: bool,
    seed: int,
    device: torch.device,
) -> None:
    t0 = time.perf_counter()
    b = len(chunk)
    lengths = [len(rows[g]) for g in chunk]
    width = max(lengths)
    # The state lives on the CPU (a few KB); only the active sub-batch travels to the device.
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    editable = torch.zeros((b, width), dtype=torch.bool)
    region = torch.zeros((b, width), dtype=torch.bool)
    for r, g in enumerate(chunk):
        L = lengths[r]
        ids[r, :L] = torch.tensor(rows[g], dtype=torch.long)
        attn[r, :L] = 1
        editable[r, :L] = torch.tensor(editable_rows[g], dtype=torch.bool)
        region[r, :L] = torch.tensor(region_rows[g], dtype=torch.bool)
    ids[editable] = mask_id
    masked = editable.clone()
    confidence = torch.zeros((b, width), dtype=torch.float32)
    remasker = config.remasker
    needs_confidence = not isinstance(remasker, NoRemasker)
    states = [_RowState(int(editable[r].sum()), remasker.start_row(int(editable[r].sum()))) for r in range(b)]
    for r, g in enumerate(chunk):
        states[r].stats = row_stats[g]
    generators: list[Optional[torch.Generator]] = [None] * b
    active = [r for r in range(b) if states[r].total_slots > 0]
    # Every forward commits >= 1 token per active row and remasking is budgeted, so this bounds the loop.
    max_forwards = max([s.total_slots + s.remask.get("left", 0) for s in states] + [0]) + 1

    for forward in range(max_forwards + 1):
        if not active:
            break
        if forward == max_forwards:
            raise RuntimeError("sampler did not terminate within its step bound (a selector committed nothing?)")
        sel = torch.tensor(active)
        w = max(lengths[r] for r in active)  # trim the batch padding of rows that finished
        s_ids, s_attn = ids[sel, :w], attn[sel, :w]
        s_edit, s_masked, s_region = editable[sel, :w], masked[sel, :w], region[sel, :w]
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
        for r in active:
            if generators[r] is None:
                generators[r] = torch.Generator(device=ldev).manual_seed(row_seed(seed, chunk[r]))
        ctx = StepContext(
            ids=s_ids.to(ldev), attention_mask=s_attn.to(ldev), editable=s_edit.to(ldev), masked=s_masked.to(ldev),
            region=s_region.to(ldev), query=query.to(ldev), q_rows=q_rows_cpu.to(ldev), q_pos=q_pos_cpu.to(ldev),
            mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, generators=[generators[r] for r in active],  # type: ignore[misc]
            ids_cpu=s_ids, region_cpu=s_region, known_cpu=s_attn.bool() & ~s_masked,
        )
        raw = logits.float()
        processed = raw.clone() if processors else raw
        for processor in processors:
            processed = processor(processed, ctx)
        if processors:
            dead = torch.isneginf(processed.max(dim=-1).values)
            if bool(dead.any()):  # every token banned at a slot: fall back to the model's own logits there
                processed[dead] = raw[dead]
        proposals = config.proposer(processed, ctx)
        # Rank on the model's own (unprocessed, untempered) probabilities, with pad filler and EOS
        # counted as one "the answer has ended" event: a content token proposed in the padded tail
        # (where the model puts its mass on filler) then ranks last instead of being renormalised
        # into a confident-looking junk token.
        score_logits = raw
        if eos_id != pad_id:
            score_logits = raw.clone()
            score_logits[:, eos_id] = torch.logaddexp(raw[:, eos_id], raw[:, pad_id])
            score_logits[:, pad_id] = float("-inf")
        scores = config.scorer(score_logits, proposals, ctx)
        prop_l, score_l, pos_l = proposals.tolist(), scores.tolist(), q_pos_cpu.tolist()
        prob_l = None
        if needs_confidence:
            prob_l = processed.log_softmax(dim=-1).gather(-1, proposals[:, None]).squeeze(-1).exp().tolist()
        window_l = window_ids.tolist()
        if processors:  # inputs of the processors' same-step checkers
            usable_l = (ctx.known_cpu & s_region & (s_ids != eos_id) & (s_ids != pad_id)).tolist()
            ids_l = s_ids.tolist()

        offset = 0
        still_active = []
        for j, r in enumerate(active):
            st = states[r]
            k_n = counts[j]
            rpos, rtok = pos_l[offset:offset + k_n], prop_l[offset:offset + k_n]
            rscore = score_l[offset:offset + k_n]
            rprob = prob_l[offset:offset + k_n] if prob_l is not None else None
            offset += k_n
            if st.window != window_l[j]:
                st.window, st.step, st.carry = window_l[j], 0, 0
                st.plan = config.selector.plan(k_n, st.total_slots)
            order = sorted(range(k_n), key=lambda i: -rscore[i])  # stable: ties go left to right
            k, exact = config.selector.quota([rscore[i] for i in order], st.plan, st.step, st.carry)
            st.carry = 0
            st.step += 1
            checkers = [c for c in (p.step_checker(ids_l[j], usable_l[j], ctx) for p in processors) if c is not None] \
                if processors else []
            chosen = _pick(order, rpos, rtok, max(1, min(k, k_n)), exact, checkers)
            step_rec = TrajectoryStep(forward=st.stats.nfe) if trajectories is not None else None
            st.stats.nfe += 1
            st.stats.tokens += len(chosen)
            committed_now = set()
            for i in chosen:
                p = rpos[i]
                ids[r, p] = rtok[i]
                masked[r, p] = False
                committed_now.add(p)
                if rprob is not None:
                    confidence[r, p] = rprob[i]
                if step_rec is not None:
                    step_rec.committed.append((p, rtok[i]))

            if stop_on_eos and not st.has_eos and any(rtok[i] == eos_id for i in chosen):
                # Stop rule: the answer ends at its first EOS; the rest of the canvas becomes filler.
                st.has_eos = True
                is_eos = editable[r] & ~masked[r] & (ids[r] == eos_id)
                first = int(is_eos.nonzero()[0, 0])
                tail = editable[r].clone()
                tail[: first + 1] = False
                if step_rec is not None:
                    step_rec.filled = tail.nonzero().flatten().tolist()
                ids[r, tail] = pad_id
                masked[r, tail] = False

            if needs_confidence and not st.has_eos:
                in_win = torch.zeros(width, dtype=torch.bool)
                in_win[:w] = in_window[j]
                if bool((masked[r] & in_win).any()):  # never delay a window that is complete
                    cand_mask = in_win & editable[r] & ~masked[r] & (ids[r] != eos_id) & (ids[r] != pad_id)
                    candidates = [(p, float(confidence[r, p])) for p in cand_mask.nonzero().flatten().tolist()
                                  if p not in committed_now]
                    reopened = remasker.choose(candidates, st.remask, generators[r])  # type: ignore[arg-type]
                    if reopened:
                        ids[r, reopened] = mask_id
                        masked[r, reopened] = True
                        st.carry += len(reopened)
                        st.stats.remasked += len(reopened)
                        if step_rec is not None:
                            step_rec.remasked = list(reopened)

            if step_rec is not None:
                trajectories[chunk[r]].steps.append(step_rec)  # type: ignore[index]
            if bool(masked[r].any()):
                still_active.append(r)
            else:
                st.stats.seconds = time.perf_counter() - t0
        active = still_active

    for r, g in enumerate(chunk):
        sequences[g] = ids[r, : lengths[r]].tolist()
