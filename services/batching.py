"""Decode steps of concurrent sessions share one onnxruntime run.

A single-token step is memory-bound: the tail's weights are read once per run whatever the batch. So steps that
arrive while a run is in flight are queued and go together in the next run: their KV caches are left-padded to a
common length, the padding masked out, and each row keeps its own positions. Nobody waits for a batch to fill: a
lone step runs at once, and batches form only under load. Prefill chunks run on their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from splitcore.graphs import TailRunner, continuation
from splitcore.kvcache import KVCache

log = logging.getLogger(__name__)


@dataclass
class _Step:
    cache: KVCache
    hidden: np.ndarray  # [1, 1, hidden]
    done: asyncio.Future


class DecodeBatcher:
    def __init__(self, tail: TailRunner, max_batch: int, on_batch: Callable[[int], None] = lambda size: None) -> None:
        self.tail = tail
        self.max_batch = max_batch
        self.on_batch = on_batch
        self.queue: asyncio.Queue[_Step] = asyncio.Queue()

    async def step(self, cache: KVCache, hidden: np.ndarray) -> np.ndarray:
        """Logits of the next position for one session's single-token step; the cache grows in place."""
        done = asyncio.get_running_loop().create_future()
        await self.queue.put(_Step(cache, hidden, done))
        return await done

    async def run(self) -> None:
        """The loop that drains the queue; one per service, started in the lifespan."""
        while True:
            steps = [await self.queue.get()]
            while len(steps) < self.max_batch and not self.queue.empty():
                steps.append(self.queue.get_nowait())
            try:
                logits = await run_in_threadpool(run_batch, self.tail, [s.cache for s in steps],
                                                 [s.hidden for s in steps])
            except Exception as e:  # a failed run fails its steps, never the loop
                for s in steps:
                    if not s.done.done():
                        s.done.set_exception(e)
                continue
            self.on_batch(len(steps))
            for s, row in zip(steps, logits):
                if not s.done.done():
                    s.done.set_result(row)


def run_one(tail: TailRunner, cache: KVCache, hidden: np.ndarray) -> np.ndarray:
    """One sequence's step of any length; returns the last position's logits."""
    mask, positions = continuation(cache.length, hidden.shape[1])
    return tail.forward(hidden, mask, positions, cache, logits_to_keep=1)[0, -1]


def run_batch(tail: TailRunner, caches: list[KVCache], hidden: list[np.ndarray]) -> list[np.ndarray]:
    """One tail run over single-token steps of several sequences; returns each one's last-position logits."""
    if len(caches) == 1:
        return [run_one(tail, caches[0], hidden[0])]
    lengths = [c.length for c in caches]
    longest = max(lengths)
    batch = len(caches)
    mask = np.zeros((batch, longest + 1), dtype=np.int64)
    for row, length in enumerate(lengths):
        mask[row, longest - length :] = 1
    positions = np.asarray(lengths, dtype=np.int64)[:, None]
    padded = KVCache(_left_pad([c.keys for c in caches], lengths, longest),
                     _left_pad([c.values for c in caches], lengths, longest))
    stacked = np.concatenate([h.astype(tail.dtype, copy=False) for h in hidden], axis=0)
    logits = tail.forward(stacked, mask, positions, padded, logits_to_keep=1)
    for row, (cache, length) in enumerate(zip(caches, lengths)):
        start = longest - length
        # Copies, so no session keeps the whole batch's arrays alive through a view.
        cache.replace([k[row : row + 1, :, start:].copy() for k in padded.keys],
                      [v[row : row + 1, :, start:].copy() for v in padded.values])
    return [logits[row, -1] for row in range(batch)]


def _left_pad(per_session: list[list[np.ndarray]], lengths: list[int], longest: int) -> list[np.ndarray]:
    layers = len(per_session[0])
    first = per_session[0][0]
    out = []
    for layer in range(layers):
        shape = (len(per_session), first.shape[1], longest, first.shape[3])
        stacked = np.zeros(shape, dtype=first.dtype)
        for row, (arrays, length) in enumerate(zip(per_session, lengths)):
            if length:
                stacked[row, :, longest - length :] = arrays[layer][0]
        out.append(stacked)
    return out
