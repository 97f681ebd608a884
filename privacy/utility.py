"""What boundary noise costs: next-token agreement with the noise-free run and perplexity on a fixed text set.

Teacher-forced over ``utility_texts.txt``: the clean and the noisy run see the same tokens, so the numbers measure
the noise and nothing else. Agreement is the share of positions where the greedy (argmax) next token is the same
as without noise; perplexity is of the text's own next tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privacy.boundary import head_states
from splitcore.graphs import HeadRunner, LmHeadRunner, TailRunner
from splitcore.noise import BoundaryNoise


@dataclass
class TextLogits:
    head: HeadRunner
    tail: TailRunner
    lm_head: LmHeadRunner | None

    def __call__(self, ids: list[int], noise: BoundaryNoise | None) -> np.ndarray:
        """Logits [seq, vocab] of every position of ``ids``, with ``noise`` on the hidden states at the split."""
        batch = np.asarray([ids], dtype=np.int64)
        hidden = head_states(self.head, batch)
        if noise is not None:
            hidden = noise(hidden)
        out = self.tail.forward(hidden, self.tail.new_cache(len(ids)), logits_to_keep=0)
        return (self.lm_head.forward(out) if self.lm_head is not None else out)[0].astype(np.float64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass
class Utility:
    greedy_agreement: float
    perplexity: float
    perplexity_clean: float

    @property
    def perplexity_change(self) -> float:
        return self.perplexity / self.perplexity_clean - 1.0


def utility(logits_of: TextLogits, texts: list[list[int]], noise: BoundaryNoise | None) -> Utility:
    agree, total, nll, nll_clean = 0, 0, 0.0, 0.0
    for ids in texts:
        clean = logits_of(ids, None)
        noisy = logits_of(ids, noise) if noise is not None else clean
        agree += int((clean.argmax(-1) == noisy.argmax(-1)).sum())
        total += len(ids)
        target = np.asarray(ids[1:])
        rows = np.arange(len(target))
        nll -= float(log_softmax(noisy[:-1])[rows, target].sum())
        nll_clean -= float(log_softmax(clean[:-1])[rows, target].sum())
    predicted = sum(len(ids) - 1 for ids in texts)
    return Utility(agree / total, float(np.exp(nll / predicted)), float(np.exp(nll_clean / predicted)))
