"""Replay search: rebuild the prompt left to right by running candidates through the public head.

Given the prefix recovered so far, each of the inverter's top candidates for the next position is run through the
same public head graph (one batched step on the prefix's KV cache); the candidate whose hidden state lies closest
to the one observed is kept. Without noise the true token reproduces the observed state to float precision, so
the search is exact whenever the inverter ranks the true token among its candidates. With noise, the closest
state is still the maximum-likelihood choice among the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privacy.attacks.inverter import Inverter
from splitcore.graphs import HeadRunner
from splitcore.kvcache import KVCache

EXACT = 1e-3  # relative distance under which a replayed state counts as an exact reproduction


@dataclass
class Replayed:
    tokens: list[int]
    exact: list[bool]  # whether each chosen candidate reproduced the observed state to float precision


def replay(head: HeadRunner, inverter: Inverter, observed: np.ndarray, candidates: int) -> Replayed:
    """observed [seq, hidden], the states the tail operator saw -> the recovered token ids.

    ``candidates`` 0 (or at least the vocabulary size) tries every token: exhaustive, the inverter only orders it.
    """
    vocab = len(inverter.embedding)
    proposals = inverter.top(observed, vocab if candidates == 0 else min(candidates, vocab))
    cache = head.new_cache(1)
    tokens, exact = [], []
    for t, target in enumerate(observed):
        ids = proposals[t][:, None].astype(np.int64)
        batch = len(ids)
        trial = KVCache([np.repeat(k, batch, axis=0) for k in cache.keys],
                        [np.repeat(v, batch, axis=0) for v in cache.values])
        mask = np.ones((batch, t + 1), dtype=np.int64)
        positions = np.full((batch, 1), t, dtype=np.int64)
        states = head.forward(ids, mask, positions, trial)[:, 0].astype(np.float32)
        distance = np.linalg.norm(states - target, axis=-1) / max(float(np.linalg.norm(target)), 1e-12)
        best = int(distance.argmin())
        tokens.append(int(ids[best, 0]))
        exact.append(bool(distance[best] < EXACT))
        cache = KVCache([k[best : best + 1] for k in trial.keys], [v[best : best + 1] for v in trial.values])
    return Replayed(tokens, exact)
