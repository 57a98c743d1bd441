"""Canvas policy (end token + pad filler) and the batch collator (one example per row, or packed rows)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

__all__ = ["CanvasPolicy", "DiffusionCollator", "pack_rows"]


@dataclass
class CanvasPolicy:
    """How the noised answer region is laid out: ``answer tokens, EOS, PAD filler``.

    The filler teaches the model what the canvas looks like after the answer ends, so its length and
    weight are set here, not left to batching (in dLLM the filler was short in training and long at
    inference).

    Args:
        mode: ``fixed``: every answer region is padded to ``length`` slots (match your generation
            canvas); ``sampled``: a filler length drawn uniformly from ``[0, length - answer]`` per
            example and batch, so the model sees every canvas size up to ``length``; ``none``: no
            filler, the answer region ends at EOS.
        length: canvas length (``fixed``) or the largest canvas (``sampled``); in every mode an
            answer plus its end token must fit in it, and a prompt may use at most
            ``max_length - length`` tokens.
        filler_weight: loss weight of filler positions (answer tokens and EOS weigh 1); 0 keeps
            filler in the noised input but out of the loss.
        overflow: answers longer than the canvas are ``drop``-ped (default, counted as
            ``answer_too_long``), or ``truncate``-d to the canvas with no end token and no filler (the
            model is never told a cut answer ended); truncated rows are flagged in the batch.
    """

    mode: Literal["fixed", "sampled", "none"] = "fixed"
    length: int = 64
    filler_weight: float = 1.0
    overflow: Literal["drop", "truncate"] = "drop"

    def __post_init__(self) -> None:
        if self.length <= 0:
            raise ValueError(f"canvas.length must be > 0, got {self.length}")
        if self.filler_weight < 0:
            raise ValueError(f"canvas.filler_weight must be >= 0, got {self.filler_weight}")


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: example indices per row, each row holding at most
    ``capacity`` tokens (an example longer than ``capacity`` gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return [sorted(r) for r in rows]


class DiffusionCollator:
    """Turns a list of ``{prompt_ids, answer_ids, ...}`` examples into a batch.

    Layout of one example: ``prompt, answer (ending with EOS), pad filler`` (see :class:`CanvasPolicy`).
    With ``pack``, examples are packed (first-fit decreasing) into rows, each example a *segment*
    that attends only to itself (see :class:`~diffusion_lm.backbone.SparseHeadDenoiser`): short
    examples share a row instead of being padded to the longest, and no length grouping is needed.
    Rows hold at most ``pack_length`` tokens, by default as many as the batch's longest example: rows
    then never get wider than padded rows would be (attention cost grows with the row width), and
    there are fewer of them. Without ``pack``, every example gets a row of its own.

    Row keys (``[R, W]``): ``input_ids`` (clean ids), ``attention_mask`` (0 on row padding, else the
    example's segment number in its row, 1, 2, ...; filler is data and is attended), ``loss_mask``
    (answer + EOS + filler: the noised region), ``loss_weight`` (1 on answer and EOS,
    ``filler_weight`` on filler), ``metric_mask`` (answer + EOS of counted examples: what NELBO and
    perplexity report, never filler), ``example`` (index of the example in the batch, -1 on padding)
    and ``position`` (position inside the example).

    Example keys (one entry per example, in input order): ``sample_index`` (the example's index in
    its dataset, -1 when unknown), ``counted`` (bool: False for an evaluation sampler's filler copy),
    ``truncated`` (bool: the answer was cut, it has no end token), ``language`` and ``source``
    (strings: metrics are split by them), ``index`` and ``turn`` (the source record and the answer's
    turn in it, for tracing). Streaming batches may also carry ``skipped``: skip-counter keys of
    records dropped upstream since the previous batch, which :class:`DialogDataModule` pops and
    counts before the batch reaches the model.

    Args:
        pad_id: the pad token.
        canvas: the canvas policy.
        seed: seed of the ``sampled`` filler lengths; each example's length is keyed by
            ``(seed, its draw key)`` (:class:`~diffusion_lm.data.batching.SampleKey`), so it does not
            depend on the worker or rank that collates it, and a resumed run draws the same.
        pad_to_multiple_of: round the row width up (tensor-core friendly shapes).
        pack: pack several examples per row.
        pack_length: row capacity for packing (default: the batch's longest example, rounded up to
            ``pad_to_multiple_of``); setting it turns packing on.
        max_width: never round the row width above this (the positions the model has).
    """

    def __init__(
        self,
        pad_id: int,
        canvas: CanvasPolicy,
        seed: int = 0,
        pad_to_multiple_of: int = 8,
        pack: bool = False,
        pack_length: Optional[int] = None,
        max_width: Optional[int] = None,
    ) -> None:
        if pack_length is not None and pack_length < 1:
            raise ValueError(f"pack_length must be >= 1 or None, got {pack_length}")
        self.pack = pack or pack_length is not None
        self.pad_id = pad_id
        self.canvas = canvas
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.pack_length = pack_length
        self.max_width = max_width
        self._unkeyed = 0  # draw counter for examples that come without a draw key

    def filler_length(self, answer_len: int, draw: Optional[int] = None) -> int:
        """Number of pad slots after the answer (already capped to the canvas)."""
        room = max(self.canvas.length - answer_len, 0)
        if self.canvas.mode == "fixed":
            return room
        if self.canvas.mode == "sampled":
            if draw is None:
                draw, self._unkeyed = -1 - self._unkeyed, self._unkeyed + 1
            return random.Random(f"{self.seed}:{draw}").randint(0, room)
        return 0

    def _width(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        width = int(math.ceil(longest / m) * m) if m else longest
        if self.max_width is not None:
            width = min(width, max(longest, self.max_width))
        return width

    def __call__(self, examples: Sequence[dict]) -> dict:
        parts = []
        for ex in examples:
            prompt, answer = list(ex["prompt_ids"]), list(ex["answer_ids"])
            # A truncated answer filled the canvas: no end token, so no filler after it either.
            filler = 0 if ex.get("truncated") else self.filler_length(len(answer), ex.get("draw"))
            parts.append((prompt, answer, filler))
        sizes = [len(p) + len(a) + f for p, a, f in parts]
        if not self.pack:
            rows = [[i] for i in range(len(parts))]
        else:
            rows = pack_rows(sizes, self.pack_length or self._width(max(sizes)))
        width = self._width(max(sum(sizes[i] for i in row) for row in rows))
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        loss_mask = torch.zeros(shape, dtype=torch.bool)
        metric_mask = torch.zeros(shape, dtype=torch.bool)
        loss_weight = torch.zeros(shape, dtype=torch.float32)
        example = torch.full(shape, -1, dtype=torch.long)
        position = torch.zeros(shape, dtype=torch.long)
        counted = [bool(ex.get("counted", True)) for ex in examples]
        for r, members in enumerate(rows):
            start = 0
            for segment, i in enumerate(members, start=1):
                prompt, answer, filler = parts[i]
                p, a, end = len(prompt), len(answer), start + sizes[i]
                input_ids[r, start : start + p + a] = torch.tensor(prompt + answer)
                attention_mask[r, start:end] = segment
                example[r, start:end] = i
                position[r, start:end] = torch.arange(sizes[i])
                loss_mask[r, start + p : end] = True
                metric_mask[r, start + p : start + p + a] = counted[i]
                loss_weight[r, start + p : start + p + a] = 1.0
                loss_weight[r, start + p + a : end] = self.canvas.filler_weight
                start = end
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
            "loss_weight": loss_weight,
            "metric_mask": metric_mask,
            "example": example,
            "position": position,
            "sample_index": torch.tensor([int(ex.get("sample_index", -1)) for ex in examples],
                                         dtype=torch.long),
            "counted": torch.tensor(counted, dtype=torch.bool),
            "truncated": torch.tensor([bool(ex.get("truncated", False)) for ex in examples]),
            "language": [ex.get("language", "") for ex in examples],
            "source": [ex.get("source", "") for ex in examples],
            "index": [int(ex.get("index", -1)) for ex in examples],
            "turn": [int(ex.get("turn", -1)) for ex in examples],
        }
        skipped = [key for ex in examples for key in (ex.get("skipped") or [])]
        if skipped:
            batch["skipped"] = skipped
        return batch
