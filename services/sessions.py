"""Sessions and their tail KV caches, bounded by count and by reserved KV bytes.

Each session reserves the KV bytes of its maximum length when it opens (as Petals does), so a session that was
admitted never runs out of room later: when the store is full, new sessions are refused (or idle ones evicted),
and live ones keep working.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from splitcore.errors import CapacityExceeded, LengthExceeded, SessionNotFound
from splitcore.graphs import TailRunner
from splitcore.kvcache import KVCache
from splitcore.sampling import Sampler

log = logging.getLogger(__name__)


@dataclass
class Session:
    id: str
    cache: KVCache
    sampler: Sampler
    max_length: int
    reserved_bytes: int
    top_logprobs: int
    generated: list[int]
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def length(self) -> int:
        return self.cache.length


class SessionStore:
    def __init__(
        self,
        tail: TailRunner,
        max_sessions: int,
        max_kv_bytes: int,
        ttl_s: float,
        evict_idle_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_close: Callable[[KVCache], None] = lambda cache: None,
    ) -> None:
        self.tail = tail
        self.max_sessions = max_sessions
        self.max_kv_bytes = max_kv_bytes
        self.ttl_s = ttl_s
        self.evict_idle_s = evict_idle_s
        self.clock = clock
        self.on_close = on_close
        self.sessions: dict[str, Session] = {}
        model = tail.bundle.manifest.model
        per_layer = 2 * model.num_key_value_heads * model.head_dim * tail.dtype.itemsize
        self.kv_bytes_per_position = tail.num_layers * per_layer
        self.max_positions = model.max_position_embeddings

    @property
    def reserved_bytes(self) -> int:
        return sum(s.reserved_bytes for s in self.sessions.values())

    @property
    def used_bytes(self) -> int:
        return sum(s.length for s in self.sessions.values()) * self.kv_bytes_per_position

    def open(self, max_length: int, sampler: Sampler, top_logprobs: int, generated: list[int]) -> Session:
        if max_length > self.max_positions:
            raise LengthExceeded(f"max_length {max_length} > the model's {self.max_positions} positions")
        need = max_length * self.kv_bytes_per_position
        if need > self.max_kv_bytes:
            raise LengthExceeded(
                f"max_length {max_length} needs {need} KV bytes, more than this server's whole budget "
                f"({self.max_kv_bytes}); ask for at most {self.max_kv_bytes // self.kv_bytes_per_position}"
            )
        self.sweep()
        self._make_room(need)
        session = Session(
            id=secrets.token_urlsafe(16),
            cache=self.tail.new_cache(1),
            sampler=sampler,
            max_length=max_length,
            reserved_bytes=need,
            top_logprobs=top_logprobs,
            generated=list(generated),
            last_used=self.clock(),
        )
        self.sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}: it was never opened, was closed, or expired")
        if self.clock() - session.last_used > self.ttl_s and not session.lock.locked():
            self.close(session_id, "expired")
            raise SessionNotFound(f"session {session_id!r} expired after {self.ttl_s:.0f} s idle")
        session.last_used = self.clock()
        return session

    def close(self, session_id: str, reason: str = "closed") -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        self.on_close(session.cache)
        log.info("session %s %s", session_id, reason, extra={"session": session_id, "reason": reason})

    def sweep(self) -> int:
        """Close sessions idle past the TTL; returns how many."""
        now = self.clock()
        stale = [s.id for s in self.sessions.values() if now - s.last_used > self.ttl_s and not s.lock.locked()]
        for session_id in stale:
            self.close(session_id, "expired")
        return len(stale)

    def _make_room(self, need: int) -> None:
        def full() -> bool:
            return len(self.sessions) >= self.max_sessions or self.reserved_bytes + need > self.max_kv_bytes

        if not full():
            return
        now = self.clock()
        idle = sorted(
            (s for s in self.sessions.values() if now - s.last_used >= self.evict_idle_s and not s.lock.locked()),
            key=lambda s: s.last_used,
        )
        for session in idle:
            if not full():
                break
            self.close(session.id, "evicted to make room")
        if full():
            raise CapacityExceeded(
                f"server full: {len(self.sessions)}/{self.max_sessions} sessions, "
                f"{self.reserved_bytes + need}/{self.max_kv_bytes} KV bytes with this one; retry later"
            )
