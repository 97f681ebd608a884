"""Draft tokens for free: prompt lookup (the continuation of the most recent earlier occurrence of the last few
tokens), so one round trip to the tail can verify several positions; where the conversation has no match, the
bundle's draft table (n-grams the model itself tends to write, sampled at export: export/draft_table.py) and the
tail's guess at the next token (its look-ahead, splitcore/lookahead.py), each followed by the table's chain.

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

Where the tail samples, it drafts best of all (splitcore/tail_drafts.py: the model itself, run on from the answer's
latest tokens; 99% kept on SmolLM2's greedy chat). Those drafts come with a step's answer, go first in the next
step, and cost the tail a decode run each, so the client asks for as many as maximise expected tokens per second at
the measured costs (a round trip of 30 ms: 8; a CPU tail on loopback, where a draft costs about the step it saves:
none), with the chance per draft learned in the conversation (``ChainRecord``). While it asks, the table's weaker
drafts stay home: a step carrying them would leave the tail unable to tell which sample it should draft after.
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
from splitcore.protocol import MAX_DRAFTS

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
# A guess of the tail's is weighed as if right this many times less often than stated: its chances are measured on
# answers to generic requests, and on one conversation they can be far lower (SmolLM2, the bench's chat answers:
# right 9.5% of the time where 23% was stated; 19% on other chat answers). A replay of those answers: at a drafted
# position's cost of 4.5% of a step (a CPU tail, 30 ms RTT) weighing them at 0.35-0.5 of their stated chance
# changes little (bench's chat -0.3% -> -0.4-0.7%, 10 other chat prompts +7.3% -> +6.5-7.2%); at 18% (a CPU tail
# on loopback) it halves the loss on the bench's chat (-4.1% -> -1.8-2.1%), and it leaves room for a cost that was
# measured low. Guesses are asked for only while the best of them, so weighed, would pay.
GUESS_MARGIN = 2.5
# The tail's own drafts (splitcore/tail_drafts.py): the chance each is kept before this conversation has tried any
# (SmolLM2's greedy chat answers: 99%; sampled answers keep fewer, and the record says so within a few steps).
TAIL_PRIOR = 0.9
# How many the client asks for before it has measured what one costs the tail.
TAIL_PROBE = 4
# The tail's drafts are asked for only where they promise this many times the tokens per second of a plain step. Their
# measured cost is an average over the drafts of a step, and part of it (the head's run over the window) is paid once
# per step: a step asking for one or two pays more per draft than the average says. Near break-even (a CPU tail on
# loopback: 1.06 predicted for one draft) asking lost 13% on chat; a margin keeps those steps plain.
TAIL_MARGIN = 1.15
# Asks in a row answered without drafts after which the client stops asking (until TAIL_RETRY_STEPS).
TAIL_UNANSWERED = 2
# While the drafts do not pay at the measured costs, the client asks for one again every this many steps (the link
# and the tail's load change; one draft costs the tail about a step, 1/64 of the time).
TAIL_RETRY_STEPS = 64


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
    NEIGHBOURS = 8  # one-position steps this close to a drafted one (either side) are its baseline

    def __init__(self) -> None:
        # (positions, seconds, compute) of the recent decode steps. One window for both kinds, so both come from the
        # same stretch of time: when the link or the tail gets slower or faster, neither lags the other.
        self.steps: deque[tuple[int, float, float | None]] = deque(maxlen=self.WINDOW)
        self.drafting: deque[float] = deque(maxlen=self.WINDOW)  # seconds per draft of the tail's (observe_drafts)
        self.lock = threading.Lock()
        # The share as last worked out, until the next step: the drafter asks several times a step (65 us each).
        self._share: float | None = None
        self._stale = True
        self._times: tuple[float | None, float | None] | None = None  # _worked_times, until the next step

    def observe(self, positions: int, seconds: float, compute: float | None = None) -> None:
        """A step of ``positions`` took ``seconds`` end to end, ``compute`` of them in the head's and the tail's runs
        (None: not known)."""
        if positions >= 1:
            with self.lock:
                self.steps.append((positions, seconds, compute))
                self._stale = True
                self._times = None

    def measured_share(self) -> float | None:
        """An extra position's time over a one-position step's; None until a drafted step has one-position steps
        near it among the recent ones.

        Each drafted step is compared with the one-position steps around it (NEIGHBOURS either side), not with all
        of them: a machine whose steps slow down for a while (another process, a batch of other sessions on the
        tail) would otherwise make drafted steps from a fast stretch look free, and a client that then drafts on
        every step has no recent plain step left to correct it. The extra time comes from the runs' own times where
        the tail reports them (Server-Timing): a link's jitter of a millisecond or two swamps a 2.6 ms position in
        end-to-end times. What a position adds on the wire (~1 KB of fp16 hidden state) is then left out: a
        rounding error on any link faster than a few Mbit/s."""
        with self.lock:
            if not self._stale:
                return self._share
            steps = list(self.steps)
            self._share, self._stale = self._worked_out(steps), False
            return self._share

    def _worked_out(self, steps: list[tuple[int, float, float | None]]) -> float | None:
        timed = all(compute is not None for _, _, compute in steps)
        cost = [compute if timed else seconds for _, seconds, compute in steps]
        singles = [seconds for positions, seconds, _ in steps if positions == 1]
        extras = []
        for i, (positions, _, _) in enumerate(steps):
            if positions > 1:
                near = [cost[j] for j in range(max(0, i - self.NEIGHBOURS), min(len(steps), i + self.NEIGHBOURS + 1))
                        if steps[j][0] == 1]
                if near:
                    extras.append((cost[i] - statistics.median(near)) / (positions - 1))
        if not singles or not extras:
            return None
        return max(statistics.median(extras), 0.0) / max(statistics.median(singles), 1e-6)

    def observe_drafts(self, count: int, seconds: float) -> None:
        """The tail took ``seconds`` to draft ``count`` tokens for a step."""
        if count >= 1:
            with self.lock:
                self.drafting.append(seconds / count)
                self._times = None

    def draft_seconds(self) -> float | None:
        """What one of the tail's drafts costs its step (median of the recent ones; None: none measured)."""
        return self._worked_times()[0]

    def step_seconds(self) -> float | None:
        """A one-position step's time end to end, its drafting left out: the recent steps', each counted as if it had
        one position (the measured share per extra position taken off)."""
        return self._worked_times()[1]

    def _worked_times(self) -> tuple[float | None, float | None]:
        """(draft_seconds, step_seconds), worked out once per step like the share."""
        share = self.position_share()
        with self.lock:
            if self._times is None:
                drafting = statistics.median(self.drafting) if self.drafting else None
                singles = [seconds / (1 + share * (positions - 1)) for positions, seconds, _ in self.steps]
                step = statistics.median(singles) if singles else None
                self._times = (drafting, step)
            return self._times

    def position_share(self) -> float:
        share = self.measured_share()
        return self.PRIOR_SHARE if share is None else share

    def best_length(self, chances: Sequence[float]) -> int:
        return self.best(chances)[0]

    def best(self, chances: Sequence[float]) -> tuple[int, float]:
        """How many drafts of a chain to send, ``chances[i]`` being the chance that the first i + 1 are all kept:
        the count with the most expected tokens (kept drafts plus the tail's own) per unit of step time, and that
        rate (1.0: a step without drafts)."""
        share = self.position_share()
        best, best_rate, expected = 0, 1.0, 1.0
        for length, chance in enumerate(chances, 1):
            expected += chance
            rate = expected / (1.0 + share * length)
            if rate > best_rate:
                best, best_rate = length, rate
        return best, best_rate


