"""Replay search: rebuild the prompt left to right by running candidates through the public head.

Given the prefix recovered so far, the inverter's top candidates for the next position are run through the same
public head graph (one batched step on the prefix's KV cache); the candidate whose hidden state lies closest to
the one observed is kept. Without noise the true token reproduces the observed state to float precision, so a
position is recovered exactly whenever the true token is among the candidates; when none reproduces the state,
the search widens to ``fallback`` candidates. With noise nothing reproduces exactly, and the closest state is the
maximum-likelihood choice among the candidates (so the search does not widen).

Position 0 sees no context, so its state is a function of the token alone: the attacker tabulates it once for the
whole vocabulary (``first_position_table``) and reads the first token off by nearest neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privacy.attacks.inverter import Inverter
from privacy.boundary import head_states
from splitcore.graphs import HeadRunner
from splitcore.kvcache import KVCache

EXACT = 1e-3  # relative distance under which a replayed state counts as an exact reproduction
TABLE_BATCH = 1024


@dataclass
class Replayed:
    tokens: list[int]
    exact: list[bool]  # whether each chosen candidate reproduced the observed state to float precision


def first_position_table(head: HeadRunner, vocab: int) -> np.ndarray:
    """The hidden state at position 0 of every token id: [vocab, hidden]."""
    ids = np.arange(vocab, dtype=np.int64)[:, None]
    return np.concatenate([head_states(head, ids[i : i + TABLE_BATCH])[:, 0] for i in range(0, vocab, TABLE_BATCH)])


def _step(head: HeadRunner, cache: KVCache, t: int, ids: np.ndarray) -> tuple[np.ndarray, KVCache]:
    """Run candidate ids [n] at position t after the cached prefix: their states [n, hidden] and the grown caches."""
    batch = len(ids)
    trial = KVCache([np.repeat(k, batch, axis=0) for k in cache.keys],
                    [np.repeat(v, batch, axis=0) for v in cache.values])
    mask = np.ones((batch, t + 1), dtype=np.int64)
    positions = np.full((batch, 1), t, dtype=np.int64)
    states = head.forward(ids[:, None].astype(np.int64), mask, positions, trial)[:, 0].astype(np.float32)
    return states, trial


def _relative(states: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.linalg.norm(states - target, axis=-1) / max(float(np.linalg.norm(target)), 1e-12)


def replay(head: HeadRunner, inverter: Inverter, observed: np.ndarray, candidates: int, fallback: int = 0,
           first: np.ndarray | None = None) -> Replayed:
    """observed [seq, hidden], the states the tail operator saw -> the recovered token ids.

    ``candidates`` 0 (or at least the vocabulary size) tries every token: exhaustive, the inverter only orders it.
    ``first``: the ``first_position_table``, used for position 0 when given.
    """
    vocab = len(inverter.embedding)
    tried = vocab if candidates == 0 else min(candidates, vocab)
    widest = max(tried, min(fallback, vocab))
    proposals = inverter.top(observed, widest)
    cache = head.new_cache(1)
    tokens, exact = [], []
    for t, target in enumerate(observed):
        if t == 0 and first is not None:
            ids = np.asarray([int(_relative(first, target).argmin())])
        else:
            ids = proposals[t][:tried]
        states, trial = _step(head, cache, t, ids)
        distance = _relative(states, target)
        if distance.min() >= EXACT and widest > tried and not (t == 0 and first is not None):
            more_states, more_trial = _step(head, cache, t, proposals[t][tried:widest])
            ids = proposals[t][:widest]
            distance = np.concatenate([distance, _relative(more_states, target)])
            trial = KVCache([np.concatenate([a, b]) for a, b in zip(trial.keys, more_trial.keys)],
                            [np.concatenate([a, b]) for a, b in zip(trial.values, more_trial.values)])
        best = int(distance.argmin())
        tokens.append(int(ids[best]))
        exact.append(bool(distance[best] < EXACT))
        cache = KVCache([k[best : best + 1] for k in trial.keys], [v[best : best + 1] for v in trial.values])
    return Replayed(tokens, exact)
