"""Streaming sources: tokenise on the fly, mix by probability, shard over ranks, buffer-shuffle.

Pipeline for one streaming source (``datasets.IterableDataset`` all the way)::

    records --take(n_val)--> validation records (materialised once at setup: a fixed set)
            --skip(n_val)--> pack --map(ExampleBuilder, batched)--> examples

The validation records are the *first* ``n_val`` records of the stream: a rule that needs no seed
and no length, and gives the same set on every run and every rank. The training streams of all
sources are mixed with ``interleave_datasets`` (probabilities = normalised weights), repeated, cut to
``total_samples`` (rounded down to a multiple of the world size), split over ranks with
``split_dataset_by_node`` and shuffled through a buffer (no length grouping: lengths are not known
ahead).
"""

from __future__ import annotations

from typing import Optional

import torch

from .examples import PACKED_COLUMN, PackRecord, example_features

__all__ = ["StreamingExamples", "tokenised_stream", "rank_stream"]


def tokenised_stream(raw, builder, num_val: int):
    """The training examples of one streaming source (records after its first ``num_val``)."""
    stream = raw.skip(num_val) if num_val else raw
    # The raw columns of a stream may be unknown until read; packing each record into one column
    # lets the batched map (which changes the row count) drop exactly that column.
    stream = stream.map(PackRecord()).select_columns([PACKED_COLUMN])
    if not (builder.packed and builder.stream and builder.index_offset == num_val):
        raise ValueError("a streaming ExampleBuilder needs packed=True, stream=True and index_offset=num_val")
    return stream.map(
        builder, batched=True, with_indices=True, remove_columns=[PACKED_COLUMN], features=example_features()
    )


def rank_stream(mix, *, rank: int, world_size: int, per_rank: Optional[int], seed: int, buffer_size: int):
    """This rank's share of the mixed stream: ``per_rank`` examples (or endless), sharded and shuffled.

    Order matters (checked against ``datasets`` 5): the stream is repeated and cut to
    ``per_rank * world_size`` *before* ``split_dataset_by_node``, which then hands every rank exactly
    ``per_rank`` examples, disjoint from the other ranks' (a ``take`` after the split would be
    divided among the ranks again). Repeating makes the stream endless first, so no rank runs out
    before another (DDP would hang on uneven batch counts).
    """
    from datasets.distributed import split_dataset_by_node

    mix = mix.repeat(None)
    if per_rank is not None:
        mix = mix.take(per_rank * world_size)
    if world_size > 1:
        mix = split_dataset_by_node(mix, rank=rank, world_size=world_size)
    if buffer_size > 1:
        # The same seed on every rank: the ranks shuffle in step and their shards stay disjoint.
        mix = mix.shuffle(seed=seed, buffer_size=buffer_size)
    return mix


class StreamingExamples(torch.utils.data.IterableDataset):
    """A training stream for the DataLoader, with a length when the epoch size is known.

    Lightning only calls ``set_epoch`` on samplers, which an iterable dataset has none of; so each
    new iteration (one per epoch: with ``num_workers == 0`` in this process, otherwise in each
    persistent worker) advances the epoch of the stream, which reseeds its shuffle.

    Args:
        stream: a ``datasets.IterableDataset`` of examples (it shards itself over DataLoader workers).
        length: examples per epoch on this rank, or None for an endless stream.
    """

    def __init__(self, stream, length: Optional[int] = None) -> None:
        super().__init__()
        self.stream = stream
        self.length = length
        self.epoch = 0

    def __iter__(self):
        self.stream.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.stream)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless stream has no length (set data.total_samples for epochs of known "
                            "size)")
        return self.length
