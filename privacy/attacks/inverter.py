"""A learned inverter: a linear map from hidden state to the token's embedding, scored against the whole vocabulary.

Trained by ridge regression (closed form, seconds on a CPU) on hidden states of the attacker's own text. Mapping
into the embedding space instead of onto one-hot targets lets it name tokens it never saw in training, which
matters with a 49k vocabulary and a few thousand training positions. Inputs are divided by their RMS first: the
first positions of a sequence carry activations orders of magnitude larger than the rest.
"""

from __future__ import annotations

import numpy as np

from privacy.attacks.lens import ROWS, unit_rows


def rms_normalized(hidden: np.ndarray) -> np.ndarray:
    rms = np.sqrt(np.mean(np.square(hidden, dtype=np.float64), axis=-1, keepdims=True))
    features = hidden / np.maximum(rms, 1e-12)
    return np.concatenate([features, np.ones((len(hidden), 1))], axis=1)  # a bias column


class Inverter:
    def __init__(self, embedding: np.ndarray, ridge: float = 1e-2) -> None:
        self.table = unit_rows(embedding).astype(np.float32)
        self.embedding = embedding
        self.ridge = ridge
        self.weights: np.ndarray | None = None

    def fit(self, hidden: np.ndarray, tokens: np.ndarray) -> Inverter:
        """hidden [n, hidden] of the attacker's text, tokens [n] the ids at those positions."""
        x = rms_normalized(hidden)
        y = self.embedding[tokens].astype(np.float64)
        gram = x.T @ x
        gram[np.diag_indices_from(gram)] += self.ridge * np.trace(gram) / len(gram)
        self.weights = np.linalg.solve(gram, x.T @ y).astype(np.float32)
        return self

    def top(self, hidden: np.ndarray, k: int) -> np.ndarray:
        """hidden [n, hidden] -> the k best-scoring token ids per position, best first [n, k]."""
        assert self.weights is not None, "fit the inverter first"
        best = []
        for i in range(0, len(hidden), ROWS):
            predicted = unit_rows(rms_normalized(hidden[i : i + ROWS]).astype(np.float32) @ self.weights)
            scores = predicted @ self.table.T
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.argsort(-scores)
            order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
            best.append(np.take_along_axis(part, order, axis=1))
        return np.concatenate(best, axis=0)
