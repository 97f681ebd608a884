"""Attacks with no training: read the split hidden state with the public output layer or the embedding matrix.

At shallow splits the residual stream still carries the input token's embedding, so the public final norm + LM
head (the "logit lens") or the nearest embedding row (by cosine) often names the token at that position.
"""

from __future__ import annotations

import numpy as np

from privacy.public_model import PublicModel

ROWS = 256  # positions scored at once: bounds the [rows, vocab] score matrix


def logit_lens(public: PublicModel, hidden: np.ndarray) -> np.ndarray:
    """hidden [n, hidden] -> the token the public LM head ranks first at each position [n]."""
    return np.concatenate([public.lens_logits(hidden[i : i + ROWS]).argmax(-1) for i in range(0, len(hidden), ROWS)])


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_embedding(embedding: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """hidden [n, hidden] -> the token whose embedding row is closest in angle at each position [n]."""
    table = unit_rows(embedding)
    return np.concatenate(
        [(unit_rows(hidden[i : i + ROWS]) @ table.T).argmax(-1) for i in range(0, len(hidden), ROWS)]
    )
