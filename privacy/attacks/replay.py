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
from splitcore.kvpool import KVPool

EXACT = 1e-3  # relative distance under which a replayed state counts as an exact reproduction
TABLE_BATCH = 1024
TRIAL_SLOTS = 512  # candidates run in one batched step; more are run in several (bounds the trial pool's memory)


@dataclass
class Replayed:
    tokens: list[int]
    exact: list[bool]  # whether each chosen candidate reproduced the observed state to float precision


def first_position_table(head: HeadRunner, vocab: int) -> np.ndarray:
    """The hidden state at position 0 of every token id: [vocab, hidden]."""
    ids = np.arange(vocab, dtype=np.int64)[:, None]
    return np.concatenate([head_states(head, ids[i : i + TABLE_BATCH])[:, 0] for i in range(0, vocab, TABLE_BATCH)])


def _step(head: HeadRunner, prefix: KVPool, trial: KVPool, ids: np.ndarray) -> np.ndarray:
    """Run candidate ids [n] at the position after the recovered prefix: their states [n, hidden].

    Each candidate gets a trial slot holding a copy of the prefix's KV (the pool is on the CPU, so its slots are
    numpy views), and all of them run as one batched decode step; more candidates than slots run in turns."""
    states = []
    for lo in range(0, len(ids), trial.slots):
        chunk = ids[lo : lo + trial.slots]
        _seed(trial, prefix, len(chunk))
        out = head.decode(chunk[:, None].astype(np.int64), trial, list(range(len(chunk))))
        states.append(out[:, 0].astype(np.float32))
    return np.concatenate(states)


def _seed(trial: KVPool, prefix: KVPool, rows: int) -> None:
    length = prefix.length(0)
    trial.lengths[:rows] = length
    for layer in range(prefix.shape.layers):
        for kind in (0, 1):
            source = prefix.host_view(layer, kind, 0)
            for slot in range(rows):
                trial.host_view(layer, kind, slot)[...] = source


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
    prefix = head.new_cache(len(observed))
    trial = head.new_pool(min(widest, TRIAL_SLOTS), len(observed))
    if trial.device != "cpu":
        raise ValueError(f"replay copies KV through host memory; run the head on the CPU, not {trial.device}")
    tokens, exact = [], []
    for t, target in enumerate(observed):
        if t == 0 and first is not None:
            ids = np.asarray([int(_relative(first, target).argmin())])
        else:
            ids = proposals[t][:tried]
        distance = _relative(_step(head, prefix, trial, ids), target)
        if distance.min() >= EXACT and widest > tried and not (t == 0 and first is not None):
            ids = proposals[t][:widest]
            more = _step(head, prefix, trial, proposals[t][tried:widest])
            distance = np.concatenate([distance, _relative(more, target)])
        best = int(distance.argmin())
        tokens.append(int(ids[best]))
        exact.append(bool(distance[best] < EXACT))
        head.forward(np.asarray([[tokens[-1]]], dtype=np.int64), prefix)  # the prefix grows by the chosen token
    return Replayed(tokens, exact)