class PromptLookup:
    """The client's drafter: prompt lookup first, the draft table where lookup finds nothing, each step's draft
    sized to what verifying it costs here (``observe`` is told every decode step's positions and time)."""

    def __init__(self, max_draft: int = 8, max_ngram: int = 3, min_ngram: int = 1, table: DraftTable | None = None,
                 costs: StepCosts | None = None, best_guess: float | None = None, tail_drafts: bool = False) -> None:
        if max_draft < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need max_draft >= 1 and 1 <= min_ngram <= max_ngram, got {max_draft}, "
                             f"{min_ngram}, {max_ngram}")
        self.max_draft, self.max_ngram, self.min_ngram = max_draft, max_ngram, min_ngram
        self.length = min(4, max_draft)
        self.rejected = 0  # drafts in a row of which not one token was kept
        self.table = table
        self.costs = costs or StepCosts()
        # The highest chance a guess of the tail's look-ahead states (None: the tail has none, never ask for one).
        self.best_guess = best_guess
        # How the table's drafts, and the tail's guesses, fared in this conversation.
        self.table_record = Record()
        self.guess_record = Record()
        # Whether the tail drafts (splitcore/tail_drafts.py), and how its drafts fared in this conversation.
        self.tail_drafts = tail_drafts
        self.tail_record = ChainRecord()
        self.since_tail = 0  # steps since the tail was last asked for drafts
        self.unanswered = 0  # asks in a row that got no drafts (a service with them off, or a tail without)
        self.from_tail = 0  # the last proposal's drafts were the tail's: how many
        self.from_table = False  # the last proposal was weighed (table and/or guess), not looked up
        self._guessed: float | None = None  # the stated chance of the guess that led the last proposal
        self._chances: list[float] = []  # the table's chances for its part of the last proposal

    def propose(self, history: Sequence[int], limit: int, guess: tuple[int, float] | None = None,
                tail: Sequence[int] = ()) -> list[int]:
        """Up to ``limit`` tokens likely to follow ``history`` (from lookup: at most the current draft length);
        [] when nothing matches or no draft is worth its cost. ``tail``: the tail's own drafts after the last token
        (splitcore/tail_drafts.py), sent first where there are any (``from_tail`` then says how many). ``guess``:
        the tail's guess at the next token and the chance it is right (splitcore/lookahead.py), drafted, with the
        table's chain after it, when that is worth more than the table's chain alone."""
        self.from_table = False
        self.from_tail = 0
        self.table_record.forget()
        self.guess_record.forget()
        self.tail_record.forget()
        if min(limit, self.max_draft) < 1 or len(history) < 2:
            return []
        if tail:
            self.from_tail = len(tail[: min(limit, self.max_draft)])
            return list(tail[: self.from_tail])
        drafts = self._lookup(history, min(limit, self.length))
        if drafts:
            return drafts
        if self.tail_count():  # a plain step that asks the tail for drafts beats the table's weaker ones
            return []
        limit = min(limit, self.max_draft)
        tokens, chances = self._table_chain(history, limit)
        if not tokens and guess is None:  # most steps of open chat without a guess: nothing to weigh
            return []
        count, rate = self.costs.best(self.table_record.scaled(chances))
        guessed: float | None = None
        if guess is not None:
            token, stated = guess
            # The chain after the guess reads only the last pair: no copy of the whole conversation per token.
            after, after_chances = self._table_chain([history[-1], token], limit - 1)
            first = self._guess_chance(stated)
            guess_count, guess_rate = self.costs.best(
                [first, *(first * c for c in self.table_record.scaled(after_chances))])
            if guess_count and guess_rate > rate:
                tokens, chances, count, guessed = [token, *after], after_chances, guess_count, stated
        self.from_table = count > 0
        self._guessed = guessed
        self._chances = chances[: count - (guessed is not None)]
        return tokens[:count]

    def tail_count(self) -> int:
        """How many drafts to ask the tail for with the next step: as many as give the most expected tokens per
        second of step, the tail's drafting time included, where that beats a plain step by TAIL_MARGIN (0: none
        do; TAIL_PROBE until the cost is measured; one every TAIL_RETRY_STEPS steps while none do)."""
        if not self.tail_drafts:
            return 0
        if self.unanswered >= TAIL_UNANSWERED:
            return 1 if self.since_tail >= TAIL_RETRY_STEPS else 0
        each, step = self.costs.draft_seconds(), self.costs.step_seconds()
        if each is None or step is None:
            return TAIL_PROBE
        share = self.costs.position_share() + each / max(step, 1e-6)
        kept = self.tail_record.chance()
        best, best_rate, expected = 0, TAIL_MARGIN, 1.0
        for count in range(1, min(self.max_draft, MAX_DRAFTS) + 1):
            expected += kept**count
            rate = expected / (1.0 + share * count)
            if rate > best_rate:
                best, best_rate = count, rate
        if best == 0 and self.since_tail >= TAIL_RETRY_STEPS:
            return 1
        return best

    def ask_tail(self, room: int) -> int:
        """How many drafts the step about to go asks the tail for, at most ``room`` (``tail_count``)."""
        count = max(0, min(self.tail_count(), room))
        self.since_tail = 0 if count else self.since_tail + 1
        return count

    def wants_guess(self) -> bool:
        """Whether to ask the tail for its guesses on the next step: only while the best one it can state, weighed as
        ``_guess_chance`` weighs it, pays for the position it costs, that cost as measured (lookup's and the table's
        drafts measure it within a few steps; the prior would ask a CPU tail on a fast link for guesses that cannot
        pay, and the tail would compute them for nothing)."""
        share = self.costs.measured_share()
        if self.best_guess is None or share is None:
            return False
        return self._guess_chance(self.best_guess) > share

    def _guess_chance(self, stated: float) -> float:
        """A guess's chance as weighed here: its stated one, scaled by how guesses fared in this conversation and
        divided by GUESS_MARGIN."""
        return self.guess_record.scaled([stated])[0] / GUESS_MARGIN

    def _table_chain(self, history: Sequence[int], limit: int) -> tuple[list[int], list[float]]:
        return self.table.chain(history, limit) if self.table is not None and limit > 0 else ([], [])

    def observe(self, positions: int, seconds: float, compute: float | None = None, asked: int = 0,
                drafting: float | None = None, made: int = 0) -> None:
        """A decode step of ``positions`` positions (the last token and its drafts) took ``seconds``, ``compute``
        of them in the head's and the tail's runs, and it asked the tail for ``asked`` drafts, of which it made
        ``made`` in ``drafting`` seconds on top (None: it says it made none)."""
        self.costs.observe(positions, seconds, compute)
        if asked:
            self.unanswered = 0 if made else self.unanswered + 1
            if made and drafting is not None:
                self.costs.observe_drafts(made, drafting)

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
        adds to the table's record instead (its misses must not shorten the conversation's own drafts), and the
        tail's drafts to the tail's."""
        if self.from_tail:
            self.tail_record.add(accepted, proposed)
            return
        if self.from_table:
            table_kept = accepted
            if self._guessed is not None:
                self.guess_record.add(min(accepted, 1), self._guessed)
                if not accepted:  # the table's part counted on the guess being right
                    return
                table_kept -= 1
            self.table_record.add(table_kept, sum(self._chances))
            return
        self.rejected = self.rejected + 1 if accepted == 0 else 0
        if accepted == proposed:
            self.length = min(self.length + 1, self.max_draft)
        else:
            self.length = max(1, accepted + 1)


class Record:
    """How one source of drafts fared in a conversation: tokens kept against the sum of their stated chances. Each
    step keeps CALIBRATION_MEMORY of the weight, so a source that was wrong for a while is tried again."""

    def __init__(self) -> None:
        self.kept = self.expected = 0.0

    def forget(self) -> None:
        self.kept *= CALIBRATION_MEMORY
        self.expected *= CALIBRATION_MEMORY

    def add(self, kept: float, expected: float) -> None:
        self.kept += kept
        self.expected += expected

    def scaled(self, chances: Sequence[float]) -> list[float]:
        """``chances`` as this conversation's record says they hold up (a prior of one kept of one expected)."""
        calibration = (self.kept + 1.0) / (self.expected + 1.0)
        return [min(c * calibration, 1.0) for c in chances]


class ChainRecord(Record):
    """How a chain of drafts fared in a conversation, as the chance that each draft is kept given the ones before it
    were: drafts are tried in order until the first rejected one, so ``expected`` counts the drafts tried. Starts from
    TAIL_PRIOR (weighed as PRIOR_TRIES tries)."""

    PRIOR_TRIES = 4.0

    def add(self, kept: int, proposed: int) -> None:
        super().add(kept, kept + (kept < proposed))  # the first rejected one was tried too; the rest were not

    def chance(self) -> float:
        return (self.kept + TAIL_PRIOR * self.PRIOR_TRIES) / (self.expected + self.PRIOR_TRIES)
