"""The model runner executes one scheduler step on the worker thread: the tail runs, then the sampler, same call.

Decode rows of different sessions are one ``decode_rows`` run over their slots (nothing is copied: each row's KV is
read and written in its slot, see splitcore/kvpool.py); each prompt chunk is one ``forward`` on its slot. Then every
row that needs a token is sampled in one vectorised call per position, each session with its own RNG and bounded
history (for a step that samples n positions, position j's penalty includes the step's earlier samples).

Only this thread touches the KV pool and the sessions' samplers while a step runs; the engine waits for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np

from services.scheduler import Plan, Work
from splitcore.errors import InvalidRequest
from splitcore.graphs import TailRunner
from splitcore.kvpool import KVPool
from splitcore.sampling import choose_batch
from splitcore.tail_drafts import TailDrafter

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, tail: TailRunner, pool: KVPool, drafter: TailDrafter | None = None) -> None:
        self.tail = tail
        self.pool = pool
        self.lookahead = tail.lookahead
        self.drafter = drafter

    def execute(self, plan: Plan) -> None:
        """Run ``plan``; each work ends with ``output`` (and ``choices``) or ``error``, never an exception here."""
        if plan.decode:
            self._decode(plan.decode)
        for chunk in plan.chunks:
            work, last = chunk.work, chunk.last
            piece = work.hidden[:, work.offset : work.offset + chunk.size]
            try:
                out = self.tail.forward(piece, self.pool, work.session.slot, work.keep if last else 1)
            except Exception as e:  # noqa: BLE001 - whatever onnxruntime raises belongs to this step alone
                log.exception("a chunk of %d positions failed", chunk.size)
                work.error = e
                continue
            work.offset += chunk.size
            if last:
                work.output = out[0]
                _check_finite(work)
        sampled = [w for w in plan.works if w.output is not None and w.error is None and w.samples and not w.choices]
        self._sample(sampled)
        if self.lookahead is not None:
            self._guess([w for w in sampled if w.guesses and w.error is None])
        if self.drafter is not None:
            started = time.perf_counter()
            self._draft([w for w in sampled if w.draft and w.error is None])
            plan.draft_seconds = time.perf_counter() - started

    def _decode(self, works: list[Work]) -> None:
        hidden = np.concatenate([w.hidden for w in works], axis=0)
        try:
            out = self.tail.decode_rows(hidden, self.pool, [w.session.slot for w in works])
        except Exception as e:  # noqa: BLE001
            log.exception("a decode batch of %d rows failed", len(works))
            for w in works:
                w.error = e
            return
        for row, w in enumerate(works):
            w.offset, w.output = 1, out[row]
            _check_finite(w)

    def _sample(self, works: list[Work]) -> None:
        for j in range(max((w.samples for w in works), default=0)):
            rows = [w for w in works if w.samples > j]
            logits = [w.output[w.keep - w.samples + j] for w in rows]
            last = [j == w.samples - 1 for w in rows]
            samplers = [w.session.sampler for w in rows]
            histories = [sampler.penalized(w.session.history) for sampler, w in zip(samplers, rows)]
            positions = [w.start + w.seq - w.samples + j for w in rows]
            try:
                choices = choose_batch(logits, samplers, histories,
                                       [w.session.top_logprobs if is_last else 0 for w, is_last in zip(rows, last)],
                                       positions)
            except Exception as e:  # noqa: BLE001
                log.exception("sampling %d rows failed", len(rows))
                for w in rows:
                    w.error = e
                return
            for w, choice, position in zip(rows, choices, positions):
                # The position the token was sampled from: a rollback to below it drops it from the history.
                w.session.history.add(choice.token, position)
                w.choices.append(choice)

    def _guess(self, works: list[Work]) -> None:
        """The look-ahead's guess after each sampled token, from the logits it was sampled from: one vectorised
        call for every row of the step (a client that verified drafts needs the guess after whichever token it
        keeps last)."""
        if not works:
            return
        logits = np.concatenate([w.output[w.keep - w.samples : w.keep] for w in works])
        tokens = [c.token for w in works for c in w.choices]
        try:
            guesses = iter(self.lookahead.guess(logits, np.asarray(tokens)))
        except Exception:  # noqa: BLE001 - a guess is an optimisation: the step's tokens stand without one
            log.exception("the look-ahead failed for %d rows", len(tokens))
            return
        for w in works:
            w.choices = [replace(c, guess=next(guesses)) for c in w.choices]

    def _draft(self, works: list[Work]) -> None:
        """The tail's drafts after each work's last kept token (splitcore/tail_drafts.py). Which token that is, the
        tail knows where it knows every drafted position's token: a step of one sampled position, or one whose drafts
        were its own (``drafted``). Drafting overwrites the KV of the step's rejected positions, which the client rolls
        back with its next step (it finds the same ones rejected)."""
        rows, drafting = [], []
        for w in works:
            found = self.drafter.row(w.session.slot, w.start + w.seq - w.samples, [c.token for c in w.choices],
                                     w.drafted, w.seq, w.session.history, w.draft)
            if found is not None:
                row, w.drafts_after = found
                rows.append(row)
                drafting.append(w)
        if not rows:
            return
        try:
            drafts = self.drafter.draft(self.tail, self.pool, rows)
        except Exception:  # noqa: BLE001 - drafts are an optimisation: the step's tokens stand without them
            log.exception("drafting failed for %d rows", len(rows))
            for w in works:
                w.draft = 0  # answered as if none were asked for, so the client stops asking
            return
        for w, row, tokens in zip(drafting, rows, drafts):
            w.drafts = w.session.drafts = tokens
            w.session.drafts_at = row.length


def _check_finite(work: Work) -> None:
    """A NaN or inf out of the tail (inputs that overflow a float16 graph inside) fails the step, which the engine
    then rolls back, instead of answering a meaningless token and keeping a poisoned cache. (Its maximum and minimum
    are finite exactly when every value is: NaN propagates through both; no [keep, vocab] mask is allocated.)"""
    if not (np.isfinite(work.output.max()) and np.isfinite(work.output.min())):
        work.error = InvalidRequest("the tail's output for these hidden states is not finite (values too large for "
                                    "its graph?); the step was rolled back")
