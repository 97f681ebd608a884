"""Sessions and the KV slots they hold. Only the engine task touches this table (services/engine.py).

A session gets a slot of the KV pool when it opens (as Petals reserves a session's cache up front), so a session
that was admitted never runs out of memory later: when every slot is taken, idle sessions are evicted (oldest idle
first) or the new session is refused with 503 and Retry-After, and live ones keep working.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from splitcore.errors import CapacityExceeded, LengthExceeded, SessionNotFound
from splitcore.kvpool import KVPool
from splitcore.sampling import History, Sampler

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Session:
    id: str
    slot: int
    max_length: int
    sampler: Sampler
    history: History
    top_logprobs: int
    last_used: float
    floor: int = 0  # the length before the latest step: the shortest rollback allowed (X-Keep-Length)
    busy: bool = False  # a step of it is queued or running
    open: bool = field(default=True)
    answered_at: float | None = None  # time.monotonic() of its latest answer
    return_gap: float | None = None  # how long its next step takes to arrive after an answer (moving average)
    drafts: list[int] = field(default_factory=list)  # the tail's drafts in its latest answer
    drafts_at: int = -1  # where a step that holds them starts: the position of the token they follow


class SessionTable:
    def __init__(self, pool: KVPool, ttl_s: float, evict_idle_s: float, clock: Callable[[], float]) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self.evict_idle_s = evict_idle_s
        self.clock = clock
        self.sessions: dict[str, Session] = {}

    def length(self, session: Session) -> int:
        return self.pool.length(session.slot)

    @property
    def used_positions(self) -> int:
        return int(sum(self.pool.lengths[s.slot] for s in self.sessions.values()))

    def open(self, max_length: int, sampler: Sampler, history: History, top_logprobs: int) -> Session:
        if max_length > self.pool.max_length:
            raise LengthExceeded(f"max_length {max_length} > the {self.pool.max_length} positions of this server's "
                                 f"KV slots; ask for at most {self.pool.max_length}")
        if not self.pool.free:
            self._evict_one()
        session = Session(secrets.token_urlsafe(16), self.pool.acquire(), max_length, sampler, history, top_logprobs,
                          self.clock())
        self.sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        """The session, marked as used now; an expired one is closed and reported as gone."""
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id[:64]!r}: it was never opened, was closed, or expired")
        if self.clock() - session.last_used > self.ttl_s and not session.busy:
            self.close(session, "expired")
            raise SessionNotFound(f"session {session_id!r} expired after {self.ttl_s:.0f} s idle")
        session.last_used = self.clock()
        return session

    def close(self, session: Session, reason: str = "closed") -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        session.open = False
        self.pool.release(session.slot)
        log.info("session %s %s", session.id, reason, extra={"session": session.id, "reason": reason})

    def sweep(self) -> int:
        """Close sessions idle past the TTL; returns how many."""
        now = self.clock()
        stale = [s for s in self.sessions.values() if now - s.last_used > self.ttl_s and not s.busy]
        for session in stale:
            self.close(session, "expired")
        return len(stale)

    def _evict_one(self) -> None:
        now = self.clock()
        idle = [s for s in self.sessions.values() if now - s.last_used >= self.evict_idle_s and not s.busy]
        if not idle:
            # When the longest-idle session becomes evictable, if it stays idle.
            soonest = min((self.evict_idle_s - (now - s.last_used) for s in self.sessions.values()),
                          default=self.evict_idle_s)
            raise CapacityExceeded(
                f"server full: all {self.pool.slots} KV slots hold sessions active in the last "
                f"{self.evict_idle_s:.0f} s; retry later", retry_after_s=int(min(60, max(1, np.ceil(soonest)))),
            )
        self.close(min(idle, key=lambda s: s.last_used), "evicted to make room")
