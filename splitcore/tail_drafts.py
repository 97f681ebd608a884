"""The tail's own drafts: the tokens after its latest sample, made by running the model on from what the tail knows.

Where the tail samples (output mode "logits") it knows every generated token, and never the prompt. With the head
graph in its bundle it drafts the next tokens itself, one at a time: the head runs over the manifest's answer prefix
(the ids the chat template writes before an answer) and the answer's latest ``window`` tokens, and the tail runs its
last position against the conversation's real KV cache. Only the head's view is approximate (no prompt); every layer
after the split attends to the whole conversation. On SmolLM2's greedy chat answers 99% of such drafts are the model's
own next token (docs/performance.md), where the client's prompt lookup finds nothing to draft in open chat.

The client asks for drafts with a step and sends them back with the next one, through its own head (exact this
time), and the tail verifies them like any draft: exact output, greedy or sampled. A draft costs the tail one decode
run of its own (batched across the sessions that asked), so the client asks for as many as pay at the measured costs
(splitcore/drafting.py). The drafts' KV positions are scratch: the slot's length is restored after each run, and the
verified step writes those positions again from the client's exact hidden states.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from splitcore.graphs import HeadRunner, TailRunner
from splitcore.kvpool import KVPool
from splitcore.manifest import Bundle
from splitcore.protocol import MAX_DRAFTS
from splitcore.sampling import History


@dataclass
class DraftRow:
    """One sequence to draft for: its KV slot, whose first ``length`` positions are those before ``recent[-1]``'s, and
    the latest tokens of its answer (``recent[-1]`` is the tail's latest kept sample)."""

    slot: int
    length: int
    recent: Sequence[int]
    count: int


class TailDrafter:
    def __init__(self, bundle: Bundle, providers: Sequence[str] | None = None, intra_op_threads: int = 0) -> None:
        spec = bundle.manifest.tail_drafts
        if spec is None:
            raise ValueError(f"the bundle in {bundle.root} has no tail_drafts; re-export it without --private-output")
        self.head = HeadRunner(bundle, providers, intra_op_threads)
        self.prefix = list(spec.prefix)
        self.window = spec.window
        tokenizer = bundle.manifest.tokenizer
        self.stops = set(tokenizer.eos_token_ids) if tokenizer is not None else set()
        self._scratch: KVPool | None = None
        # One drafting at a time: the scratch cache and the head's IO bindings are shared (the service drafts on its
        # one worker thread; in process, the gateway's conversations run on several).
        self._lock = threading.Lock()

    def row(self, slot: int, first: int, tokens: Sequence[int], drafted: Sequence[int], seq: int, history: History,
            count: int) -> tuple[DraftRow, int] | None:
        """What to draft after a step of ``seq`` positions that sampled ``tokens`` from position ``first`` on (already
        in ``history``), and the index of the token the drafts follow: the step's last kept one. The tail knows which
        that is when the step sampled one position, or when its positions after the first held ``drafted``, its own
        drafts (the first sample that differs is the last kept); None otherwise (the client's own drafts)."""
        if len(tokens) == 1:
            kept = 0
        elif drafted and len(tokens) == seq == len(drafted) + 1:
            kept = 0
            while kept < len(drafted) and tokens[kept] == drafted[kept]:
                kept += 1
        else:
            return None
        later = len(tokens) - 1 - kept  # samples after the kept one (they followed a rejected draft)
        recent = history.latest_run(self.window + later)
        recent = recent[: len(recent) - later]
        if not recent or recent[-1] != tokens[kept]:  # a history too short to hold it (a limit of 0)
            recent = [tokens[kept]]
        return DraftRow(slot, first + kept + 1, recent, count), kept

    def draft(self, tail: TailRunner, pool: KVPool, rows: Sequence[DraftRow]) -> list[list[int]]:
        """Up to ``row.count`` greedy drafts for each row (fewer after a stop id, or where the slot has no room), each
        round one batched tail run over the rows still drafting. A slot's positions from ``row.length`` on are
        overwritten (the drafts' own), and its length is as it was afterwards."""
        with self._lock:
            return self._draft(tail, pool, rows)

    def _draft(self, tail: TailRunner, pool: KVPool, rows: Sequence[DraftRow]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in rows]
        counts = [max(0, min(row.count, MAX_DRAFTS, pool.max_length - row.length - 1)) for row in rows]
        active = [i for i, count in enumerate(counts) if count > 0 and len(rows[i].recent) > 0]
        if not active:
            return drafts
        scratch = self._scratch_for(len(rows))
        held = {rows[i].slot: pool.length(rows[i].slot) for i in active}
        for i in active:
            pool.truncate(rows[i].slot, rows[i].length)
        try:
            hidden = np.concatenate([self._start(i, rows[i].recent) for i in active])  # [n, 1, hidden]
            while active:
                logits = tail.decode_rows(hidden, pool, [rows[i].slot for i in active])
                tokens = logits[:, -1].argmax(-1)
                going = []
                for i, token in zip(active, tokens.tolist()):
                    drafts[i].append(int(token))
                    if len(drafts[i]) < counts[i] and token not in self.stops:
                        going.append(i)
                if not going:
                    break
                ids = np.array([[drafts[i][-1]] for i in going], dtype=np.int64)
                hidden = self.head.decode(ids, scratch, going)
                active = going
        finally:
            for slot, length in held.items():
                pool.restore(slot, length)
        return drafts

    def _start(self, row: int, recent: Sequence[int]) -> np.ndarray:
        """The head over the prefix and the latest ``window`` tokens, in scratch slot ``row``: the last one's hidden
        state [1, 1, hidden]."""
        ids = np.array([[*self.prefix, *list(recent)[-self.window :]]], dtype=np.int64)
        self._scratch.truncate(row, 0)
        return self.head.forward(ids, self._scratch, row)[:, -1:]

    def _scratch_for(self, rows: int) -> KVPool:
        if self._scratch is None or self._scratch.slots < rows:
            self._scratch = self.head.new_pool(rows, len(self.prefix) + self.window + MAX_DRAFTS + 1)
            for _ in range(rows):
                self._scratch.acquire()
        return self._scratch
