"""Single-token steps of several sessions as one tail run.

A decode step is memory-bound: the tail's weights are read once per run whatever the batch, so extra rows cost
little until compute catches up. Sessions have different lengths: their caches are left-padded to the longest,
the padding masked out, and each row keeps its own positions.

Building the padded arrays copies every cache, and cutting the rows back out copies them again. While the same
sessions decode together step after step (the steady state under load) neither is needed: the run's present
outputs are the next run's padded past, and each session's cache is a view of its row. Copies happen only when the
batch changes: rows that leave are copied out (a view must not keep a whole batch alive), and the next batch is
built afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from splitcore.graphs import TailRunner, continuation
from splitcore.kvcache import KVCache


def run_one(tail: TailRunner, cache: KVCache, hidden: np.ndarray) -> np.ndarray:
    """One sequence's step of any length; returns the last position's logits."""
    mask, positions = continuation(cache.length, hidden.shape[1])
    return tail.forward(hidden, mask, positions, cache, logits_to_keep=1)[0, -1]


@dataclass
class _Batch:
    caches: list[KVCache]  # row order
    keys: list[np.ndarray]  # per layer [rows, kv_heads, longest, head_dim], left-padded
    values: list[np.ndarray]
    mask: np.ndarray  # [rows, longest]
    given: list[list[np.ndarray]]  # the key list each row's cache was handed, to tell if it was replaced since
    closed: set[int] = field(default_factory=set)  # ids of member caches whose sessions ended
    rows: dict[int, int] = field(init=False)  # id of a member cache -> its row

    def __post_init__(self) -> None:
        self.rows = {id(cache): row for row, cache in enumerate(self.caches)}

    def row_of(self, cache: KVCache) -> int | None:
        """The cache's row, while the cache still holds the view of it it was handed."""
        row = self.rows.get(id(cache))
        if row is None or self.caches[row] is not cache or cache.keys is not self.given[row]:
            return None
        return row


class DecodeBatches:
    """Runs decode steps of several sessions together, keeping the padded batch between runs of the same sessions."""

    def __init__(self, tail: TailRunner) -> None:
        self.tail = tail
        self.current: _Batch | None = None

    def run(self, caches: list[KVCache], hidden: list[np.ndarray]) -> list[np.ndarray]:
        """Each session's next-position logits; every cache grows by one position."""
        if len(caches) == 1:
            return [self.run_one(caches[0], hidden[0])]
        rows = self._rows_in_current(caches)
        if rows is None:
            self._start(caches)
            rows = list(range(len(caches)))
        batch = self.current
        order = np.argsort(rows)
        stacked = np.concatenate([hidden[i].astype(self.tail.dtype, copy=False) for i in order], axis=0)
        mask = np.concatenate([batch.mask, np.ones((len(caches), 1), dtype=np.int64)], axis=1)
        positions = batch.mask.sum(axis=1, keepdims=True)
        cache = KVCache(batch.keys, batch.values)
        logits = self.tail.forward(stacked, mask, positions, cache, logits_to_keep=1)
        batch.keys, batch.values, batch.mask = cache.keys, cache.values, mask
        self._hand_out(batch)
        return [logits[row, -1] for row in rows]

    def run_one(self, cache: KVCache, hidden: np.ndarray) -> np.ndarray:
        """A step of any length for one session, taking its cache out of the current batch first if it is there."""
        self.release(cache)
        return run_one(self.tail, cache, hidden)

    def _rows_in_current(self, caches: list[KVCache]) -> list[int] | None:
        batch = self.current
        if batch is None or len(batch.caches) != len(caches):
            return None
        rows = [batch.row_of(cache) for cache in caches]
        if None in rows or len(set(rows)) != len(rows):
            return None
        return rows

    def _start(self, caches: list[KVCache]) -> None:
        """A new padded batch from the caches' own arrays (or their rows of the previous batch)."""
        lengths = [c.length for c in caches]
        longest = max(lengths)
        mask = np.zeros((len(caches), longest), dtype=np.int64)
        for row, length in enumerate(lengths):
            mask[row, longest - length :] = 1
        keys = _left_pad([c.keys for c in caches], lengths, longest)
        values = _left_pad([c.values for c in caches], lengths, longest)
        if self.current is not None:
            staying = {id(c) for c in caches}
            for cache in self.current.caches:
                if id(cache) not in self.current.closed and id(cache) not in staying:
                    self.release(cache)
        self.current = _Batch(list(caches), keys, values, mask, [])
        self._hand_out(self.current)

    def _hand_out(self, batch: _Batch) -> None:
        """Each session's cache becomes a view of its row (no copy)."""
        batch.given = []
        for row, cache in enumerate(batch.caches):
            start = int(np.argmax(batch.mask[row])) if batch.mask[row].any() else batch.mask.shape[1]
            cache.replace([k[row : row + 1, :, start:] for k in batch.keys],
                          [v[row : row + 1, :, start:] for v in batch.values])
            batch.given.append(cache.keys)

    def drop(self, cache: KVCache) -> None:
        """A session ended: its rows need no copying out, and a batch of ended sessions is freed at once."""
        batch = self.current
        if batch is None or id(cache) not in batch.rows:
            return
        batch.closed.add(id(cache))
        if all(id(c) in batch.closed for c in batch.caches):
            self.current = None

    def release(self, cache: KVCache | None = None) -> None:
        """Give a cache that is a view of the current batch (default: every such cache) arrays of its own."""
        batch = self.current
        if batch is None:
            return
        for member in [cache] if cache is not None else list(batch.caches):
            if batch.row_of(member) is not None:
                member.replace([k.copy() for k in member.keys], [v.copy() for v in member.values])
        if all(batch.row_of(member) is None for member in batch.caches):
            self.current = None


def _left_pad(per_session: list[list[np.ndarray]], lengths: list[int], longest: int) -> list[np.ndarray]:
    first = per_session[0][0]
    out = []
    for layer in range(len(per_session[0])):
        stacked = np.empty((len(per_session), first.shape[1], longest, first.shape[3]), dtype=first.dtype)
        for row, (arrays, length) in enumerate(zip(per_session, lengths)):
            stacked[row, :, : longest - length] = 0
            if length:
                stacked[row, :, longest - length :] = arrays[layer][0]
        out.append(stacked)
    return out
