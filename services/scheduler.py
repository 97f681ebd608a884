"""The scheduler decides what the tail runs next; it runs nothing itself (vLLM's scheduler, in small).

Each scheduler step is one call of the runner: every pending single-position step (decode rows of different
sessions) as one batch first, then chunks of longer steps (prompts, chat turns, speculative drafts) up to the token
budget, several sessions' chunks in the same step when the budget allows. While no other session is decoding a
prompt runs in one piece, so a lone client's time to first token is not cut up. A burst of newcomers (sessions with a
prompt waiting and no recent step, at least two per generating session) gets one budget per newcomer per generating
session (up to ``max_prompt_share``, 16 by default): sixteen newcomers behind one decoder start decoding together
after one long step, instead of trickling in a chunk per step while every decode batch stays small (on a 2-core
CPU, fp32, 16 sessions opened at once: 5.1x one session's tokens/s instead of 3.37x, p99 step 2.5x the single
median instead of 8.6x; the early decoder pays one long step).

The answers of a step reach their clients together and their next steps trickle back over a few milliseconds:
``expected`` says how many of the sessions the previous step answered have not sent theirs yet, and the engine waits
a little for them (before a decode batch, and before a step of prompt chunks alone), so that a batch does not split
into halves that each wait for the other, and a decode step does not wait behind a chunk it could have joined.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from services.sessions import Session
from splitcore.sampling import Choice

# Prompts are cut into chunks while another open session stepped this recently and is still generating (its next
# step is on its way, and must not wait behind whole prompts; see ``generating``).
ACTIVE_RECENTLY_S = 1.0

# A session's next step is expected within its usual return gap times this, plus this margin.
RETURN_SLACK = 1.5
RETURN_MARGIN_S = 0.002
# A session that stepped recently still counts as generating (prompts are chunked for it) until its next step is
# overdue: its usual return gap times RETURN_SLACK, and at least this long.
GENERATING_FLOOR_S = 0.1


@dataclass(eq=False)
class Work:
    """One accepted step of one session: what to run, what to keep of the output, and where its answer goes."""

    session: Session
    hidden: np.ndarray  # [1, seq, hidden], in the tail's dtype
    keep: int  # positions whose output the step answers with (the last ``keep``)
    samples: int  # of those, how many to sample (0: none, the client samples or asked for logits)
    start: int  # the session's length before the step
    done: asyncio.Future
    guesses: bool = False  # answer each sample with the look-ahead's guess at the token after it
    draft: int = 0  # how many tokens the tail should draft after the step's last kept token (splitcore/tail_drafts.py)
    drafted: list[int] = field(default_factory=list)  # the tail's latest drafts that the step's later positions hold
    offset: int = 0  # positions already run
    output: np.ndarray | None = None  # [keep, vocab or hidden] once the last chunk ran
    choices: list[Choice] = field(default_factory=list)
    error: BaseException | None = None
    drafts: list[int] = field(default_factory=list)  # the tail's drafts, after choices[drafts_after]
    drafts_after: int = 0

    @property
    def seq(self) -> int:
        return self.hidden.shape[1]

    @property
    def finished(self) -> bool:
        return self.error is not None or self.offset == self.seq


@dataclass
class Chunk:
    work: Work
    size: int

    @property
    def last(self) -> bool:
        return self.work.offset + self.size == self.work.seq


@dataclass
class Plan:
    decode: list[Work] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    draft_seconds: float = 0.0  # of the run, the tail's drafting (every work of the plan waited for it)

    @property
    def works(self) -> list[Work]:
        return self.decode + [c.work for c in self.chunks]

    def __bool__(self) -> bool:
        return bool(self.decode or self.chunks)


class Scheduler:
    def __init__(self, max_batch: int, token_budget: int, clock: Callable[[], float], max_prompt_share: int = 16
                 ) -> None:
        self.max_batch = max_batch
        self.token_budget = token_budget
        # While sessions are generating, a step runs up to token_budget prompt positions times the number of prompts
        # waiting per generating session, at least 1 and at most this (1: strictly one budget per step).
        self.max_prompt_share = max_prompt_share
        self.clock = clock
        self.decode: deque[Work] = deque()
        self.prefill: deque[Work] = deque()
        self.expecting: list[Session] = []  # answered by the previous step: their next step is on its way
        self.active_at: dict[Session, float] = {}

    def add(self, work: Work) -> None:
        (self.decode if work.seq == 1 else self.prefill).append(work)

    def pending(self) -> bool:
        return bool(self.decode or self.prefill)

    def remove(self, session: Session) -> Work | None:
        """Take a closed session's queued step out (it has not run, or ran only some chunks); forget the session."""
        self.active_at.pop(session, None)
        for queue in (self.decode, self.prefill):
            for work in queue:
                if work.session is session:
                    queue.remove(work)
                    return work
        return None

    def expected(self) -> int:
        """Sessions the previous step answered (decode rows and finished prompts), still open, whose next step has
        not arrived yet."""
        return sum(1 for s in self.expecting if s.open and not s.busy)

    def gather_until(self, now: float, window_s: float) -> float | None:
        """Until when a step should wait for the expected sessions' next steps (None: run now).

        A session is waited for only while its next step is due within the window: the time it usually takes to
        come back after an answer (its client's compute plus the round trip), with some slack. A session 30 ms away
        is not waited for by its neighbours on every step, nor one that stopped (its step is overdue); one that has
        not come back even once yet is waited for the whole window, as all were before it had a history.
        """
        until = None
        for session in self.expecting:
            if not session.open or session.busy:
                continue
            if session.return_gap is None or session.answered_at is None:
                due = now + window_s
            else:
                due = session.answered_at + session.return_gap * RETURN_SLACK + RETURN_MARGIN_S
                if not now < due <= now + window_s:
                    continue
            until = due if until is None else max(until, due)
        return until

    def plan(self) -> Plan:
        plan = Plan()
        while self.decode and len(plan.decode) < self.max_batch:
            plan.decode.append(self.decode.popleft())
        now = self.clock()
        if plan.decode:
            self.active_at.update((w.session, now) for w in plan.decode)
        self.active_at = {s: t for s, t in self.active_at.items() if now - t < ACTIVE_RECENTLY_S and s.open}
        prefilling = {w.session for w in self.prefill}
        generating_now = {s for s in self.active_at if generating(s, now)}
        budget = None
        if generating_now - prefilling:  # another session is decoding: its next step must not wait behind prompts
            # One budget beside the decode rows (they count against it). A burst of newcomers (sessions that have not
            # generated lately; not the drafts or chat turns of generating ones) gets one whole budget per newcomer
            # per generating session when that makes 2 or more, so it does not trickle in behind a few decoders.
            newcomers = len(prefilling - self.active_at.keys())
            share = min(newcomers // len(generating_now), self.max_prompt_share)
            budget = self.token_budget * share if share > 1 else max(self.token_budget - len(plan.decode), 1)
        for work in self.prefill:
            if budget is not None and budget <= 0:
                break
            size = chunk_size(work, budget)
            plan.chunks.append(Chunk(work, size))
            if budget is not None:
                budget -= size
        return plan

    def finish(self, plan: Plan) -> None:
        """After the run: steps whose last chunk ran (or that failed) leave the prefill queue; a session whose prompt
        just finished is about to decode, so from now on other prompts are chunked for it too."""
        now = self.clock()
        self.expecting = [w.session for w in plan.decode]
        for chunk in plan.chunks:
            if chunk.work.finished and chunk.work in self.prefill:
                self.prefill.remove(chunk.work)
                self.active_at[chunk.work.session] = now
                self.expecting.append(chunk.work.session)


def generating(session: Session, now: float) -> bool:
    """Whether a session that stepped recently is still generating: its step is queued, or its next one is not
    overdue yet (a client that finished its answer, or went quiet, no longer has prompts cut up for it)."""
    if session.busy or session.return_gap is None or session.answered_at is None:
        return True
    return now < session.answered_at + max(session.return_gap * RETURN_SLACK, GENERATING_FLOOR_S)


def chunk_size(work: Work, budget: int | None) -> int:
    """Positions of ``work`` to run now: what is left, or the budget; the kept positions always run together."""
    remaining = work.seq - work.offset
    size = remaining if budget is None else min(remaining, budget)
    if size < remaining and remaining - size < work.keep:
        size = remaining - work.keep if remaining > work.keep else remaining
    return size
