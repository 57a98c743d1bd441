"""Canvas policy (end token + pad filler), the batch collator and length-grouped batching."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["CanvasPolicy", "DiffusionCollator", "LengthGroupedBatchSampler"]


@dataclass
class CanvasPolicy:
    """How the noised answer region is laid out: ``answer tokens, EOS, PAD filler``.

    The filler teaches the model what the canvas looks like after the answer ends, so its length and
    weight are set here, not left to batching (PITFALLS: in dLLM the filler was short in training and
    long at inference).

    Args:
        mode: ``fixed``: every answer is padded to ``length`` slots (match your generation canvas);
            ``sampled``: a filler length drawn uniformly from ``[0, length - answer]`` per example;
            ``none``: no filler, the answer region ends at EOS.
        length: canvas length (``fixed``) or the maximum canvas (``sampled``).
        filler_weight: loss weight of filler positions (answer tokens and EOS weigh 1).
        overflow: answers longer than the canvas are ``drop``-ped (default), or ``truncate``-d to the
            canvas with no end token (the model is never told a cut answer ended).
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


class DiffusionCollator:
    """Pads a list of ``{prompt_ids, answer_ids, ...}`` examples into a batch.

    Batch keys: ``input_ids`` (clean ids), ``attention_mask`` (0 only on batch padding; filler is
    data and is attended), ``loss_mask`` (answer + EOS + filler: the noised region), ``loss_weight``
    (1 on answer and EOS, ``filler_weight`` on filler), ``metric_mask`` (answer + EOS: what NELBO and
    perplexity report), ``language`` and ``source`` (lists of strings).
    """

    def __init__(self, pad_id: int, canvas: CanvasPolicy, seed: int = 0, pad_to_multiple_of: int = 8) -> None:
        self.pad_id = pad_id
        self.canvas = canvas
        self.pad_to_multiple_of = pad_to_multiple_of
        self.generator = torch.Generator().manual_seed(seed)

    def filler_length(self, answer_len: int) -> int:
        """Number of pad slots after the answer (already capped to the canvas)."""
        room = max(self.canvas.length - answer_len, 0)
        if self.canvas.mode == "fixed":
            return room
        if self.canvas.mode == "sampled":
            return int(torch.randint(0, room + 1, (), generator=self.generator))
        return 0

    def __call__(self, examples: Sequence[dict]) -> dict:
        rows = []
        for ex in examples:
            prompt, answer = list(ex["prompt_ids"]), list(ex["answer_ids"])
            filler = self.filler_length(len(answer))
            rows.append((prompt, answer, filler))
        longest = max(len(p) + len(a) + f for p, a, f in rows)
        m = self.pad_to_multiple_of
        width = int(math.ceil(longest / m) * m) if m else longest
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        loss_mask = torch.zeros((n, width), dtype=torch.bool)
        metric_mask = torch.zeros((n, width), dtype=torch.bool)
        loss_weight = torch.zeros((n, width), dtype=torch.float32)
        for i, (prompt, answer, filler) in enumerate(rows):
            p, a = len(prompt), len(answer)
            input_ids[i, : p + a] = torch.tensor(prompt + answer)
            attention_mask[i, : p + a + filler] = 1
            loss_mask[i, p : p + a + filler] = True
            metric_mask[i, p : p + a] = True
            loss_weight[i, p : p + a] = 1.0
            loss_weight[i, p + a : p + a + filler] = self.canvas.filler_weight
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
            "loss_weight": loss_weight,
            "metric_mask": metric_mask,
            "language": [ex.get("language", "") for ex in examples],
            "source": [ex.get("source", "") for ex in examples],
        }


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length, sharded over ranks, reshuffled every epoch.

    Examples are shuffled, cut into mega-chunks of ``group_batches`` global batches, sorted by length
    inside each chunk and split into global batches (``batch_size * world_size``); the global batches
    are shuffled and each rank takes its contiguous slice. Every rank yields the same number of
    batches. Sharding is done here, so the Trainer runs with ``use_distributed_sampler=False``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        group_batches: int = 64,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.group_batches = group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start: a new order per epoch."""
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        order = list(range(n))
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        if self.shuffle:
            order = torch.randperm(n, generator=g).tolist()
        global_bs = self.batch_size * self.world_size
        chunk = global_bs * self.group_batches
        batches = []
        for start in range(0, n, chunk):
            part = order[start : start + chunk]
            if self.shuffle:
                part.sort(key=lambda i: self.lengths[i])
            batches.extend(part[j : j + global_bs] for j in range(0, len(part), global_bs))
        if batches and len(batches[-1]) < global_bs and (self.drop_last or self.world_size > 1):
            if self.drop_last:
                batches.pop()
            else:  # keep every rank's batch count equal: recycle from the start
                last = batches[-1]
                batches[-1] = last + order[: global_bs - len(last)]
        if self.shuffle:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            local = batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if local:
                yield local

    def __len__(self) -> int:
        n, global_bs = len(self.lengths), self.batch_size * self.world_size
        return n // global_bs if self.drop_last else math.ceil(n / global_bs)
