"""Dynamic batching: requests wait in a bounded queue; one worker thread takes the oldest request
plus every queued request that can share its sampler call (same batch key), up to ``max_batch_size``
or until the oldest has waited ``max_wait`` seconds, and runs them as one batch.

One worker, one batch at a time: the model is not thread-safe, and on one device a second concurrent
forward would only slow the first. Results and stream events go back to the asyncio side of the
server through ``loop.call_soon_threadsafe``; each job has its own asyncio queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

__all__ = ["BatchCancelled", "BatchScheduler", "Job", "QueueFull"]

log = logging.getLogger("diffusion_lm.serve")


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class BatchCancelled(Exception):
    """Raised inside a batch when every one of its requests was cancelled (their clients left)."""


@dataclass(eq=False)
class Job:
    """One request in the scheduler.

    Attributes:
        key: jobs run in the same batch only if their keys are equal (one sampler call serves them).
        payload: what the batch runner needs (prompt, settings, ...).
        stream: whether the runner should report steps (``emit``) or only the result.
        loop: the asyncio loop of the server; ``queue`` receives ``("step", x)``, then one
            ``("done", result)`` or ``("error", exception)``.
    """

    key: Hashable
    payload: Any
    stream: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    batch_size: int = 0

    def _put(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down, nobody is waiting
            pass

    def emit(self, value: Any) -> None:
        """Report a step (called from the worker thread)."""
        if not self.cancelled:
            self._put(("step", value))

    def finish(self, result: Any) -> None:
        self._put(("done", result))

    def fail(self, error: BaseException) -> None:
        self._put(("error", error))


class BatchScheduler:
    """Collects :class:`Job` s into batches and runs ``run_batch(jobs)`` on one worker thread.

    ``run_batch`` must deliver every job's result (``job.finish``) or error; if it raises, every job
    of the batch gets that error. A cancelled job that is still queued is dropped before it runs.

    Args:
        run_batch: runs one batch (all jobs share a key).
        max_batch_size: most jobs per batch.
        max_wait: seconds the oldest queued job waits for others before its batch starts anyway.
        max_queue: most queued (not yet running) jobs; ``submit`` raises :class:`QueueFull` beyond it.
    """

    def __init__(self, run_batch: Callable[[list[Job]], None], *, max_batch_size: int = 16,
                 max_wait: float = 0.01, max_queue: int = 256) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._running = 0
        self._counts = collections.Counter()
        self._batch_sizes: collections.Counter = collections.Counter()
        self._batch_seconds = 0.0

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="diffusion-lm-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the running batch; queued jobs fail with a shutdown error."""
        with self._cond:
            self._stopping = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in left:
            job.fail(RuntimeError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -------------------------------------------------------------------------------- requests
    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` when ``max_queue`` jobs are waiting."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                self._counts["rejected"] += 1
                raise QueueFull(self._retry_after())
            self._pending.append(job)
            self._counts["submitted"] += 1
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client left: drop ``job`` if queued; a running batch stops reporting its steps and is
        aborted when none of its jobs is wanted any more."""
        with self._cond:
            if job.cancelled:
                return
            job.cancelled = True
            self._counts["cancelled"] += 1
            try:
                self._pending.remove(job)
            except ValueError:
                pass
            self._cond.notify_all()

    def _retry_after(self) -> int:
        batches_ahead = len(self._pending) / self.max_batch_size + 1
        per_batch = self._batch_seconds / max(1,
                                              sum(self._batch_sizes.values())) if self._batch_sizes else 1.0
        return max(1, math.ceil(batches_ahead * per_batch))

    def stats(self) -> dict[str, Any]:
        """Counters since start: requests submitted / completed / failed / cancelled / rejected (429),
        batches run and their sizes (``{size: count}``), the queue depth and the running batch size."""
        with self._cond:
            sizes = dict(sorted(self._batch_sizes.items()))
            batches = sum(sizes.values())
            return {
                "requests": {k: self._counts[k] for k in ("submitted", "completed", "failed", "cancelled",
                                                          "rejected")},
                "batches": batches,
                "batch_sizes": {str(k): v for k, v in sizes.items()},
                "max_batch_size_seen": max(sizes, default=0),
                "mean_batch_size": round(sum(k * v for k, v in sizes.items()) / batches,
                                         3) if batches else 0.0,
                "aborted_batches": self._counts["aborted"],
                "queued": len(self._pending),
                "running": self._running,
                "limits": {"max_batch_size": self.max_batch_size,
                           "max_wait_ms": round(self.max_wait * 1000, 3), "max_queue": self.max_queue},
            }

    # ---------------------------------------------------------------------------------- worker
    def _next_batch(self) -> Optional[list[Job]]:
        with self._cond:
            while True:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                first = self._pending[0]
                same = [j for j in self._pending if j.key == first.key][: self.max_batch_size]
                wait = first.enqueued + self.max_wait - time.monotonic()
                if len(same) >= self.max_batch_size or wait <= 0:
                    break
                self._cond.wait(wait)  # more requests may join; the head may also be cancelled meanwhile
            for job in same:
                self._pending.remove(job)
            self._running = len(same)
            return same

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            for job in batch:
                job.batch_size = len(batch)
            t0 = time.perf_counter()
            outcome = "completed"
            try:
                self.run_batch(batch)
            except BatchCancelled:
                outcome = "aborted"
                for job in batch:
                    job.fail(BatchCancelled("cancelled"))
            except Exception as err:  # a bug or a device error: fail this batch, keep serving
                outcome = "failed"
                log.exception("batch of %d request(s) failed", len(batch))
                for job in batch:
                    job.fail(err)
            seconds = time.perf_counter() - t0
            with self._cond:
                self._running = 0
                self._batch_sizes[len(batch)] += 1
                self._batch_seconds += seconds
                if outcome == "aborted":
                    self._counts["aborted"] += 1
                else:
                    live = sum(not j.cancelled for j in batch)
                    self._counts["completed" if outcome == "completed" else "failed"] += live
                queued = len(self._pending)
            log.info("batch of %d request(s) %s in %.3f s (%s; %d queued)", len(batch), outcome, seconds,
                     _label(batch[0].key), queued)


def _label(key: Hashable) -> str:
    text = " ".join(map(str, key)) if isinstance(key, tuple) else str(key)
    return text if len(text) <= 80 else text[:77] + "..."
