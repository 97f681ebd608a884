"""Next-token choice from logits: greedy, or seeded sampling with temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation; seed None means not reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Choice:
    token: int
    logprob: float
    top: list[tuple[int, float]]


class Sampler:
    """Deterministic for a given seed and the same sequence of logits."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def choose(self, logits: np.ndarray, history: Sequence[int] = (), top_logprobs: int = 0) -> Choice:
        scores = logits.astype(np.float64, copy=True)
        p = self.params
        if p.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < scores.shape[0])]
            picked = scores[seen]
            scores[seen] = np.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if p.greedy:
            token = int(np.argmax(scores))
        else:
            scores = _truncate(scores / p.temperature, p.top_k, p.top_p)
            weights = _exp_shifted(scores).astype(np.float64)
            token = int(self.rng.choice(scores.shape[0], p=weights / weights.sum()))
        # One pass over the vocabulary for the normaliser; log-probabilities only of the tokens reported.
        norm = _logsumexp(scores)
        top: list[tuple[int, float]] = []
        if top_logprobs:
            best = np.argpartition(-scores, top_logprobs - 1)[:top_logprobs]
            best = best[np.argsort(-scores[best], kind="stable")]
            top = [(int(i), float(scores[i] - norm)) for i in best]
        return Choice(token, float(scores[token] - norm), top)


def _truncate(scores: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    if top_k and top_k < scores.shape[0]:
        kth = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(-scores)
        probs = np.exp(_log_softmax(scores[order]))
        cumulative = np.cumsum(probs)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        cut = int(np.searchsorted(cumulative, top_p)) + 1
        scores = scores.copy()
        scores[order[cut:]] = -np.inf
    return scores


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    return scores - _logsumexp(scores)


def _logsumexp(scores: np.ndarray) -> float:
    peak = np.max(scores)
    if not np.isfinite(peak):
        return float(peak)
    return float(peak + np.log(np.sum(_exp_shifted(scores, peak), dtype=np.float64)))


def _exp_shifted(scores: np.ndarray, peak: float | None = None) -> np.ndarray:
    """exp(scores - max) in float32: several times faster than float64 over a vocabulary, and exact enough."""
    return np.exp((scores - (np.max(scores) if peak is None else peak)).astype(np.float32))
