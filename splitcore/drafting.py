"""Draft tokens for free: prompt lookup (the continuation of the most recent earlier occurrence of the last few
tokens), so one round trip to the tail can verify several positions; where the conversation has no match, the
bundle's draft table (n-grams the model itself tends to write, sampled at export: export/draft_table.py).

Summaries, rewrites, code edits and lists repeat long stretches of their input; a draft costs no model call at all,
and a wrong one costs only the extra positions of one step (verifying 5 positions costs ~1.2x one on a 2-core CPU).
The draft length adapts: it grows while drafts are accepted in full and shrinks to what was accepted when not.
After drafts are rejected outright three times in a row, a draft needs a longer match (two tokens, then three), and one
accepted token lowers the bar again: open chat matches single common tokens everywhere, and on a fast link each such
draft costs compute no round trip hides. The table's drafts (one token, where lookup has nothing) keep their own
count: after TABLE_MISSES misses in a row the table rests until a lookup draft is kept again. (A replay of SmolLM2
answers at 30 ms RTT: sharing one count with lookup cost rewrites and lists a tenth of their gain.)
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from splitcore.errors import ManifestError

# Drafts rejected in a row per extra token of match a draft then needs.
REJECTIONS_PER_TOKEN = 3
# The table drafts one token (a replay of SmolLM2 answers on a fast link: two, or single-token contexts, lost chat
# time there) and stops after this many misses in a row, until a lookup draft is kept again.
TABLE_MISSES = 6
# What a draft table file holds: integer arrays, read without pickle.
TABLE_ARRAYS = ("pair_first", "pair_second", "pair_next")


class DraftTable:
    """The token that most often followed each pair of tokens in the model's own answers."""

    def __init__(self, pairs: dict[tuple[int, int], int]) -> None:
        self.pairs = pairs

    @classmethod
    def load(cls, path: Path, vocab: int) -> DraftTable:
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {name: f[name] for name in TABLE_ARRAYS}
        except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise ManifestError(f"{path}: not a draft table ({type(e).__name__}: {e}); re-run the export") from None
        try:
            return cls.from_arrays(arrays, vocab)
        except ValueError as e:
            raise ManifestError(f"{path}: {e}; re-run the export") from None

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], vocab: int) -> DraftTable:
        """The table from its arrays (TABLE_ARRAYS, as export.draft_table.count_ngrams writes them), checked."""
        first, second, after = (np.asarray(arrays[name]) for name in TABLE_ARRAYS)
        if not first.shape == second.shape == after.shape or any(
                a.ndim != 1 or a.dtype.kind not in "iu" or (a.size and not 0 <= int(a.min()) <= int(a.max()) < vocab)
                for a in (first, second, after)):
            raise ValueError(f"draft table arrays must be 1-d token ids below {vocab}, of one length")
        return cls(dict(zip(zip(first.tolist(), second.tolist()), after.tolist())))

    def propose(self, history: Sequence[int]) -> list[int]:
        """The table's successor of the last two tokens of ``history``, or [] where it has none."""
        if len(history) < 2:
            return []
        following = self.pairs.get((int(history[-2]), int(history[-1])))
        return [] if following is None else [following]


class PromptLookup:
    def __init__(self, max_draft: int = 8, max_ngram: int = 3, min_ngram: int = 1, table: DraftTable | None = None
                 ) -> None:
        if max_draft < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need max_draft >= 1 and 1 <= min_ngram <= max_ngram, got {max_draft}, "
                             f"{min_ngram}, {max_ngram}")
        self.max_draft, self.max_ngram, self.min_ngram = max_draft, max_ngram, min_ngram
        self.length = min(4, max_draft)
        self.rejected = 0  # drafts in a row of which not one token was kept
        self.table = table
        self.table_missed = 0  # table drafts in a row that were not kept
        self.from_table = False  # where the last proposal came from

    def propose(self, history: Sequence[int], limit: int) -> list[int]:
        """Up to ``min(limit, current draft length)`` tokens likely to follow ``history`` (from the table: one);
        [] when nothing matches."""
        self.from_table = False
        if min(limit, self.length) < 1 or len(history) < 2:
            return []
        drafts = self._lookup(history, min(limit, self.length))
        if drafts or self.table is None or self.table_missed >= TABLE_MISSES:
            return drafts
        drafts = self.table.propose(history)
        self.from_table = bool(drafts)
        return drafts

    def _lookup(self, history: Sequence[int], limit: int) -> list[int]:
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
        """Adapt the draft length, and the match a draft needs, to how the last draft fared. The table's drafts
        count apart (their misses must not shorten the conversation's own drafts); a kept lookup draft lowers the
        table's bar too."""
        if self.from_table:
            self.table_missed = self.table_missed + 1 if accepted == 0 else 0
            return
        if accepted:
            self.table_missed = 0
        self.rejected = self.rejected + 1 if accepted == 0 else 0
        if accepted == proposed:
            self.length = min(self.length + 1, self.max_draft)
        else:
            self.length = max(1, accepted + 1)
