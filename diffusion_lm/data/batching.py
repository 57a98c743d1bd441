"""Which examples go into which batch: the batch sampler, its resumable loader and sample keys.

The default is learning-neutral: every global batch is a random sample of the mix whose source (and
so language) shares match the mix weights to within one example (``stratify``), and padding is
removed by packing rows (``DiffusionCollator(pack_length=...)``), not by grouping similar lengths.
Grouping a whole window of batches by length (HF Trainer's ``group_by_length``, the former default
here) makes each batch a length class, and length correlates with language, source and task: the
gradient of every step then sees a biased slice of the data (measured in docs/BENCHMARKS.md).

Resuming is exact: the sampler's order is a pure function of ``(seed, epoch)``, and the loader's
state (saved in every checkpoint through Lightning's ``state_dict`` protocol) is the number of
examples the fit loop already trained on in the current epoch, so a resumed run continues with the
very batch the interrupted run would have trained next.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["DialogBatchSampler", "KeyedExamples", "LengthGroupedBatchSampler", "ResumableLoader", "SampleKey"]

log = logging.getLogger(__name__)


class SampleKey(int):
    """A dataset index (it *is* the int) that also says which epoch drew it and whether it counts.

    ``draw`` keys the example's per-epoch random choices (e.g. a sampled filler length) so they do
    not depend on the worker, rank or batch that collates it; ``counted`` is False for the copies an
    evaluation sampler adds to even out the last batch across ranks (they run, but are not scored).
    """

    def __new__(cls, index: int, draw: int = 0, counted: bool = True) -> "SampleKey":
        obj = super().__new__(cls, index)
        obj.draw = int(draw)
        obj.counted = bool(counted)
        return obj

    def __reduce__(self):
        return (SampleKey, (int(self), self.draw, self.counted))

    def __repr__(self) -> str:
        return f"SampleKey({int(self)}, draw={self.draw}, counted={self.counted})"


class KeyedExamples(Dataset):
    """A map-style dataset of examples fetched by :class:`SampleKey`; each example gets its
    ``sample_index`` (position in the dataset), ``draw`` and ``counted`` fields."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def _fetch(self, indices: list[int]) -> list[dict]:
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is not None:
            return list(getitems(indices))
        return [self.dataset[i] for i in indices]

    def __getitems__(self, keys: Sequence[int]) -> list[dict]:
        rows = self._fetch([int(k) for k in keys])
        out = []
        for key, row in zip(keys, rows):
            row = dict(row)
            row["sample_index"] = int(key)
            row["draw"] = getattr(key, "draw", 0)
            row["counted"] = getattr(key, "counted", True)
            out.append(row)
        return out

    def __getitem__(self, key: int) -> dict:
        return self.__getitems__([key])[0]


class _EpochHook:
    """Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``, not on a custom batch
    sampler itself; this stand-in forwards the call so every epoch gets a new order."""

    def __init__(self, owner: "DialogBatchSampler") -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


