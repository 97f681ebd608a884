"""A token sequence held in a pair of KV caches (the head's here, the tail's on the service), continued by ids.

Requests are matched against what the caches hold by token ids, never by text: a cached sequence is continued
only when the fresh encoding of the whole new prompt starts with exactly the ids its caches were fed (plus the one
pending token), so a continued conversation computes what a fresh one would. Text comparison cannot promise that:
a continuation that splits a word, or a reply re-encoded differently inside the chat template, decodes to the same
text from other ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from client.tokenizer import ChatTokenizer, text_pieces
from splitcore.generation import SplitGenerator


class CachedSequence:
    def __init__(self, generator: SplitGenerator, tokenizer: ChatTokenizer) -> None:
        self.generator = generator
        self.tokenizer = tokenizer
        self.fed_new = 0  # positions the last ``complete`` fed: its new ids, and the pending token before them

    @property
    def held(self) -> list[int]:
        """Every id the caches hold, plus the pending one (generated last, fed with the next turn)."""
        return self.generator.held_ids

    @property
    def positions(self) -> int:
        """Positions both KV caches hold (the pending token is held but not yet fed)."""
        return len(self.generator.ids)

    def extends(self, ids: Sequence[int]) -> bool:
        """True when ``ids`` (a whole prompt) continues the held ids, so a turn on it feeds only the new ones."""
        held = self.held
        return bool(held) and len(ids) > len(held) and list(ids[: len(held)]) == held

    def complete(self, ids: Sequence[int], max_new_tokens: int) -> Iterator[str]:
        """Stream the continuation of the prompt ``ids``: one text piece per token ("" while UTF-8 is incomplete)."""
        held = self.held
        if held and not self.extends(ids):
            raise ValueError(f"the prompt does not continue the {len(held)} ids this sequence holds")
        new = list(ids[len(held) :])
        self.fed_new = len(ids) - self.positions
        yield from text_pieces(self.tokenizer, self.generator.generate(new, max_new_tokens, self.tokenizer.stop_ids))

    @property
    def finish_reason(self) -> str | None:
        return self.generator.finish_reason

    def close(self) -> None:
        """Release the tail session behind the caches (a remote link deletes it on the service)."""
        self.generator.tail.close()
