"""The generation loop of the split: the head runs here, the tail runs behind a ``TailLink`` (in process or remote).

The loop is the same for ``python -m client --local`` and for the HTTP client, so the in-process split is the
parity reference for the networked one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from splitcore.drafting import PromptLookup
from splitcore.errors import ManifestError
from splitcore.graphs import HeadRunner, LmHeadRunner, TailRunner
from splitcore.noise import BoundaryNoise
from splitcore.sampling import Choice, History, Sampler, SamplingParams
from splitcore.tail_drafts import TailDrafter

log = logging.getLogger(__name__)


class TailLink(Protocol):
    """Where hidden states go: takes the hidden states of the next ``seq`` positions, returns the next token.

    ``past_length`` is the number of positions the caller believes the tail has cached; a tail that disagrees
    must refuse rather than guess. ``sample`` False (prefill chunks before the last) returns None.
    """

    def step(self, hidden_states: np.ndarray, past_length: int, sample: bool = True, guess: bool = False,
             draft: int = 0) -> Choice | None:
        """``guess``: the choice carries the tail's guess at the token after it, where the tail has a look-ahead
        (splitcore/lookahead.py). ``draft``: it carries up to that many of the tail's own drafts after it, where
        the tail makes them (splitcore/tail_drafts.py)."""
        ...

    def verify(self, hidden_states: np.ndarray, past_length: int, count: int, guess: bool = False, draft: int = 0,
               drafted: int = 0) -> list[Choice]:
        """Run the positions like ``step`` and sample each of the last ``count`` of them (speculative decoding:
        position i's sample is the token after the i-th of them); samples after a rejected one are discarded by the
        caller through ``rollback``. ``drafted``: the positions after the first are that many of the tail's drafts
        from the latest step, so the tail knows which sample is kept last and drafts after it (``draft``)."""
        ...

    def rollback(self, length: int) -> None:
        """Keep only the first ``length`` positions (and the samples taken before them); a remote tail applies it
        with its next step."""
        ...

    # The tail's own run time for the latest step (None: not known), without the link's and without its drafting:
    # what a drafted position costs is learned from it (splitcore/drafting.py StepCosts).
    compute_seconds: float | None
    # Of the latest step, the time the tail spent drafting (None: it made no drafts).
    draft_seconds: float | None

    def close(self) -> None:
        """Release what the link holds (a remote session); closing twice is harmless."""
        ...


class TokenChooser:
    """Turns the tail's output for the last position into the next token, on the client.

    In output mode "logits" that output is the logits. In mode "hidden" it is the final hidden state and the
    client bundle's LM head makes the logits here, so the tail operator never sees logits or token ids. A remote
    tail link uses the same chooser with what the server sent back.
    """

    def __init__(self, params: SamplingParams, lm_head: LmHeadRunner | None = None) -> None:
        self.sampler = Sampler(params)
        self.lm_head = lm_head
        self.history = History()

    def choose(self, output: np.ndarray, position: int = -1) -> Choice:
        """``output``: one position's logits [vocab], or its final hidden state [hidden] with an LM head."""
        logits = output if self.lm_head is None else self.lm_head.forward(output[None, None, :])[0, 0]
        choice = self.sampler.choose(logits, self.sampler.penalized(self.history), position=position)
        self.history.add(choice.token, position)
        return choice

    def forget_from(self, length: int) -> None:
        """Drop the samples taken at positions >= ``length`` (they followed a rejected draft)."""
        self.history.rollback(length)


class LocalTail:
    """The tail graph in this process, with its own KV cache; the next token is chosen by a ``TokenChooser``."""

    def __init__(self, runner: TailRunner, params: SamplingParams, lm_head: LmHeadRunner | None = None,
                 max_length: int | None = None, drafter: TailDrafter | None = None) -> None:
        mode = runner.bundle.manifest.output_mode
        if (mode == "hidden") != (lm_head is not None):
            raise ManifestError(
                f"the tail bundle has output_mode {mode!r}: "
                + ("it needs the client bundle's LM head" if mode == "hidden" else "it returns logits, pass no LM head")
            )
        self.runner = runner
        self.cache = runner.new_cache(max_length)
        self.chooser = TokenChooser(params, lm_head)
        # The tail's own drafts, where the bundle lets it make them (output mode "logits"), and the latest ones.
        self.drafter = drafter if mode == "logits" else None
        self.drafts: list[int] = []
        self.compute_seconds: float | None = None
        self.draft_seconds: float | None = None

    def step(self, hidden_states: np.ndarray, past_length: int, sample: bool = True, guess: bool = False,
             draft: int = 0) -> Choice | None:
        held = self.cache.length(0)
        if past_length != held:
            raise ValueError(f"tail has {held} positions cached, the step continues {past_length}")
        started = time.perf_counter()
        output = self.runner.forward(hidden_states, self.cache, logits_to_keep=1)
        if not sample:
            self.drafts = []
            return None
        first = past_length + hidden_states.shape[1] - 1
        choice = self.chooser.choose(output[0, -1], first)
        choice = self._guess(output[0], [choice])[0] if guess else choice
        choices = self._draft([choice], first, hidden_states.shape[1], draft, 0)
        self.compute_seconds = time.perf_counter() - started - (self.draft_seconds or 0.0)
        return choices[0]

    def verify(self, hidden_states: np.ndarray, past_length: int, count: int, guess: bool = False, draft: int = 0,
               drafted: int = 0) -> list[Choice]:
        held = self.cache.length(0)
        if past_length != held:
            raise ValueError(f"tail has {held} positions cached, the step continues {past_length}")
        started = time.perf_counter()
        output = self.runner.forward(hidden_states, self.cache, logits_to_keep=count)[0]
        first = past_length + hidden_states.shape[1] - count
        choices = [self.chooser.choose(output[i], first + i) for i in range(count)]
        choices = self._guess(output, choices) if guess else choices
        choices = self._draft(choices, first, hidden_states.shape[1], draft, drafted)
        self.compute_seconds = time.perf_counter() - started - (self.draft_seconds or 0.0)
        return choices

    def _draft(self, choices: list[Choice], first: int, seq: int, count: int, drafted: int) -> list[Choice]:
        """The tail's drafts after the step's last kept choice, as the service makes them (services/runner.py)."""
        claimed, self.drafts, self.draft_seconds = self.drafts[:drafted], [], None
        if self.drafter is None or not count:
            return choices
        started = time.perf_counter()
        found = self.drafter.row(0, first, [c.token for c in choices], claimed, seq, self.chooser.history, count)
        if found is None:
            return choices
        row, kept = found
        try:
            self.drafts = self.drafter.draft(self.runner, self.cache, [row])[0]
        except Exception:  # noqa: BLE001 - drafts are an optimisation, as on the service (services/runner.py)
            log.exception("drafting failed")
            return choices
        self.draft_seconds = time.perf_counter() - started
        choices = list(choices)
        choices[kept] = dataclasses.replace(choices[kept], drafts=tuple(self.drafts))
        return choices

    def _guess(self, logits: np.ndarray, choices: list[Choice]) -> list[Choice]:
        """The look-ahead's guess after each choice, as the service answers it (none in output mode "hidden")."""
        if self.runner.lookahead is None:
            return choices
        guesses = self.runner.lookahead.guess(logits, np.array([c.token for c in choices]))
        return [dataclasses.replace(c, guess=g) for c, g in zip(choices, guesses)]

    def rollback(self, length: int) -> None:
        self.cache.truncate(0, length)
        self.chooser.forget_from(length)

    def close(self) -> None:
        """Nothing to release: the cache goes with this object."""


class SplitGenerator:
    """One sequence through the head and a tail link; keeps the head's KV cache and the ids it holds.

    ``noise`` is applied to every hidden-state chunk after the head and before the tail link, i.e. to exactly what
    leaves the machine; the head's own KV cache stays noise-free.

    With a ``drafter``, each decode step sends the last token plus drafted ones in one chunk and the tail samples
    every position (speculative decoding across the split): the drafts that equal the tail's own samples are kept,
    plus the first sample that differs, and both caches roll back to that length. Greedy output is identical to
    decoding one token per step; with sampling the distribution is unchanged, since a draft x is kept exactly when
    the tail's sample from p equals x (probability p(x)) and otherwise that sample is a draw from p without x,
    renormalised: the standard accept/resample rule for a deterministic draft. The tail never learns the drafts.
    """

    def __init__(
        self, head: HeadRunner, tail: TailLink, prefill_chunk: int = 512, noise: BoundaryNoise | None = None,
        drafter: PromptLookup | None = None, max_length: int | None = None,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.head = head
        self.tail = tail
        self.prefill_chunk = prefill_chunk
        self.noise = noise
        self.drafter = drafter
        self.verified_steps = self.drafted = self.accepted = 0
        self.head_seconds = 0.0  # the head's run time for the latest step
        self.asked = 0  # drafts the latest step asked the tail for
        # Positions this conversation may hold (default: the model's); the KV buffer is reserved at this size.
        self.cache = head.new_cache(max_length)
        self.ids: list[int] = []
        self.pending: int | None = None
        self.finish_reason: str | None = None

    def feed(self, ids: Sequence[int], ask_tail: bool = True) -> Choice:
        """Run ``ids`` through the head in chunks and hand each chunk to the tail; the last chunk's choice wins.
        ``ask_tail``: the last chunk asks the tail for its drafts (a prompt's does not: the first token would wait for
        them)."""
        if self.pending is not None:
            ids = [self.pending, *ids]
            self.pending = None
        if not ids:
            raise ValueError("nothing to feed: give at least one token id")
        choice = None
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = np.asarray([ids[start : start + self.prefill_chunk]], dtype=np.int64)
            past = self.cache.length(0)
            started = time.perf_counter()
            hidden = self.head.forward(chunk, self.cache)
            self.head_seconds = time.perf_counter() - started
            if self.noise is not None:
                hidden = self.noise(hidden)
            last = start + self.prefill_chunk >= len(ids)
            choice = self.tail.step(hidden, past, sample=last, guess=last and self._wants_guess(),
                                    draft=self._tail_count(ask_tail) if last else 0)
            self.ids.extend(int(i) for i in chunk[0])
        assert choice is not None
        return choice

    def _send(self, ids: Sequence[int]) -> tuple[np.ndarray, int]:
        past = self.cache.length(0)
        started = time.perf_counter()
        hidden = self.head.forward(np.asarray([ids], dtype=np.int64), self.cache)
        self.head_seconds = time.perf_counter() - started
        if self.noise is not None:
            hidden = self.noise(hidden)
        return hidden, past

    def _rollback(self, length: int) -> None:
        self.cache.truncate(0, length)
        self.tail.rollback(length)
        del self.ids[length:]

    def _verify(self, token: int, drafts: list[int]) -> tuple[list[Choice], int]:
        """Feed ``token`` and the drafts as one chunk; returns the tail's samples and how many drafts they keep."""
        started = time.perf_counter()
        hidden, past = self._send([token, *drafts])
        choices = self.tail.verify(hidden, past, len(drafts) + 1, guess=self._wants_guess(),
                                   draft=self._tail_count(bool(self.drafter.from_tail)), drafted=self.drafter.from_tail)
        self._observe(len(drafts) + 1, started, choices)
        accepted = 0
        while accepted < len(drafts) and choices[accepted].token == drafts[accepted]:
            accepted += 1
        self.ids.extend([token, *drafts])
        self._rollback(past + 1 + accepted)
        self.drafter.update(len(drafts), accepted)
        self.verified_steps += 1
        self.drafted += len(drafts)
        self.accepted += accepted
        return choices, accepted

    def _observe(self, positions: int, started: float, choices: Sequence[Choice]) -> None:
        """Tell the drafter what the step just done cost: end to end and in the runs, the tail's drafting apart, and
        how many drafts that bought (``choices``: the step's)."""
        drafting = getattr(self.tail, "draft_seconds", None)  # a link that wraps another may not say
        tail = getattr(self.tail, "compute_seconds", None)
        compute = None if tail is None else self.head_seconds + tail
        made = sum(len(choice.drafts) for choice in choices)
        self.drafter.observe(positions, time.perf_counter() - started - (drafting or 0.0), compute, self.asked,
                             drafting, made)

    def _tail_count(self, ask: bool = True) -> int:
        """How many drafts the step about to go asks the tail for (0 without a drafter; 0 where the step holds the
        client's own drafts, after which the tail cannot tell which of its samples is kept last)."""
        room = self.cache.max_length - self.cache.length(0) - 2
        self.asked = 0 if self.drafter is None else self.drafter.ask_tail(room if ask else 0)
        return self.asked

    def _wants_guess(self) -> bool:
        return self.drafter is not None and self.drafter.wants_guess()

    def _drafts(self, choice: Choice, limit: int) -> list[int]:
        if self.drafter is None:
            return []
        room = self.cache.max_length - self.cache.length(0) - 1
        return self.drafter.propose([*self.ids, choice.token], min(limit, room), choice.guess, choice.drafts)

    @property
    def held_ids(self) -> list[int]:
        """Every id this conversation has produced or been fed, the pending one included."""
        return self.ids + ([self.pending] if self.pending is not None else [])

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> Iterator[Choice]:
        """Feed ``ids`` then yield up to ``max_new_tokens`` tokens; a stop token ends the run and is not yielded.

        The last yielded token is kept as ``pending`` and goes in front of the next ``feed``, so a following turn
        continues the same caches without a wasted step.
        """
        self.finish_reason = "length"
        if max_new_tokens < 1:
            return
        choice = self.feed(ids, ask_tail=False)
        produced = 0
        while True:
            if choice.token in stop_ids:
                self.pending = choice.token
                self.finish_reason = "stop"
                return
            yield choice
            produced += 1
            if produced == max_new_tokens:
                self.pending = choice.token
                return
            # Drafts never take the run past max_new_tokens: every kept draft plus the final sample fits.
            drafts = self._drafts(choice, max_new_tokens - produced - 1)
            if not drafts:
                started = time.perf_counter()
                choice = self.feed([choice.token])
                if self.drafter is not None:
                    self._observe(1, started, [choice])
                continue
            start = self.cache.length(0)
            choices, accepted = self._verify(choice.token, drafts)
            for index, kept in enumerate(choices[:accepted]):
                if kept.token in stop_ids:  # a stop token was fed as a draft: the caches end before it
                    self._rollback(start + 1 + index)
                    self.pending = kept.token
                    self.finish_reason = "stop"
                    return
                yield kept
                produced += 1
            choice = choices[accepted]
