"""Draft tokens for free: prompt lookup (the continuation of the most recent earlier occurrence of the last few
tokens), so one round trip to the tail can verify several positions.

Summaries, rewrites, code edits and lists repeat long stretches of their input; a draft costs no model call at all,
and a wrong one costs only the extra positions of one step (verifying 5 positions costs ~1.2x one on a 2-core CPU).
The draft length adapts: it grows while drafts are accepted in full and shrinks to what was accepted when not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PromptLookup:
    def __init__(self, max_draft: int = 8, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if max_draft < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need max_draft >= 1 and 1 <= min_ngram <= max_ngram, got {max_draft}, "
                             f"{min_ngram}, {max_ngram}")
        self.max_draft, self.max_ngram, self.min_ngram = max_draft, max_ngram, min_ngram
        self.length = min(4, max_draft)

    def propose(self, history: Sequence[int], limit: int) -> list[int]:
        """Up to ``min(limit, current draft length)`` tokens likely to follow ``history``; [] when nothing matches."""
        limit = min(limit, self.length)
        if limit < 1 or len(history) < 2:
            return []
        # Vectorised: this runs once per generated token over the whole conversation (a Python scan cost 0.7 ms
        # per token at 2,000 tokens and 3 ms at 8,000).
        ids = np.asarray(history, dtype=np.int64)
        # Ends of earlier occurrences of the last token that have a continuation (not the last position itself).
        ends = np.flatnonzero(ids[:-1] == ids[-1])
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            matching = ends[ends >= n - 1]
            for back in range(1, n):
                matching = matching[ids[matching - back] == ids[-1 - back]]
            if matching.size:
                end = int(matching[-1])  # the most recent one
                return ids[end + 1 : end + 1 + limit].tolist()
        return []

    def update(self, proposed: int, accepted: int) -> None:
        """Adapt the draft length to how the last draft fared."""
        if accepted == proposed:
            self.length = min(self.length + 1, self.max_draft)
        else:
            self.length = max(1, accepted + 1)
