"""Draft tokens for free: prompt lookup (the continuation of the most recent earlier occurrence of the last few
tokens), so one round trip to the tail can verify several positions; where the conversation has no match, the
bundle's draft table (n-grams the model itself tends to write, sampled at export: export/draft_table.py).

Summaries, rewrites, code edits and lists repeat long stretches of their input; a draft costs no model call at all,
and a wrong one costs only the extra positions of one step. The lookup draft's length adapts: it grows while drafts
are accepted in full and shrinks to what was accepted when not. After drafts are rejected outright three times in a
row, a draft needs a longer match (two tokens, then three), and one accepted token lowers the bar again: open chat
matches single common tokens everywhere.

The table's drafts are weighed, not just sent: each comes with the chance, as counted at export, that it is right,
and the drafter sends as many of the table's chain as maximise the expected tokens per second of the step, given
what an extra verified position costs against a whole step *here*. That ratio is the deployment's (an int4 tail on
a 2-core CPU adds 2.6 ms per drafted position: 5% of a step at 30 ms RTT, ~20% on loopback; a GPU tail next
to nothing), so it is learned from the client's recent steps (StepCosts). The table's counted chances are scaled by
how its drafts actually fared in this conversation, an estimate that forgets slowly so a table that was wrong for a
while is tried again.
"""

from __future__ import annotations

import statistics
import threading
import zipfile
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from splitcore.errors import ManifestError

# Drafts rejected in a row per extra token of match a draft then needs.
REJECTIONS_PER_TOKEN = 3
# What a draft table file holds: integer arrays, read without pickle. For each pair of tokens: its most frequent
# successor, how often the pair was seen with a successor and how often that successor followed.
TABLE_ARRAYS = ("pair_first", "pair_second", "pair_next", "pair_seen", "next_seen")
# The counts came later: a table without them (exported before) is read as if each pair was seen once.
COUNT_ARRAYS = ("pair_seen", "next_seen")
# A pair seen n times with its successor k times drafts that successor with chance k / (n + PRIOR_SEEN): counted
# on sampled answers, a pair seen once is right for the model's greedy answers 23% of the time, not 100% (SmolLM2).
PRIOR_SEEN = 2
# Each step, the evidence of how the table's drafts fared in this conversation keeps this share of its weight.
CALIBRATION_MEMORY = 0.98


class DraftTable:
    """The token that most often followed each pair of tokens in the model's own answers, and how often it did."""

    def __init__(self, pairs: dict[tuple[int, int], tuple[int, float]], counted: bool = True) -> None:
        self.pairs = pairs  # (first, second) -> (successor, the chance it is right)
        self.counted = counted  # False: a table from before the counts, every pair taken as seen once

    @classmethod
    def load(cls, path: Path, vocab: int) -> DraftTable:
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {name: f[name] for name in TABLE_ARRAYS if name in f.files or name not in COUNT_ARRAYS}
        except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise ManifestError(f"{path}: not a draft table ({type(e).__name__}: {e}); re-run the export") from None
        try:
            return cls.from_arrays(arrays, vocab)
        except ValueError as e:
            raise ManifestError(f"{path}: {e}; re-run the export") from None

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], vocab: int) -> DraftTable:
        """The table from its arrays (TABLE_ARRAYS, as export.draft_table.count_ngrams writes them), checked."""
        counted = all(name in arrays for name in COUNT_ARRAYS)
        if not counted:
            ones = np.ones(np.shape(arrays["pair_next"]), dtype=np.int32)
            arrays = {**arrays, "pair_seen": ones, "next_seen": ones}
        first, second, after, seen, followed = (np.asarray(arrays[name]) for name in TABLE_ARRAYS)
        if not first.shape == second.shape == after.shape == seen.shape == followed.shape or any(
                a.ndim != 1 or a.dtype.kind not in "iu" for a in (first, second, after, seen, followed)):
            raise ValueError(f"draft table arrays must be 1-d integers of one length, got "
                             f"{[(a.dtype.name, a.shape) for a in (first, second, after, seen, followed)]}")
        if first.size and not all(0 <= int(a.min()) <= int(a.max()) < vocab for a in (first, second, after)):
            raise ValueError(f"draft table token ids must be below {vocab}")
        if first.size and not (1 <= int(followed.min()) and bool(np.all(followed <= seen))):
            raise ValueError("draft table counts must be >= 1 and a successor's count at most its pair's")
        chances = followed.astype(np.float64) / (seen.astype(np.float64) + PRIOR_SEEN)
        return cls(dict(zip(zip(first.tolist(), second.tolist()), zip(after.tolist(), chances.tolist()))), counted)

    def chain(self, history: Sequence[int], limit: int) -> tuple[list[int], list[float]]:
        """Up to ``limit`` tokens after ``history``, each the successor of the two before it, and for each the
        chance that it and every one before it are right; ([], []) where the last pair is unknown."""
        if len(history) < 2:
            return [], []
        tokens: list[int] = []
        chances: list[float] = []
        first, second, chance = int(history[-2]), int(history[-1]), 1.0
        while len(tokens) < limit:
            entry = self.pairs.get((first, second))
            if entry is None:
                break
            following, right = entry
            chance *= right
            tokens.append(following)
            chances.append(chance)
            first, second = second, following
        return tokens, chances


