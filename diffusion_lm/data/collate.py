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


class DiffusionCollator:
    """Pads a list of ``{prompt_ids, answer_ids, ...}`` examples into a batch.

    Batch keys: ``input_ids`` (clean ids), ``attention_mask`` (0 only on batch padding; filler is
    data and is attended), ``loss_mask`` (answer + EOS + filler: the noised region), ``loss_weight``
    (1 on answer and EOS, ``filler_weight`` on filler), ``metric_mask`` (answer + EOS: what NELBO and
    perplexity report; never filler), ``truncated`` (bool per row: the answer was cut, it has no end
    token), ``language`` and ``source`` (lists of strings: metrics are split by them), ``index`` and
    ``turn`` (lists of ints: the source record and the answer's turn in it, for tracing). Streaming batches may also carry
    ``skipped``: skip-counter keys of records dropped upstream since the previous batch, which
    :class:`DialogDataModule` pops and counts before the batch reaches the model.
    """

    def __init__(self, pad_id: int, canvas: CanvasPolicy, seed: int = 0, pad_to_multiple_of: int = 8) -> None:
        self.pad_id = pad_id
        self.canvas = canvas
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self._worker: int | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def _rng(self) -> torch.Generator:
        # Each DataLoader worker holds a copy of the collator: reseed per worker so the workers do not
        # all draw the same filler lengths.
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        if worker != self._worker:
            if self._worker is not None or worker >= 0:
                self.generator = torch.Generator().manual_seed(self.seed + 7919 * (worker + 1))
            self._worker = worker
        return self.generator

    def filler_length(self, answer_len: int) -> int:
        """Number of pad slots after the answer (already capped to the canvas)."""
        room = max(self.canvas.length - answer_len, 0)
        if self.canvas.mode == "fixed":
            return room
        if self.canvas.mode == "sampled":
            return int(torch.randint(0, room + 1, (), generator=self._rng()))
        return 0

    def __call__(self, examples: Sequence[dict]) -> dict:
        rows = []
        for ex in examples:
            prompt, answer = list(ex["prompt_ids"]), list(ex["answer_ids"])
            # A truncated answer filled the canvas: no end token, so no filler after it either.
            filler = 0 if ex.get("truncated") else self.filler_length(len(answer))
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
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
            "loss_weight": loss_weight,
            "metric_mask": metric_mask,
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


class _EpochHook:
    """Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``, not on a custom batch
    sampler itself; this stand-in forwards the call so every epoch gets a new order."""

    def __init__(self, owner: "LengthGroupedBatchSampler") -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length, sharded over ranks, reshuffled every epoch.

    Training (``shuffle=True``): examples are shuffled, cut into mega-chunks of ``group_batches``
    global batches, sorted by length inside each chunk and split into global batches
    (``batch_size * world_size``); the global batches are shuffled and each rank takes its
    contiguous slice, so the ranks together see exactly the batches one process with the global
    batch would see. Every rank yields the same number of batches (DDP would hang otherwise).
    Evaluation (``shuffle=False``): the whole set is sorted by length (a fixed order).

    Sharding is done here, so the Trainer runs with ``use_distributed_sampler=False`` (the CLI
    sets it). ``lengths`` are the row widths the collator will produce.
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
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.group_batches = group_batches
        self.epoch = 0
        self.sampler = _EpochHook(self)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start: a new order per epoch."""
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        if self.shuffle:
            order = torch.randperm(n, generator=g).tolist()
        else:  # evaluation: one fixed, length-sorted order (less padding, same every time)
            order = sorted(range(n), key=lambda i: self.lengths[i])
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
            else:  # keep every rank's batch count equal: recycle from the start (cyclically)
                last = batches[-1]
                batches[-1] = last + [order[i % n] for i in range(global_bs - len(last))]
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
