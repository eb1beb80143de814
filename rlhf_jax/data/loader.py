"""Deterministic, resumable, multi-host batches from a random-access source.

The global example stream is a pure function of (seed, step), so a run resumed at
step N sees exactly the batches an uninterrupted run would, and nothing but the step
needs checkpointing:

    g = step·B + i                      (i-th row of global batch `step`, B = global batch size)
    epoch, pos = g // n, g % n          (n = number of examples)
    example = perm_epoch[pos]           perm_epoch = default_rng([seed, epoch]).permutation(n)

Batches run straight across epoch boundaries. Process p of P loads only rows
[p·B/P, (p+1)·B/P) of each global batch; `jax.make_array_from_process_local_data`
assembles the global array.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


class BatchLoader:
    """Rows [B/P, ...] of each global batch for this process; `get_batch(step)` is stateless."""

    def __init__(
        self,
        source: Sequence[dict[str, np.ndarray]],
        global_batch_size: int,
        seed: int,
        shuffle: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.source = source
        self.num_examples = len(source)
        self.global_batch_size = global_batch_size
        self.seed, self.shuffle = seed, shuffle
        self.process_index, self.process_count = _process(process_index, process_count)
        if self.num_examples == 0:
            raise ValueError(
                "BatchLoader: the dataset is empty (0 examples); check the data path, or use a "
                "larger corpus / smaller seq_len."
            )
        if global_batch_size <= 0 or global_batch_size % self.process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of the "
                f"{self.process_count} processes."
            )
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative integer.")
        self.local_batch_size = global_batch_size // self.process_count
        self._perms: dict[int, np.ndarray] = {}
        self._perms_lock = threading.Lock()  # get_batch may run on the prefetch thread and the caller's

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per pass over the data (fractional: batches straddle epochs)."""
        return self.num_examples / self.global_batch_size

    def example_indices(self, step: int) -> np.ndarray:
        """int64 [B/P]: source indices of this process's rows of global batch `step`."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0.")
        first = step * self.global_batch_size + self.process_index * self.local_batch_size
        g = first + np.arange(self.local_batch_size, dtype=np.int64)
        epochs, pos = np.divmod(g, self.num_examples)
        out = np.empty_like(g)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._permutation(int(e))[pos[sel]]
        return out

    def get_batch(self, step: int) -> Batch:
        """This process's rows of global batch `step`: dict of arrays [B/P, ...]."""
        return _fetch(self.source, self.example_indices(step))

    def iterate(self, start_step: int, num_steps: int, prefetch: int = 2) -> Iterator[tuple[int, Batch]]:
        """Yields (step, batch) for steps start_step .. start_step+num_steps-1, loading up to
        `prefetch` batches ahead on a background thread (prefetch=0: load inline)."""
        steps = range(start_step, start_step + num_steps)
        if prefetch <= 0:
            yield from ((s, self.get_batch(s)) for s in steps)
            return
        yield from _prefetched(((s, self.get_batch(s)) for s in steps), prefetch)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        with self._perms_lock:
            if epoch not in self._perms:
                if len(self._perms) >= 2:  # consecutive steps touch at most two epochs when B <= n
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            return self._perms[epoch]


class Resampled(Sequence):
    """`source` seen through `indices` (a bootstrap resample, a subset): row i is source[indices[i]]."""

    def __init__(self, source: Sequence[dict[str, np.ndarray]], indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.source[int(self.indices[i])]

    def __getitems__(self, idx: list[int]) -> list[dict[str, np.ndarray]]:
        return _rows(self.source, [int(self.indices[i]) for i in idx])


def bootstrap(source: Sequence[dict[str, np.ndarray]], seed: int) -> Resampled:
    """A bootstrap resample of `source`: as many rows, drawn uniformly with replacement (seeded), e.g. one
    ensemble member's training set (Efron's bootstrap; each member sees about 63% of the distinct rows)."""
    n = len(source)
    return Resampled(source, np.random.default_rng([seed, 0xB007]).integers(0, n, n))


def eval_batches(
    source: Sequence[dict[str, np.ndarray]],
    batch_size: int,
    max_batches: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """Every example once, in order, as this process's rows of global batches of `batch_size`.

    The last global batch is filled with all-zero rows (tokens 0, every mask 0), so a loss
    summed over masked tokens is exact. Every process yields the same number of batches.
    """
    p, count = _process(process_index, process_count)
    if batch_size <= 0 or batch_size % count:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of the {count} processes.")
    n, local = len(source), batch_size // count
    num = -(-n // batch_size)
    if max_batches is not None:
        num = min(num, max_batches)
    template = None
    for b in range(num):
        rows = b * batch_size + p * local + np.arange(local)
        real = rows[rows < n]
        batch = _fetch(source, real) if len(real) else None
        if len(real) < local:
            template = template or source[0]
            pad = {k: np.zeros((local - len(real), *np.shape(v)), _dtype(np.asarray(v))) for k, v in template.items()}
            batch = pad if batch is None else {k: np.concatenate([batch[k], pad[k]]) for k in batch}
        yield batch


def _fetch(source: Sequence[dict[str, np.ndarray]], indices: np.ndarray) -> Batch:
    rows = _rows(source, [int(i) for i in indices])
    return {k: np.stack([np.asarray(r[k], _dtype(np.asarray(r[k]))) for r in rows]) for k in rows[0]}


def _rows(source: Sequence[dict[str, np.ndarray]], idx: list[int]) -> list[dict[str, np.ndarray]]:
    # ArrayRecord sources read a list of keys in one call; plain sequences one at a time.
    return source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]


def _dtype(x: np.ndarray):
    """int32 for a scalar feature the source hands back as a Python int (JAX runs without x64)."""
    return np.int32 if x.dtype == np.int64 else x.dtype


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} must be in [0, process_count={count}).")
    return index, count


def _prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Runs `items` on a daemon thread, `depth` ahead; errors re-raise here; closing stops it."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:
        while not stop.is_set():  # a closed consumer sets stop; never block on a full queue then
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, done))
        except BaseException as e:  # handed to the consumer, which re-raises it
            put((False, e))

    thread = threading.Thread(target=produce, daemon=True, name="BatchLoader.prefetch")
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5.0)
