"""DataLoaders of the mix: map-style batches through :class:`~diffusion_lm.data.batching.DialogBatchSampler`
(sharded, stratified, resumable), streaming batches through a rank's share of the stream.

Plain functions of the dataset, this rank and the options; :class:`~diffusion_lm.data.DialogDataModule`
calls them from its ``*_dataloader`` hooks.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from torch.utils.data import DataLoader

from ..errors import ConfigError
from .batching import DialogBatchSampler, KeyedExamples, ResumableLoader
from .collate import CanvasPolicy, DiffusionCollator
from .mix import column
from .streaming import StreamingExamples, rank_stream

__all__ = ["map_loader", "row_lengths", "strata", "stream_loader"]


def row_lengths(dataset, canvas: CanvasPolicy) -> np.ndarray:
    """Width of each example once collated (prompt + answer region), for length sorting."""
    prompt = column(dataset, "prompt_length").to_numpy().astype(np.int64)
    answer = column(dataset, "answer_length").to_numpy().astype(np.int64)
    region = answer if canvas.mode == "none" else np.maximum(answer, canvas.length)
    return prompt + region


def strata(dataset) -> np.ndarray:
    """The source of each example as an int (the strata of a stratified batch order)."""
    return np.asarray(column(dataset, "source").combine_chunks().dictionary_encode().indices)


def map_loader(dataset, batch_size: int, *, shuffle: bool, rank: int, world: int, canvas: CanvasPolicy,
               collator: DiffusionCollator, stratify: bool, seed: int, group_batches: int, num_workers: int,
               progress: Optional[Callable[[], int]] = None) -> DataLoader:
    """Batches of a map-style dataset: shuffled, stratified and resumable for training (``shuffle``),
    in a fixed length-sorted order with every example counted once for evaluation."""
    if shuffle and len(dataset) < batch_size * world:
        raise ConfigError(
            f"the training mix has {len(dataset)} examples, fewer than one global batch "
            f"({batch_size} x {world} ranks); lower data.batch_size or add data"
        )
    sampler = DialogBatchSampler(
        row_lengths(dataset, canvas),
        batch_size,
        strata=strata(dataset) if shuffle and stratify else None,
        rank=rank,
        world_size=world,
        shuffle=shuffle,
        drop_last=shuffle,
        seed=seed,
        group_batches=group_batches if shuffle else 1,
    )
    kwargs = dict(batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                  persistent_workers=num_workers > 0)
    if shuffle:
        return ResumableLoader(KeyedExamples(dataset.with_format(None)), progress=progress, **kwargs)
    return DataLoader(KeyedExamples(dataset.with_format(None)), **kwargs)


def stream_loader(stream, batch_size: int, *, rank: int, world: int, total_samples: Optional[int], seed: int,
                  shuffle_buffer: int, collator: DiffusionCollator, num_workers: int) -> DataLoader:
    """Batches of this rank's share of a streaming mix (``total_samples`` per epoch, or endless)."""
    per_rank = total_samples // world if total_samples is not None else None
    if per_rank is not None and per_rank < batch_size:
        raise ConfigError(f"data.total_samples={total_samples} gives {per_rank} examples per rank, "
                          f"fewer than one batch of {batch_size}")
    shard = rank_stream(stream, rank=rank, world_size=world, per_rank=per_rank, seed=seed,
                        buffer_size=shuffle_buffer)
    return DataLoader(
        StreamingExamples(shard, per_rank),
        batch_size=batch_size,
        drop_last=True,
        collate_fn=collator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
