"""The engine: one asyncio task that owns every session, the KV pool and the queues (vLLM's engine core, in small).

HTTP handlers only parse, call ``open`` / ``close`` / ``step`` (which put a command in the inbox and await its
answer) and format. The loop task alone applies commands, between runs: a session closed while its step waited is
answered 404, a step is checked against the session's positions at the moment it is accepted, and nothing changes
a slot while the worker thread runs on it. Runs never overlap (one worker thread); on a CPU a lone session's decode
step runs on the loop itself, since nobody else waits and a thread hop is pure cost (prompts, which can take
seconds, and steps that ask for the tail's drafts, a run per draft, always go to the worker, so /healthz keeps
answering). A GPU tail runs every step on the worker thread,
where its CUDA graphs were captured at start (splitcore/cudagraphs.py).

A watchdog (a done-callback on the loop and sweep tasks) turns an unexpected end of either into ``failed``: /healthz
then answers 503 (so Kubernetes restarts the pod) and every waiting or later request gets 503 at once, not a hang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from services.metrics import Metrics
from services.runner import ModelRunner
from services.scheduler import Plan, Scheduler, Work
from services.sessions import Session, SessionTable
from services.settings import ServerSettings
from splitcore.errors import (
    CapacityExceeded,
    InvalidRequest,
    LengthExceeded,
    PositionMismatch,
    ServiceUnavailable,
    SessionNotFound,
    SplitError,
)
from splitcore.graphs import TailRunner
from splitcore.sampling import Choice, History, Sampler, SamplingParams
from splitcore.tail_drafts import TailDrafter

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 10.0
# Gathering a batch stops when no step arrived for this long (the sessions missing from it may have ended).
ARRIVAL_GAP_S = 0.010
# Weight of the latest return gap in a session's moving average (services/scheduler.py, gather_until).
RETURN_GAP_WEIGHT = 0.3


@dataclass
class OpenRequest:
    max_length: int | None
    params: SamplingParams
    top_logprobs: int
    generated: list[int]
    min_length: int | None = None  # with it, a max_length beyond the slots is granted as a slot's length


@dataclass
class StepRequest:
    session_id: str
    hidden: np.ndarray  # [1, seq, hidden], validated, in the tail's dtype
    past_length: int
    keep_length: int | None
    keep: int  # outputs to answer with (the last ``keep`` positions)
    samples: int  # of those, how many to sample
    guesses: bool = False  # answer each sample with the look-ahead's guess at the token after it
    draft: int = 0  # tokens the tail should draft after the step (X-Draft)
    drafted: int = 0  # the step's positions after the first hold this many of the tail's latest drafts (X-Drafted)


@dataclass
class StepOutcome:
    output: np.ndarray  # [keep, vocab or hidden]
    choices: list[Choice]
    length: int
    seconds: float = 0.0  # the run that finished the step (its batch's, sampling and drafting included)
    drafts: list[int] | None = None  # the tail's drafts, after choices[drafts_after] (None: none asked for)
    drafts_after: int = 0
    draft_seconds: float = 0.0  # of ``seconds``, the drafting


@dataclass(eq=False)
class _Command:
    kind: str
    payload: object
    done: asyncio.Future


class Engine:
    def __init__(self, tail: TailRunner, settings: ServerSettings, metrics: Metrics, slots: int, slot_length: int,
                 clock: Callable[[], float] = time.monotonic, drafter: TailDrafter | None = None) -> None:
        self.tail = tail
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.pool = tail.new_pool(slots, slot_length)
        self.table = SessionTable(self.pool, settings.session_ttl_s, settings.evict_idle_s, clock)
        self.scheduler = Scheduler(settings.max_batch, settings.prefill_chunk, time.monotonic,
                                   settings.max_prompt_share)
        self.runner = ModelRunner(tail, self.pool, drafter)
        self.vocab = tail.bundle.manifest.model.vocab_size
        self.default_max_length = min(settings.default_max_length or slot_length, slot_length)
        self.inbox: deque[_Command] = deque()
        self.wake: asyncio.Event | None = None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="tail-runner")
        self.tasks: list[asyncio.Task] = []
        self.running: Plan | None = None
        self.failed: str | None = None
        self.stopping = False
        self.draining = False
        # On CUDA, the decode steps' CUDA graphs are captured before the first request (see _capture_graphs).
        self.warming = tail.graphs is not None and tail.graphs.usable(self.pool)

    # The handlers' side: enqueue and await.

    async def open(self, request: OpenRequest) -> Session:
        return await self._submit("open", request)

    async def close(self, session_id: str) -> None:
        await self._submit("close", session_id)

    async def step(self, request: StepRequest) -> StepOutcome:
        return await self._submit("step", request)

    async def _submit(self, kind: str, payload: object):
        self._check_alive()
        command = _Command(kind, payload, asyncio.get_running_loop().create_future())
        self.inbox.append(command)
        self.wake.set()
        return await command.done

    def _check_alive(self) -> None:
        if self.failed is not None:
            raise ServiceUnavailable(f"the tail engine stopped ({self.failed}); this replica is being restarted")
        if self.stopping or self.wake is None:
            raise ServiceUnavailable("the service is shutting down; retry on another replica")

    # Lifecycle, from the lifespan.

    def start(self) -> None:
        self.wake = asyncio.Event()
        for name, coroutine in (("loop", self._loop()), ("sweep", self._sweep())):
            task = asyncio.create_task(coroutine, name=f"engine-{name}")
            task.add_done_callback(self._watch)
            self.tasks.append(task)

    async def stop(self) -> None:
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self._fail_waiting(ServiceUnavailable("the service is shutting down; retry on another replica"))
        self.worker.shutdown(wait=True)

    def _watch(self, task: asyncio.Task) -> None:
        if self.stopping:
            return
        error = None if task.cancelled() else task.exception()
        reason = f"{task.get_name()} {'was cancelled' if error is None and task.cancelled() else 'ended'}"
        if error is not None:
            reason = f"{task.get_name()} failed: {type(error).__name__}: {error}"
        log.error("watchdog: %s; /healthz now fails and requests get 503", reason, exc_info=error)
        self.failed = reason
        self._fail_waiting(ServiceUnavailable(f"the tail engine stopped ({reason}); retry shortly"))

    def _fail_waiting(self, error: Exception) -> None:
        works = list(self.scheduler.decode) + list(self.scheduler.prefill)
        if self.running is not None:
            works += self.running.works
        futures = [c.done for c in self.inbox] + [w.done for w in works]
        self.inbox.clear()
        for future in futures:
            if not future.done():
                future.set_exception(error)

    # The loop task: the only code that changes sessions, the pool and the queues.

    async def _loop(self) -> None:
        if self.warming:
            await asyncio.get_running_loop().run_in_executor(self.worker, self._capture_graphs)
            self.warming = False
        while True:
            self._apply_inbox()
            if not self.scheduler.pending():
                self.wake.clear()
                await self.wake.wait()
                continue
            await self._gather()
            plan = self.scheduler.plan()
            if not plan:
                continue
            started = time.perf_counter()
            self.running = plan
            if (len(self.table.sessions) == 1 and not plan.chunks and self.tail.graphs is None
                    and not any(work.draft for work in plan.decode)):
                # One decode row on the CPU: short, and nobody else waits for the loop. (A GPU tail's CUDA graphs
                # belong to the worker thread that captured them; drafts are a run each.)
                self.runner.execute(plan)
            else:
                await asyncio.get_running_loop().run_in_executor(self.worker, self.runner.execute, plan)
            self.running = None
            self.scheduler.finish(plan)
            self._deliver(plan, time.perf_counter() - started)

    def _capture_graphs(self) -> None:
        """On the worker thread, before the first request: capture every decode bucket's CUDA graph. A failure is
        logged and the service serves on, every step run without a graph."""
        started, graphs = time.perf_counter(), self.tail.graphs
        try:
            count = graphs.capture(self.pool, self.tail.bundle.manifest.model.hidden_size)
        except Exception:  # noqa: BLE001 - onnxruntime's own exception types; the service still serves
            log.exception("capturing the decode steps' CUDA graphs failed; decode steps run without them")
            graphs.disabled = True
            return
        log.info("captured %d decode CUDA graphs (batch buckets up to %d rows) in %.1f s%s", count, self.pool.slots,
                 time.perf_counter() - started, "" if not graphs.disabled else "; the rest run without")

    async def _gather(self) -> None:
        """Wait briefly for the steps of the sessions the previous step answered, which are on their way (only those
        that usually come back within ``batch_gather_ms``: see ``Scheduler.gather_until``)."""
        deadline = self.scheduler.gather_until(time.monotonic(), self.settings.batch_gather_ms / 1000)
        if deadline is None:
            return
        while self.scheduler.expected() and (left := deadline - time.monotonic()) > 0:
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), min(left, ARRIVAL_GAP_S))
            except TimeoutError:
                return
            self._apply_inbox()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.table.sweep()

    def _apply_inbox(self) -> None:
        while self.inbox:
            command = self.inbox.popleft()
            if command.done.done():  # its request went away
                continue
            try:
                result = getattr(self, f"_{command.kind}")(command)
            except SplitError as e:
                command.done.set_exception(e)
            else:
                if result is not None:
                    command.done.set_result(result)

    def _open(self, command: _Command) -> Session:
        request: OpenRequest = command.payload
        if self.draining:
            raise CapacityExceeded("server is shutting down; open the session on another replica", retry_after_s=1)
        bad = next((t for t in request.generated if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise InvalidRequest(f"generated holds token id {bad}; this model's vocabulary is 0..{self.vocab - 1}")
        max_length = request.max_length or self.default_max_length
        if request.min_length is not None:
            if request.min_length > max_length:
                raise InvalidRequest(f"min_length {request.min_length} > max_length {max_length}")
            if request.min_length > self.pool.max_length:
                raise LengthExceeded(f"min_length {request.min_length} > the {self.pool.max_length} positions of "
                                     "this server's KV slots")
            max_length = min(max_length, self.pool.max_length)
        history = History(self.settings.sampling_history, request.generated)
        try:
            session = self.table.open(max_length, Sampler(request.params), history, request.top_logprobs)
        except CapacityExceeded:
            self.metrics.rejected.inc()
            raise
        log.info("session %s opened in slot %d (max_length %d)", session.id, session.slot, max_length,
                 extra={"session": session.id})
        return session

    def _close(self, command: _Command) -> bool:
        session = self.table.sessions.get(command.payload)
        if session is None:
            raise SessionNotFound(f"no session {command.payload[:64]!r}")
        work = self.scheduler.remove(session)
        if work is not None and not work.done.done():
            work.done.set_exception(SessionNotFound(f"session {session.id} was closed while this step waited"))
        self.table.close(session)
        return True

    def _step(self, command: _Command) -> None:
        request: StepRequest = command.payload
        session = self.table.get(request.session_id)
        if session.busy:
            raise PositionMismatch(f"session {session.id} already has a step queued or running; send one at a time")
        length = self.table.length(session)
        target = length
        if request.keep_length is not None:
            if not session.floor <= request.keep_length <= length:
                raise PositionMismatch(
                    f"cannot keep {request.keep_length} positions: the session holds {length} and its latest step "
                    f"started at {session.floor}; only the latest step can be rolled back"
                )
            target = request.keep_length
        if request.past_length != target:
            raise PositionMismatch(
                f"session holds {target} positions but the step continues from {request.past_length}; "
                f"send the hidden states of positions {target} onwards"
            )
        seq = request.hidden.shape[1]
        if request.drafted and not request.drafted + 1 == seq == request.samples:
            raise InvalidRequest(f"a step holding {request.drafted} of the tail's drafts has {request.drafted + 1} "
                                 f"positions and samples each; this one has {seq} and samples {request.samples}")
        if target + seq > session.max_length:
            raise LengthExceeded(f"maximum length exceeded: prefix {target} + current {seq} > {session.max_length}")
        if target < length:
            self.pool.truncate(session.slot, target)
            session.history.rollback(target)
        if session.answered_at is not None:  # how long this client takes to come back, for _gather
            gap = time.monotonic() - session.answered_at
            session.return_gap = gap if session.return_gap is None else (
                RETURN_GAP_WEIGHT * gap + (1 - RETURN_GAP_WEIGHT) * session.return_gap)
        session.floor, session.busy = target, True
        # The drafts answer only the step that starts where they follow on (at the last kept token's position: the
        # client rolled back to it). A retried step whose first try already drafted again, or a claim of more than
        # the tail holds, gets no new drafts: the tail cannot tell which of its samples is kept last.
        claimed = request.drafted <= len(session.drafts) and target == session.drafts_at
        drafted = session.drafts[: request.drafted] if claimed else []
        session.drafts, session.drafts_at = [], -1
        self.scheduler.add(Work(session, request.hidden, request.keep, request.samples, target, command.done,
                                guesses=request.guesses,
                                draft=(min(request.draft, self.settings.max_drafts)
                                       if request.samples and self.runner.drafter is not None else 0),
                                drafted=drafted))

    def _deliver(self, plan: Plan, elapsed: float) -> None:
        if plan.decode:
            self.metrics.batch_size.observe(len(plan.decode))
        for work in plan.works:
            if not work.finished:
                continue  # a prompt with chunks still to run
            session = work.session
            session.busy = False
            session.last_used = self.clock()
            session.answered_at = time.monotonic()
            if work.error is not None:
                if session.open:  # back to where the step started, so the client can retry it
                    self.pool.truncate(session.slot, min(work.start, self.table.length(session)))
                    session.history.rollback(work.start)
                self._answer(work.done, exception=work.error)
                continue
            self.metrics.positions.inc(work.seq)
            self.metrics.tokens.inc(len(work.choices))
            self.metrics.drafts.inc(len(work.drafts))
            self.metrics.steps.observe(elapsed)
            self._answer(work.done, StepOutcome(work.output, work.choices, self.table.length(session), elapsed,
                                                work.drafts if work.draft else None, work.drafts_after,
                                                plan.draft_seconds if work.draft else 0.0))

    @staticmethod
    def _answer(future: asyncio.Future, result: object = None, exception: BaseException | None = None) -> None:
        if future.done():
            return
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)

    # Read-only views for /readyz and /metrics (handlers on the same event loop: consistent between awaits).

    @property
    def sessions(self) -> int:
        return len(self.table.sessions)
