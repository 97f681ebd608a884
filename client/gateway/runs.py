"""One job on a worker thread, its events handed to the event loop through a queue.

Generation blocks (onnxruntime, HTTP to the tail), so it runs on a bounded thread pool; the handler awaits the
events without blocking the loop, so other requests are served meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Executor

from client.gateway.engine import Engine, Finished, Job

_END = object()


class Run:
    def __init__(self, engine: Engine, job: Job, executor: Executor) -> None:
        self.engine, self.job, self.executor = engine, job, executor
        self.cancelled = threading.Event()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.loop.run_in_executor(executor, self._work)

    def _work(self) -> None:
        def put(item: object) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

        if self.cancelled.is_set():  # the client left while the job waited for a thread
            put(_END)
            return
        try:
            for event in self.engine.run(self.job, self.cancelled):
                put(event)
        except BaseException as e:  # handed to the handler, which maps it to an OpenAI error
            put(e)
        finally:
            put(_END)

    async def events(self) -> AsyncIterator[str | Finished]:
        """Text pieces then one Finished; an error raised while generating is raised here."""
        try:
            while (item := await self.queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancelled.set()


async def collect(run: Run) -> tuple[str, Finished]:
    pieces: list[str] = []
    finished = None
    async for event in run.events():
        if isinstance(event, Finished):
            finished = event
        else:
            pieces.append(event)
    assert finished is not None, "the engine ends every run with Finished"
    return "".join(pieces), finished