class StepCosts:
    """What one more verified position costs, as a share of a one-position decode step, from recent decode steps
    (head, link and tail together: whatever the deployment is). One per client process and tail, shared by its
    conversations (the gateway's from several threads)."""

    WINDOW = 48  # recent steps of both kinds, in order; medians, so one slow step (a GC pause, a retry) moves nothing
    PRIOR_SHARE = 0.1  # assumed until both kinds of step are among the recent ones

    def __init__(self) -> None:
        # (positions, seconds) of the recent decode steps. One window for both kinds, so both medians come from the
        # same stretch of time: when the link or the tail gets slower or faster, neither lags the other.
        self.steps: deque[tuple[int, float]] = deque(maxlen=self.WINDOW)
        self.lock = threading.Lock()

    def observe(self, positions: int, seconds: float) -> None:
        if positions >= 1:
            with self.lock:
                self.steps.append((positions, seconds))

    def measured_share(self) -> float | None:
        """An extra position's time over a one-position step's, from medians of the recent steps; None until both
        kinds of step are among them."""
        with self.lock:
            steps = list(self.steps)
        singles = [seconds for positions, seconds in steps if positions == 1]
        drafted = [(positions, seconds) for positions, seconds in steps if positions > 1]
        if not singles or not drafted:
            return None
        single = statistics.median(singles)
        extra = statistics.median((seconds - single) / (positions - 1) for positions, seconds in drafted)
        return max(extra, 0.0) / max(single, 1e-6)

    def position_share(self) -> float:
        share = self.measured_share()
        return self.PRIOR_SHARE if share is None else share

    def best_length(self, chances: Sequence[float]) -> int:
        """How many drafts of a chain to send, ``chances[i]`` being the chance that the first i + 1 are all kept:
        the count with the most expected tokens (kept drafts plus the tail's own) per unit of step time."""
        share = self.position_share()
        best, best_rate, expected = 0, 1.0, 1.0
        for length, chance in enumerate(chances, 1):
            expected += chance
            rate = expected / (1.0 + share * length)
            if rate > best_rate:
                best, best_rate = length, rate
        return best


class PromptLookup:
    """The client's drafter: prompt lookup first, the draft table where lookup finds nothing, each step's draft
    sized to what verifying it costs here (``observe`` is told every decode step's positions and time)."""

    def __init__(self, max_draft: int = 8, max_ngram: int = 3, min_ngram: int = 1, table: DraftTable | None = None,
                 costs: StepCosts | None = None) -> None:
        if max_draft < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need max_draft >= 1 and 1 <= min_ngram <= max_ngram, got {max_draft}, "
                             f"{min_ngram}, {max_ngram}")
        self.max_draft, self.max_ngram, self.min_ngram = max_draft, max_ngram, min_ngram
        self.length = min(4, max_draft)
        self.rejected = 0  # drafts in a row of which not one token was kept
        self.table = table
        self.costs = costs or StepCosts()
        # How the table's drafts fared here: tokens kept, and the sum of their counted chances; slowly forgotten.
        self.table_kept = self.table_expected = 0.0
        self.from_table = False  # where the last proposal came from
        self._chances: list[float] = []  # the counted chances of the table drafts last proposed

    def propose(self, history: Sequence[int], limit: int) -> list[int]:
        """Up to ``limit`` tokens likely to follow ``history`` (from lookup: at most the current draft length);
        [] when nothing matches or no draft is worth its cost."""
        self.from_table = False
        self.table_kept *= CALIBRATION_MEMORY
        self.table_expected *= CALIBRATION_MEMORY
        if min(limit, self.max_draft) < 1 or len(history) < 2:
            return []
        drafts = self._lookup(history, min(limit, self.length))
        if drafts or self.table is None:
            return drafts
        tokens, chances = self.table.chain(history, min(limit, self.max_draft))
        if not tokens:  # most steps of open chat: nothing to weigh, so no cost to look up
            return []
        calibration = (self.table_kept + 1.0) / (self.table_expected + 1.0)
        count = self.costs.best_length([min(c * calibration, 1.0) for c in chances])
        self.from_table = count > 0
        self._chances = chances[:count]
        return tokens[:count]

    def observe(self, positions: int, seconds: float) -> None:
        """A decode step of ``positions`` positions (the last token and its drafts) took ``seconds``."""
        self.costs.observe(positions, seconds)

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
        """Adapt the lookup draft's length, and the match a draft needs, to how the last draft fared; a table draft
        adds to the table's record instead (its misses must not shorten the conversation's own drafts)."""
        if self.from_table:
            self.table_kept += accepted
            self.table_expected += sum(self._chances[:proposed])
            return
        self.rejected = self.rejected + 1 if accepted == 0 else 0
        if accepted == proposed:
            self.length = min(self.length + 1, self.max_draft)
        else:
            self.length = max(1, accepted + 1)
