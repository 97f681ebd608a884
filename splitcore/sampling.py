"""Next-token choice from logits: greedy, or seeded sampling with temperature, top-k, top-p, repetition penalty.

``choose_batch`` picks for many rows at once (the tail service samples a whole decode batch in one call, each row
with its own parameters, RNG and history); ``Sampler.choose`` is the same code for one row, so a client that samples
on its own machine (private-output mode) and the service pick identical tokens for the same logits and seed.

A sampled position's random number is a function of the seed and the position alone (``Sampler.draw``), not of how
many were drawn before: speculation samples positions that a rejected draft then discards, and samples them again
later, so a draw that advanced a stream would give a seeded conversation a different text with every pattern of
drafts (which depends on the machine's timing). Keyed by position, a seed gives the same text with speculation on or
off, and each position's token is still a draw from its distribution, independent of the others.

Numerics: scores are shifted by their maximum before dividing by the temperature, so any temperature > 0 (even
1e-308) is finite; log-probabilities of tokens a truncation removed are never reported (they would be -inf).
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

_MASK = 2**64 - 1
# top-p looks at this many best candidates first and sorts the whole vocabulary only when they hold too little mass.
TOP_P_CANDIDATES = 1024


# Generated tokens the repetition penalty looks at (the latest ones), on the service and the client alike.
HISTORY_LIMIT = 1024
# Samples a History keeps beyond its limit: one speculative step's (X-Sample-Count is at most this), so that samples a
# rollback then drops never pushed out tokens the penalty still looks at.
ROLLBACK_SLACK = 256


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation; seed None means not reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Choice:
    token: int
    logprob: float
    top: list[tuple[int, float]]
    # The tail's look-ahead (splitcore/lookahead.py): its guess at the token after this one, and the chance it is right.
    guess: tuple[int, float] | None = None
    # The tail's own drafts after this token (splitcore/tail_drafts.py), where it made some.
    drafts: tuple[int, ...] = ()


class Sampler:
    """One sequence's parameters and random numbers. Deterministic for a given seed and the same logits at the same
    positions."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.key = params.seed if params.seed is not None else secrets.randbits(63)
        self.unpositioned = 0  # draws asked for without a position, numbered on their own

    def draw(self, position: int | None = None) -> float:
        """A number in [0, 1) for the sample taken at ``position``: SplitMix64 of the key and the position (None or
        negative: the next of a separate numbered series)."""
        if position is None or position < 0:
            self.unpositioned += 1
            position = -self.unpositioned
        z = (self.key * 0x9E3779B97F4A7C15 + (position & _MASK) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return ((z ^ (z >> 31)) >> 11) * 2.0**-53

    def choose(self, logits: np.ndarray, history: Sequence[int] = (), top_logprobs: int = 0,
               position: int | None = None) -> Choice:
        """``logits`` [vocab]; ``history``: tokens the repetition penalty demotes; ``position``: where it is sampled."""
        return choose_batch([np.asarray(logits)], [self], [history], [top_logprobs], [position])[0]

    def penalized(self, history: History) -> np.ndarray | tuple:
        """The tokens of ``history`` the repetition penalty looks at: none without a penalty (not worth collecting
        on every token)."""
        return history.tokens() if self.params.repetition_penalty != 1.0 else ()


def choose_batch(logits: np.ndarray | Sequence[np.ndarray], samplers: Sequence[Sampler],
                 histories: Sequence[Sequence[int] | np.ndarray], top_logprobs: Sequence[int],
                 positions: Sequence[int | None] | None = None) -> list[Choice]:
    """One choice per row of ``logits`` ([rows, vocab], or a sequence of [vocab] rows), row i with ``samplers[i]``,
    ``histories[i]``, sampled at ``positions[i]`` (``Sampler.draw``), ...

    Vectorised over rows where the work is per element (penalty-free scaling, normalisers, greedy argmax); the
    per-row parts (truncation, the draw from each row's own RNG) touch one row each. The work happens in two float32
    buffers kept per thread (the caller's logits stay as they were): a fresh [16, 49152] array per call costs its
    page faults again every time, which was most of a 16-row batch's sampling time.
    """
    rows, vocab = len(logits), len(logits[0])
    scores, weights = _scratch(rows, vocab)
    for row in range(rows):
        scores[row] = logits[row]
    for row, (sampler, history) in enumerate(zip(samplers, histories)):
        penalty = sampler.params.repetition_penalty
        if penalty != 1.0 and len(history):
            _penalize(scores[row], history, penalty)
    tokens = scores.argmax(axis=1)
    peak = scores[np.arange(rows), tokens][:, None]
    sampled = np.array([s.params.temperature > 0 for s in samplers])
    # Shift first, then scale: (x - max) / t is <= 0 and finite for any t > 0 (x / t alone overflows for t ~ 1e-308).
    scores -= peak
    if sampled.any():
        temperature = np.array([s.params.temperature for s in samplers], dtype=np.float32)[:, None]
        with np.errstate(over="ignore", under="ignore"):  # a tiny temperature sends all but the best to -inf: fine
            np.divide(scores, np.maximum(temperature, np.float32(np.finfo(np.float32).tiny)), out=scores,
                      where=sampled[:, None])
        for row in np.flatnonzero(sampled):
            p = samplers[row].params
            scores[row] = _truncate(scores[row], p.top_k, p.top_p)
    np.exp(scores, out=weights)  # the row maximum is 0: weights in [0, 1], at least one 1
    norm = np.log(weights.sum(axis=1, dtype=np.float64))
    for row in np.flatnonzero(sampled):
        cdf = np.cumsum(weights[row], dtype=np.float64)
        draw = samplers[row].draw(None if positions is None else positions[row])
        tokens[row] = min(int(np.searchsorted(cdf, draw * cdf[-1], side="right")), vocab - 1)
    choices = []
    for row in range(rows):
        token = int(tokens[row])
        choices.append(Choice(token, float(scores[row, token] - norm[row]),
                              _top(scores[row], norm[row], top_logprobs[row])))
    return choices


_buffers = threading.local()


def _scratch(rows: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's two float32 [rows, vocab] work buffers (grown when a call needs more)."""
    held = getattr(_buffers, "arrays", None)
    if held is None or held[0].shape[0] < rows or held[0].shape[1] != vocab:
        held = _buffers.arrays = (np.empty((rows, vocab), np.float32), np.empty((rows, vocab), np.float32))
    return held[0][:rows], held[1][:rows]


class History:
    """The latest tokens a sequence sampled, each with the position it was sampled from, for the repetition penalty.

    Bounded (the penalty looks at the latest ``limit`` tokens), so a long sequence's penalty costs the same as a short
    one's. A rollback to L drops the tokens sampled at positions >= L; tokens given up front (a replay's) have position
    -1 and stay. ROLLBACK_SLACK more are kept, so the tokens the penalty sees are the same whatever samples were
    taken and dropped. The service (per session), a client choosing tokens itself and a remote link (for replays) all
    keep theirs here.
    """

    def __init__(self, limit: int = HISTORY_LIMIT, tokens: Iterable[int] = ()) -> None:
        self.limit = limit
        self.entries: deque[tuple[int, int]] = deque(((int(t), -1) for t in tokens), maxlen=limit + ROLLBACK_SLACK)

    def add(self, token: int, position: int) -> None:
        self.entries.append((token, position))

    def rollback(self, length: int) -> None:
        while self.entries and self.entries[-1][1] >= length:
            self.entries.pop()

    def latest_run(self, limit: int) -> list[int]:
        """Up to ``limit`` of the latest tokens, back to the first gap in their positions (a turn's prompt in between:
        the tail's drafts read the current answer, splitcore/tail_drafts.py). Tokens given up front continue a run."""
        run: list[int] = []
        following = None
        for token, position in reversed(self.entries):
            if len(run) == limit or (following is not None and position not in (following - 1, -1)):
                break
            run.append(token)
            following = position if position >= 0 else following
        return run[::-1]

    def tokens(self) -> np.ndarray:
        """The latest ``limit`` tokens."""
        count = min(self.limit, len(self.entries))
        skip = len(self.entries) - count
        return np.fromiter((t for t, _ in itertools.islice(self.entries, skip, None)), dtype=np.int64, count=count)


def _penalize(scores: np.ndarray, history: Sequence[int] | np.ndarray, penalty: float) -> None:
    try:
        seen = np.unique(np.asarray(history, dtype=np.int64))
    except OverflowError:  # ids beyond int64 cannot be tokens of any vocabulary
        seen = np.unique(np.asarray([t for t in history if 0 <= t < scores.shape[0]], dtype=np.int64))
    seen = seen[(seen >= 0) & (seen < scores.shape[0])]
    picked = scores[seen]
    scores[seen] = np.where(picked < 0, picked * penalty, picked / penalty)


def _top(scores: np.ndarray, norm: float, n: int) -> list[tuple[int, float]]:
    """The ``n`` best tokens and their log-probabilities, leaving out tokens a truncation removed (-inf)."""
    if not n:
        return []
    n = min(n, scores.shape[0])
    best = np.argpartition(-scores, n - 1)[:n]
    best = best[np.argsort(-scores[best], kind="stable")]
    return [(int(i), float(scores[i] - norm)) for i in best if np.isfinite(scores[i])]


def _truncate(scores: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Scores with the tokens outside top-k / top-p set to -inf (a new array where anything changes)."""
    vocab = scores.shape[0]
    if top_k and top_k < vocab:
        kth = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        total = _logsumexp(scores)
        order = _best_first(scores, top_p, total)
        cumulative = np.cumsum(np.exp(scores[order].astype(np.float64) - total))
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token); the tolerance keeps a
        # mass that reaches top_p exactly from missing it by float32 rounding.
        cut = int(np.searchsorted(cumulative, top_p - 1e-6)) + 1
        scores = scores.copy()
        keep = np.zeros(vocab, dtype=bool)
        keep[order[:cut]] = True
        scores[~keep] = -np.inf
    return scores


def _best_first(scores: np.ndarray, top_p: float, total: float) -> np.ndarray:
    """Indices of the best tokens, best first, enough of them to hold ``top_p`` of the mass (all when needed)."""
    vocab = scores.shape[0]
    if vocab > TOP_P_CANDIDATES:
        candidates = np.argpartition(-scores, TOP_P_CANDIDATES - 1)[:TOP_P_CANDIDATES]
        mass = np.exp(_logsumexp(scores[candidates]) - total)
        if mass >= top_p:
            return candidates[np.argsort(-scores[candidates], kind="stable")]
    return np.argsort(-scores, kind="stable")


def _logsumexp(scores: np.ndarray) -> float:
    peak = np.max(scores)
    if not np.isfinite(peak):
        return float(peak)
    return float(peak + np.log(np.sum(np.exp(scores - peak), dtype=np.float64)))
