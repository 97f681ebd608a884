"""Draft tokens for free: prompt lookup (the continuation of the most recent earlier occurrence of the last few
tokens), so one round trip to the tail can verify several positions.

Summaries, rewrites, code edits and lists repeat long stretches of their input; a draft costs no model call at all,
and a wrong one costs only the extra positions of one step (verifying 5 positions costs ~1.2x one on a 2-core CPU).
The draft length adapts: it grows while drafts are accepted in full and shrinks to what was accepted when not.
After drafts are rejected outright three times in a row, a draft needs a longer match (two tokens, then three), and one
accepted token lowers the bar again: open chat matches single common tokens everywhere, and on a fast link each such
draft costs compute no round trip hides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Drafts rejected in a row per extra token of match a draft then needs.
REJECTIONS_PER_TOKEN = 3


class PromptLookup:
    def __init__(self, max_draft: int = 8, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if max_draft < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need max_draft >= 1 and 1 <= min_ngram <= max_ngram, got {max_draft}, "
                             f"{min_ngram}, {max_ngram}")
        self.max_draft, self.max_ngram, self.min_ngram = max_draft, max_ngram, min_ngram
        self.length = min(4, max_draft)
        self.rejected = 0  # drafts in a row of which not one token was kept

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
        shortest = min(self.min_ngram + self.rejected // REJECTIONS_PER_TOKEN, self.max_ngram)
        for n in range(min(self.max_ngram, len(ids) - 1), shortest - 1, -1):
            matching = ends[ends >= n - 1]
            for back in range(1, n):
                matching = matching[ids[matching - back] == ids[-1 - back]]
            if matching.size:
                end = int(matching[-1])  # the most recent one
                return ids[end + 1 : end + 1 + limit].tolist()
        return []

    def update(self, proposed: int, accepted: int) -> None:
        """Adapt the draft length, and the match a draft needs, to how the last draft fared."""
        self.rejected = self.rejected + 1 if accepted == 0 else 0
        if accepted == proposed:
            self.length = min(self.length + 1, self.max_draft)
        else:
            self.length = max(1, accepted + 1)