def stratified_order(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of ``range(len(strata))`` in which every prefix holds each stratum in
    proportion to its size, to within one example.

    Each stratum's members are shuffled and given the evenly spaced "times" ``(j + u_s) / n_s``
    (``u_s`` a random offset per stratum); merging all members by time interleaves the strata
    systematically, so any ``k`` consecutive examples contain ``k * n_s / N`` of stratum ``s``, +-1.
    """
    n = len(strata)
    times = np.empty(n, dtype=np.float64)
    for label in np.unique(strata):
        members = np.flatnonzero(strata == label)
        members = members[rng.permutation(len(members))]
        times[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(times, kind="stable")


class DialogBatchSampler(Sampler[list[SampleKey]]):
    """Global batches over the mix, sharded over ranks, reshuffled every epoch, resumable.

    Training (``shuffle=True``): a new random order each epoch -- stratified by ``strata`` (e.g. the
    source of each example) when given, so every global batch holds each source in its mix share
    (+-1 example), else uniform. ``group_batches > 1`` additionally sorts windows of that many global
    batches by length (the legacy ``grouped`` batching; it biases each batch towards one length
    class). The order is cut into global batches of ``batch_size * world_size`` examples; rank ``r``
    takes slice ``r`` of each, so the ranks together see exactly what one process with the global
    batch sees, and every rank yields the same number of batches (DDP would hang otherwise).

    Evaluation (``shuffle=False``): the set sorted by length (a fixed order); the last global batch
    is topped up with uncounted copies (``SampleKey.counted = False``) so every rank runs the same
    number of batches while each example is scored exactly once.

    Sharding is done here, so the Trainer runs with ``use_distributed_sampler=False`` (the CLI sets
    it). ``lengths`` are the row widths the collator will produce.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        strata: Optional[Sequence[int]] = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        group_batches: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if group_batches < 1:
            raise ValueError(f"group_batches must be >= 1, got {group_batches}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.strata = None if strata is None else np.asarray(strata)
        if self.strata is not None and len(self.strata) != len(self.lengths):
            raise ValueError(f"strata has {len(self.strata)} entries for {len(self.lengths)} examples")
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.group_batches = group_batches
        self.epoch = 0
        self.sampler = _EpochHook(self)
        self._resume: Optional[tuple[int, int]] = None  # (epoch, examples already trained in it)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start: a new order per epoch."""
        self.epoch = epoch

    def resume(self, epoch: int, examples_done: int) -> None:
        """Start the next iteration of ``epoch`` after its first ``examples_done`` examples."""
        self._resume = (int(epoch), int(examples_done))

    # ------------------------------------------------------------------------------------- order
    def epoch_order(self, epoch: Optional[int] = None) -> np.ndarray:
        """The example order of one epoch (before cutting into batches)."""
        n = len(self.lengths)
        if not self.shuffle:  # evaluation: one fixed, length-sorted order
            return np.argsort(self.lengths, kind="stable")
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        if self.strata is not None and len(np.unique(self.strata)) > 1:
            order = stratified_order(self.strata, rng)
        else:
            order = rng.permutation(n)
        if self.group_batches > 1:
            chunk = self.global_batch_size * self.group_batches
            parts = [order[s : s + chunk] for s in range(0, n, chunk)]
            order = np.concatenate([p[np.argsort(self.lengths[p], kind="stable")] for p in parts])
        return order

    def _batch_ids(self) -> np.ndarray:
        """The order in which the epoch's global batches are visited."""
        count = len(self)
        if self.shuffle and self.group_batches > 1:  # grouped windows: do not walk from short to long
            return np.random.default_rng([self.seed, self.epoch, 1]).permutation(count)
        return np.arange(count)

    def _resume_skip(self) -> int:
        """Global batches to skip once after :meth:`resume` (the ones already trained on)."""
        if self._resume is None:
            return 0
        epoch, done = self._resume
        self._resume = None
        if epoch != self.epoch:
            return 0
        skip = done // self.global_batch_size
        if done % self.global_batch_size:
            log.warning("resuming after %d examples of epoch %d, not a multiple of the global batch (%d): "
                        "the batch size or process count changed; continuing at the next whole batch",
                        done, epoch, self.global_batch_size)
            skip += 1
        return skip

    def __iter__(self) -> Iterator[list[SampleKey]]:
        # Keys are made per local batch as it is drawn: building all of an epoch's keys up front
        # cost ~225 MiB and seconds per rank at every epoch start with 750k examples (docs/BENCHMARKS.md).
        n, gbs = len(self.lengths), self.global_batch_size
        order = self.epoch_order()
        draw = self.epoch * n
        first, last = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for b in self._batch_ids()[self._resume_skip():].tolist():
            members = order[b * gbs : (b + 1) * gbs]
            counted = len(members)
            if counted < gbs and self.world_size > 1:  # last batch of an evaluation: even out the ranks
                members = np.concatenate([members, order[np.arange(gbs - counted) % n]])
            local = members[first:last].tolist()
            if local:
                yield [SampleKey(i, draw + i, counted=first + j < counted) for j, i in enumerate(local)]

    def __len__(self) -> int:
        n, gbs = len(self.lengths), self.global_batch_size
        return n // gbs if self.drop_last else math.ceil(n / gbs)


class LengthGroupedBatchSampler(DialogBatchSampler):
    """:class:`DialogBatchSampler` with length grouping on by default (``group_batches=64``): less
    padding without packing, at the price of batches biased towards one length class."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, group_batches: int = 64,
                 **kwargs: Any) -> None:
        super().__init__(lengths, batch_size, group_batches=group_batches, **kwargs)


class ResumableLoader(DataLoader):
    """A DataLoader Lightning saves and restores with every checkpoint (its ``_Stateful`` protocol).

    The state is the epoch and the number of examples the fit loop has *trained on* in it, read from
    ``progress()`` (the fit loop's processed-batch count times the global batch) rather than from the
    sampler, which runs ahead of training by the prefetched batches.
    """

    def __init__(self, *args: Any, progress: Optional[Callable[[], int]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        sampler: DialogBatchSampler = self.batch_sampler  # type: ignore[assignment]
        batches = int(self.progress()) if self.progress is not None else 0
        return {"epoch": sampler.epoch, "examples_done": batches * sampler.global_batch_size,
                "num_examples": len(sampler.lengths), "seed": sampler.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler: DialogBatchSampler = self.batch_sampler  # type: ignore[assignment]
        if state.get("num_examples") != len(sampler.lengths) or state.get("seed") != sampler.seed:
            log.warning("the checkpoint's training data (%s examples, seed %s) differs from this run's (%d, "
                        "seed %d): the data order restarts at the beginning of the epoch",
                        state.get("num_examples"), state.get("seed"), len(sampler.lengths), sampler.seed)
            return
        sampler.resume(int(state["epoch"]), int(state["examples_done"]))
