"""The sampling loop: ``generate`` (answer prompts on a [MASK] canvas) and ``infill`` (fill holes).

Plain torch; any callable with the denoiser contract (:class:`~diffusion_lm.denoiser.Denoiser`:
logits only at the queried slots, [MASK] at ``-inf``) works; ``MaskedDiffusionLM.denoise`` is one.

Per step and per active row: the window picks the slots that may be decided, only those are queried,
logits processors edit the logits, the proposer picks a token per slot, the scorer ranks the slots,
the selector commits the best ones, the remasker may re-open a few, and the stop rule ends the row
(EOS committed: the rest of its canvas becomes pad; or no masked slot left). Finished rows are
dropped from the batch passed to the denoiser (dLLM PR #68 review: done rows kept being computed).

Reproducibility: every row has its own ``torch.Generator`` seeded from ``(seed, row index)`` (or from
its own seed, when ``seed`` is a list) and all per-row decisions read only that row. Rows are
right-padded after their canvas with ``attention_mask = 0``; prompts are never left-padded (dLLM
leaked left-padded prompts into outputs, PR #86/#87). Batch-size invariance, precisely: when the
denoiser's logits for a row are bitwise independent of the rest of the batch (its other rows, size
and padded width), batched generation equals one-by-one generation (``max_batch_size=1``) exactly,
for the same seed and row order. A real encoder's kernels round differently for different batch
shapes, thread counts and CPUs, so with it batched and single answers agree wherever the model is
sure and may differ at near-tied logits (an untrained model); see ``docs/sampling.md``.

Streaming: ``on_step(rows, ids)`` (off by default) reports the rows of each forward and their current
ids, for callers that show the answer unmasking live.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ..denoiser import Denoiser
from ..errors import ConfigError
from ..seeding import Seed, row_seed, row_seeds
from .config import SamplerConfig
from .fast import decode_chunk_fast, supports
from .guidance import guided
from .policies import NoRemasker
from .processors import HoleContent
from .step import Canvas, GenerationStats, RowStats, advance_row, decide, forward, rows_of
from .trajectory import Trajectory

__all__ = ["Denoiser", "StepHook", "RowStats", "GenerationStats", "GenerationResult", "generate", "infill",
           "row_seed"]

# on_step(rows, ids): after each denoiser forward, the rows that took part and their current ids.
StepHook = Callable[[list[int], list[list[int]]], None]


@dataclass
class GenerationResult:
    """Output of :func:`generate` / :func:`infill`.

    Attributes:
        ids: per row, the answer ids (``generate``: canvas cut at the first EOS, EOS excluded, pad
            stripped) or the filled sequence (``infill``: every non-hole token unchanged).
        sequences: per row, the final full row (prompt + canvas, pad filler included).
        row_stats: per-row cost; ``stats``: whole-call cost.
        seed: the base seed used (drawn at random when ``seed=None``; pass it back to reproduce), or
            the list of per-row seeds when one was given.
        trajectories: per row, the decoding history (``return_trajectory=True``).
        texts: decoded answers, filled in by callers that own a tokenizer (the model's ``generate``).
    """

    ids: list[list[int]]
    sequences: list[list[int]]
    row_stats: list[RowStats]
    stats: GenerationStats
    seed: Union[int, list[int]]
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
        raise ConfigError(f"{what} must be a list of id lists (rows may differ in length), not a tensor; use "
                          ".tolist()")
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)) or len(rows) == 0:
        raise ConfigError(f"{what} must be a non-empty list of token-id lists, got {type(rows).__name__} of "
                          f"length {len(rows) if hasattr(rows, '__len__') else '?'}")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, torch.Tensor)):
            raise ConfigError(f"{what}[{i}] must be a list of token ids (tokenize text first), got "
                              f"{type(row).__name__}")
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
    seed: Seed = None,
    return_trajectory: bool = False,
    max_batch_size: Optional[int] = None,
    max_length: Optional[int] = None,
    device: Union[None, str, torch.device] = None,
    on_step: Optional[StepHook] = None,
) -> GenerationResult:
    """Answer each prompt by unmasking ``canvas_length`` [MASK] slots appended after it.

    Args:
        denoiser: the model (see the module docstring for the contract).
        prompts: complete prompt ids per row (BOS and the assistant header already included).
        mask_id, eos_id, pad_id: special ids; the answer ends at EOS, pad fills the canvas after it.
        canvas_length: answer slots per row.
        sampler: a :class:`SamplerConfig`, a preset name (``quality``, ``fast``, ``greedy``), a
            mapping (``SamplerConfig.from_dict``), or None for the default (= ``quality``).
        seed: base seed; row ``i`` draws from ``row_seed(seed, i)``. None draws a fresh one (see
            ``result.seed``).
            A list gives each row its own seed: row ``i`` draws from ``row_seed(seed[i], 0)``, exactly
            what a one-row call with ``seed=seed[i]`` draws, so a row's answer does not depend on the
            rows it is batched with (e.g. requests grouped by a server).
        return_trajectory: record every step (for :func:`render_trajectory_html`).
        max_batch_size: rows per denoiser call (None = all at once); results do not depend on it when the
            denoiser is batch-invariant (see the module docstring for a real encoder).
        max_length: the model's longest sequence; a longer prompt + canvas is an error.
        device: where to build the inputs; default: the denoiser's module's device, else CPU.
        on_step: called after every denoiser forward as ``on_step(rows, ids)``: the indices (into
            ``prompts``) of the rows that took part in it, and each one's current full row as a list
            (prompt + canvas: committed ids in place, ``mask_id`` where still masked, pad after a
            committed EOS). A row's k-th report follows its k-th forward; its last report has no
            ``mask_id`` left (the row is done). An exception raised by the hook aborts the call.
            None (the default) costs nothing.
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
        on_step=on_step,
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
    seed: Seed = None,
    return_trajectory: bool = False,
    max_batch_size: Optional[int] = None,
    max_length: Optional[int] = None,
    device: Union[None, str, torch.device] = None,
    eos_policy: bool = False,
    on_step: Optional[StepHook] = None,
    flexible: Optional[Sequence[Sequence[bool]]] = None,
) -> GenerationResult:
    """Fill the ``mask_id`` slots of each row, leaving every other token untouched.

    No canvas is appended and no row is cut: ``result.ids[i]`` is row ``i`` with its holes filled.
    A hole slot takes a text token: EOS is never placed in a hole and pad only where ``flexible[i][p]``
    is true (a slot of a variable-length hole, which pad shortens; drop pad when decoding so the text
    closes up). ``flexible`` is per row and position like ``ids``; None: every hole has a fixed size.
    The EOS policy (which assumes an answer growing after a prompt) is off unless
    ``eos_policy=True``; a committed EOS never stops an infill row. Other arguments (per-row ``seed``
    lists and the ``on_step`` hook included; a row without holes is never reported) as in :func:`generate`.
    Build rows from text with :func:`diffusion_lm.sampling.spans_to_ids`.
    """
    rows = _as_rows(ids, "ids")
    _check_common(max_batch_size)
    for i, row in enumerate(rows):
        if max_length is not None and len(row) > max_length:
            raise ConfigError(f"row {i} has {len(row)} tokens, longer than max_length {max_length}; "
                              "shorten the text or use fewer mask slots")
        if flexible is not None and (i >= len(flexible) or len(flexible[i]) != len(row)):
            raise ConfigError(f"flexible[{i}] must give one flag per position of row {i} ({len(row)})")
    config = SamplerConfig.coerce(sampler)
    editable = [[t == mask_id for t in row] for row in rows]
    region = [[True] * len(row) for row in rows]
    result = _decode(
        denoiser, rows, editable, region, [0] * len(rows), config,
        mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, stop_on_eos=False, eos_policy=eos_policy,
        seed=seed, return_trajectory=return_trajectory, max_batch_size=max_batch_size, device=device,
        on_step=on_step, holes=[[bool(f) for f in row] for row in flexible] if flexible is not None else [],
    )
    result.ids = [list(seq) for seq in result.sequences]
    return result


