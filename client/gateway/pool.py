"""Idle cached sequences kept for prefix reuse: bounded, least recently used first out, one request at a time each.

A request takes a sequence out of the pool while it runs, so no two requests ever share one; it comes back when
the request ends cleanly and is dropped (its tail session closed) when the request failed half-way, because its two
KV caches may then disagree. Prompts are matched by token ids (see ``client.gateway.sequence``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from client.gateway.sequence import CachedSequence
from splitcore.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Lease:
    params: SamplingParams
    conversation: CachedSequence
    reused: bool


def shareable(params: SamplingParams) -> bool:
    """Whether a conversation with these settings may continue one left from another request. A seeded one may: each
    position's draw depends only on the seed and the position (splitcore/sampling.py), so continuing gives what a
    fresh run gives. Not with a repetition penalty and a seed: the continued conversation's penalty also sees its
    earlier answers, which a fresh run's does not, and a seed promises the same text."""
    return params.greedy or params.seed is None or params.repetition_penalty == 1.0


class ConversationPool:
    def __init__(self, open_conversation: Callable[[SamplingParams], CachedSequence], size: int) -> None:
        self.open_conversation = open_conversation
        self.size = size
        self.lock = threading.Lock()
        self.idle: list[Lease] = []  # least recently used first

    def acquire(self, ids: Sequence[int], params: SamplingParams) -> Lease:
        """The idle sequence holding the longest prefix of the prompt ``ids`` for these sampling settings, or a new
        one."""
        if shareable(params):
            with self.lock:
                fits = [i for i, lease in enumerate(self.idle)
                        if lease.params == params and lease.conversation.extends(ids)]
                if fits:
                    best = max(fits, key=lambda i: self.idle[i].conversation.positions)
                    lease = self.idle.pop(best)
                    lease.reused = True
                    return lease
        return Lease(params, self.open_conversation(params), reused=False)

    def release(self, lease: Lease, clean: bool) -> None:
        if not (clean and shareable(lease.params) and self.size):
            lease.conversation.close()
            return
        with self.lock:
            self.idle.append(lease)
            evicted = self.idle[: -self.size]
            del self.idle[: -self.size]
        for old in evicted:
            log.debug("pool full: closing a conversation of %d positions", old.conversation.positions)
            old.conversation.close()

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for lease in idle:
            lease.conversation.close()
