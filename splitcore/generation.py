"""The generation loop of the split: the head runs here, the tail runs behind a ``TailLink`` (in process or remote).

The loop is the same for ``python -m client --local`` and for the HTTP client, so the in-process split is the
parity reference for the networked one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from splitcore.errors import ManifestError
from splitcore.graphs import HeadRunner, LmHeadRunner, TailRunner
from splitcore.noise import BoundaryNoise
from splitcore.sampling import Choice, Sampler, SamplingParams


class TailLink(Protocol):
    """Where hidden states go: takes the hidden states of the next ``seq`` positions, returns the next token.

    ``past_length`` is the number of positions the caller believes the tail has cached; a tail that disagrees
    must refuse rather than guess. ``sample`` False (prefill chunks before the last) returns None.
    """

    def step(self, hidden_states: np.ndarray, past_length: int, sample: bool = True) -> Choice | None: ...

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
        self.generated: list[int] = []

    def choose(self, output: np.ndarray) -> Choice:
        """``output``: the last position's logits [vocab], or its final hidden state [hidden] with an LM head."""
        logits = output if self.lm_head is None else self.lm_head.forward(output[None, None, :])[0, 0]
        choice = self.sampler.choose(logits, self.generated)
        self.generated.append(choice.token)
        return choice


class LocalTail:
    """The tail graph in this process, with its own KV cache; the next token is chosen by a ``TokenChooser``."""

    def __init__(self, runner: TailRunner, params: SamplingParams, lm_head: LmHeadRunner | None = None) -> None:
        mode = runner.bundle.manifest.output_mode
        if (mode == "hidden") != (lm_head is not None):
            raise ManifestError(
                f"the tail bundle has output_mode {mode!r}: "
                + ("it needs the client bundle's LM head" if mode == "hidden" else "it returns logits, pass no LM head")
            )
        self.runner = runner
        self.cache = runner.new_cache()
        self.chooser = TokenChooser(params, lm_head)

    def step(self, hidden_states: np.ndarray, past_length: int, sample: bool = True) -> Choice | None:
        held = self.cache.length(0)
        if past_length != held:
            raise ValueError(f"tail has {held} positions cached, the step continues {past_length}")
        output = self.runner.forward(hidden_states, self.cache, logits_to_keep=1)
        if not sample:
            return None
        return self.chooser.choose(output[0, -1])

    def close(self) -> None:
        """Nothing to release: the cache goes with this object."""


class SplitGenerator:
    """One sequence through the head and a tail link; keeps the head's KV cache and the ids it holds.

    ``noise`` is applied to every hidden-state chunk after the head and before the tail link, i.e. to exactly what
    leaves the machine; the head's own KV cache stays noise-free.
    """

    def __init__(
        self, head: HeadRunner, tail: TailLink, prefill_chunk: int = 512, noise: BoundaryNoise | None = None
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.head = head
        self.tail = tail
        self.prefill_chunk = prefill_chunk
        self.noise = noise
        self.cache = head.new_cache()
        self.ids: list[int] = []
        self.pending: int | None = None
        self.finish_reason: str | None = None

    def feed(self, ids: Sequence[int]) -> Choice:
        """Run ``ids`` through the head in chunks and hand each chunk to the tail; the last chunk's choice wins."""
        if self.pending is not None:
            ids = [self.pending, *ids]
            self.pending = None
        if not ids:
            raise ValueError("nothing to feed: give at least one token id")
        choice = None
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = np.asarray([ids[start : start + self.prefill_chunk]], dtype=np.int64)
            past = self.cache.length(0)
            hidden = self.head.forward(chunk, self.cache)
            if self.noise is not None:
                hidden = self.noise(hidden)
            last = start + self.prefill_chunk >= len(ids)
            choice = self.tail.step(hidden, past, sample=last)
            self.ids.extend(int(i) for i in chunk[0])
        assert choice is not None
        return choice

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
        choice = self.feed(ids)
        for produced in range(max_new_tokens):
            if choice.token in stop_ids:
                self.pending = choice.token
                self.finish_reason = "stop"
                return
            yield choice
            if produced + 1 == max_new_tokens:
                self.pending = choice.token
                return
            choice = self.feed([choice.token])