# ------------------------------------------------------------------------------------------ the loop
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
    seed: Seed,
    return_trajectory: bool,
    max_batch_size: Optional[int],
    device: Union[None, str, torch.device],
    on_step: Optional[StepHook],
    holes: Optional[list[list[bool]]] = None,
) -> GenerationResult:
    """Decode ``rows``; ``holes`` (infill only: [] or per-row flexible flags) adds :class:`HoleContent`."""
    seed, seeds = row_seeds(seed, len(rows))
    dev = _infer_device(denoiser, device)
    processors = config.logits_processors(eos_policy=eos_policy)
    if holes is not None:
        processors = [HoleContent()] + processors
    flexible_rows = holes or None
    n = len(rows)
    size = max_batch_size or n
    sequences: list[list[int]] = [[] for _ in range(n)]
    row_stats: list[RowStats] = [RowStats() for _ in range(n)]
    trajectories = None
    if return_trajectory:
        trajectories = [Trajectory(list(r), s, mask_id) for r, s in zip(rows, starts)]
    total = GenerationStats()
    # The vectorised step has no guidance branch and no variable-length holes: those run the plain step.
    fast = supports(config, processors, return_trajectory) and not config.guidance and flexible_rows is None
    t_call = time.perf_counter()
    for lo in range(0, n, size):
        chunk = list(range(lo, min(n, lo + size)))
        _decode_chunk(
            denoiser, chunk, rows, editable, region, config, processors, sequences, row_stats, trajectories,
            total, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, stop_on_eos=stop_on_eos, row_seeds=seeds,
            device=dev, on_step=on_step, flexible_rows=flexible_rows, fast=fast,
        )
    total.seconds = time.perf_counter() - t_call
    total.tokens = sum(s.tokens for s in row_stats)
    return GenerationResult(
        ids=[list(s) for s in sequences], sequences=sequences, row_stats=row_stats, stats=total, seed=seed,
        trajectories=trajectories,
    )


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
    row_seeds: list[int],
    device: torch.device,
    on_step: Optional[StepHook],
    flexible_rows: Optional[list[list[bool]]] = None,
    fast: bool = False,
) -> None:
    """Decode the rows ``chunk`` together until every row is done (see :mod:`~diffusion_lm.sampling.step`;
    ``fast``: the vectorised step of :mod:`~diffusion_lm.sampling.fast`)."""
    canvas = Canvas.build(chunk, rows, editable_rows, region_rows, row_stats, config.remasker,
                          mask_id=mask_id, pad_id=pad_id, flexible_rows=flexible_rows)
    if fast:
        decode_chunk_fast(denoiser, chunk, canvas, config, processors, row_stats, total, mask_id=mask_id,
                          eos_id=eos_id, pad_id=pad_id, stop_on_eos=stop_on_eos, row_seeds=row_seeds,
                          device=device, on_step=on_step)
        for r, g in enumerate(chunk):
            sequences[g] = canvas.row_ids(r)
        return
    needs_confidence = not isinstance(config.remasker, NoRemasker)
    active = canvas.pending()
    max_forwards = canvas.max_forwards()
    # Classifier-free guidance conditions on every token the sampler may not write (the prompt; the
    # text around infill holes); guidance 0 leaves the denoiser as it is.
    condition = canvas.attn.bool() & ~canvas.editable
    for n_forward in range(max_forwards + 1):
        if not active:
            break
        if n_forward == max_forwards:
            raise RuntimeError("sampler did not terminate within its step bound (a selector committed "
                               "nothing?)")
        step_denoiser = guided(denoiser, config.guidance, mask_id, condition[torch.tensor(active)])
        step = forward(step_denoiser, canvas, active, config, device=device, row_seeds=row_seeds, total=total,
                       mask_id=mask_id, eos_id=eos_id, pad_id=pad_id)
        decisions = decide(step, config, processors, needs_confidence)
        still_active = []
        for row in rows_of(step, decisions):
            trajectory = trajectories[chunk[row.r]] if trajectories is not None else None
            if advance_row(canvas, step, row, decisions, config, processors, stop_on_eos=stop_on_eos,
                           mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, trajectory=trajectory):
                still_active.append(row.r)
        if on_step is not None:
            on_step([chunk[r] for r in active], [canvas.row_ids(r) for r in active])
        active = still_active
    for r, g in enumerate(chunk):
        sequences[g] = canvas.row_ids(r)
