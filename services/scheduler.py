"""One loop runs everything the tail does for every session: decode batches first, prompts in chunks between them.

Two onnxruntime runs at once only fight over the cores, so the loop runs one at a time, off the event loop. Each
turn it runs the pending decode steps as one batch (services/batching.py), then at most one chunk of a pending
prompt: a session's next token waits for at most one chunk, however long the prompts of newcomers are. While no
other session is decoding a prompt runs in one piece, so a lone client's time to first token is not cut up.

The answers of a batch reach their clients together and the next steps trickle back in over several milliseconds:
the loop waits for a step of every session that decoded in the last second, while they keep coming (at most
``ARRIVAL_GAP_S`` apart) and for at most ``gather_s``, so that a batch does not split into halves that each wait for
the other (and so the padded batch can be reused). A lone session never waits: it is the only one decoding.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from services.batching import DecodeBatches
from splitcore.graphs import TailRunner
from splitcore.kvcache import KVCache

log = logging.getLogger(__name__)

# A prompt is cut into chunks while another open session decoded this recently.
DECODING_RECENTLY_S = 1.0
# Gathering a batch stops when no step arrived for this long (the sessions missing from it may have ended).
ARRIVAL_GAP_S = 0.015


@dataclass
class _Work:
    cache: KVCache
    hidden: np.ndarray  # [1, seq, hidden]
    done: asyncio.Future
    offset: int = 0  # positions of a prompt already run


class TailScheduler:
    def __init__(
        self,
        tail: TailRunner,
        max_batch: int,
        prefill_chunk: int,
        gather_s: float,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.batches = DecodeBatches(tail)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.gather_s = gather_s
        self.on_batch = on_batch
        self.decode: deque[_Work] = deque()
        self.prefill: deque[_Work] = deque()
        self.arrived = asyncio.Event()
        self.closed: list[KVCache] = []  # caches of sessions that ended since the last turn
        self.decoded_at: dict[int, float] = {}  # id of a session's cache -> when it was last in a decode batch

    async def step(self, cache: KVCache, hidden: np.ndarray) -> np.ndarray:
        """The tail's output at the last of ``hidden``'s positions; the cache grows by all of them."""
        work = _Work(cache, hidden, asyncio.get_running_loop().create_future())
        (self.decode if hidden.shape[1] == 1 else self.prefill).append(work)
        self.arrived.set()
        return await work.done

    def forget(self, cache: KVCache) -> None:
        """A session closed: batches stop waiting for it, prompts stop being cut for it, its batch rows are freed."""
        self.decoded_at.pop(id(cache), None)
        self.closed.append(cache)
        self.arrived.set()

    async def run(self) -> None:
        """The loop; one per service, started in the lifespan."""
        while True:
            # Between runs, so the padded batch is not in use by a worker thread.
            for cache in self.closed:
                self.batches.drop(cache)
            self.closed.clear()
            if not self.decode and not self.prefill:
                self.arrived.clear()
                await self.arrived.wait()
                continue
            try:
                if self.decode:
                    await self._gather()
                    await self._run_decode()
                if self.prefill:
                    await self._run_prefill_chunk(self.prefill[0])
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not leave every later step waiting forever
                log.exception("tail loop turn failed")

    async def _gather(self) -> None:
        now = time.monotonic()
        self.decoded_at = {k: t for k, t in self.decoded_at.items() if now - t < DECODING_RECENTLY_S}
        expected = min(max(len(self.decoded_at), 1), self.max_batch)
        deadline = now + self.gather_s
        while len(self.decode) < expected and (left := deadline - time.monotonic()) > 0:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), min(left, ARRIVAL_GAP_S))
            except TimeoutError:
                break

    async def _run_decode(self) -> None:
        steps = []
        while self.decode and len(steps) < self.max_batch:
            work = self.decode.popleft()
            if not work.done.cancelled():  # its client went away before it ran: the cache stays as it was
                steps.append(work)
        if not steps:
            return
        try:
            outputs = await run_in_threadpool(self.batches.run, [s.cache for s in steps], [s.hidden for s in steps])
        except Exception as e:  # a failed run fails its steps, never the loop
            log.exception("decode batch of %d failed", len(steps))
            for s in steps:
                _fail(s, e)
            return
        now = time.monotonic()
        self.decoded_at.update((id(s.cache), now) for s in steps)
        self.on_batch(len(steps))
        for s, output in zip(steps, outputs):
            _finish(s, output)

    async def _run_prefill_chunk(self, work: _Work) -> None:
        if work.offset == 0 and work.done.cancelled():
            self.prefill.popleft()
            return
        remaining = work.hidden.shape[1] - work.offset
        now = time.monotonic()
        decoding = any(now - t < DECODING_RECENTLY_S for k, t in self.decoded_at.items() if k != id(work.cache))
        size = min(remaining, self.prefill_chunk) if decoding else remaining
        chunk = work.hidden[:, work.offset : work.offset + size]
        try:
            output = await run_in_threadpool(self.batches.run_one, work.cache, chunk)
        except Exception as e:
            log.exception("prompt chunk failed")
            self.prefill.popleft()
            _fail(work, e)
            return
        work.offset += size
        if work.offset == work.hidden.shape[1]:
            self.prefill.popleft()
            _finish(work, output)


def _finish(work: _Work, output: np.ndarray) -> None:
    if not work.done.done():
        work.done.set_result(output)


def _fail(work: _Work, error: Exception) -> None:
    if not work.done.done():
        work.done.set_exception(error)
