"""A multi-turn conversation over one pair of KV caches: each turn sends only what the caches do not hold yet."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

from client.tokenizer import ChatTokenizer, text_pieces
from splitcore.errors import SplitError
from splitcore.generation import SplitGenerator

log = logging.getLogger(__name__)


class ContextExceeded(SplitError):
    """A prompt does not leave room in the model's positions for even one generated token."""


def fit(prompt: int, held: int, max_new_tokens: int, context: int) -> int:
    """The tokens a turn may generate: ``max_new_tokens``, clamped to the positions left after the prompt.

    ``held``: positions the caches hold before this turn's ``prompt`` tokens. A prompt that leaves no room for even
    one token is refused.
    """
    room = context - held - prompt
    if room < 1:
        before = f" after the {held} positions this conversation holds" if held else ""
        raise ContextExceeded(
            f"the prompt has {prompt} tokens{before}; this model holds {context} positions, which leaves no room to "
            "generate: shorten the prompt" + (" or start a new conversation" if held else "")
        )
    if max_new_tokens > room:
        log.warning("generating at most %d tokens, not %d: the model holds %d positions and the prompt takes %d",
                    room, max_new_tokens, context, held + prompt)
    return min(max_new_tokens, room)


class Conversation:
    """Holds a generator (head cache + tail link) and the text its caches stand for.

    A new turn is rendered with the chat template; when the rendered text extends what the caches already hold,
    only the extension is tokenized and fed. Otherwise (an edited history) the conversation starts over with a
    fresh generator from ``restart``.
    """

    def __init__(self, tokenizer: ChatTokenizer, restart: Callable[[], SplitGenerator],
                 context: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.restart = restart
        self.context = context  # when set, each turn's tokens are fitted into it (see ``fit``)
        self.generator = restart()
        self.fed_new: int = 0
        self.reused: int = 0

    @property
    def held_text(self) -> str:
        return self.tokenizer.decode(self.generator.held_ids, skip_special_tokens=False)

    @property
    def positions(self) -> int:
        """Positions both KV caches hold (the pending token is held but not yet fed)."""
        return len(self.generator.ids)

    def extends(self, text: str) -> bool:
        """True when ``text`` continues what the caches hold, so a turn on it feeds only the new part."""
        if not self.generator.held_ids:
            return False
        held = self.held_text
        return len(text) > len(held) and text.startswith(held)

    def ids_to_feed(self, text: str) -> list[int]:
        held = self.generator.held_ids
        held_text = self.held_text
        if held and text.startswith(held_text):
            self.reused = len(held)
            return self.tokenizer.encode(text[len(held_text) :], add_special_tokens=False)
        if held:
            log.info("conversation history changed; starting a new session")
            self.close()
            self.generator = self.restart()
        self.reused = 0
        return self.tokenizer.encode(text, add_special_tokens=False)

    def reply(self, messages: Sequence[dict], max_new_tokens: int) -> Iterator[str]:
        """Stream the assistant's reply to ``messages``: one text piece per token ("" while UTF-8 is incomplete)."""
        return self.complete(self.tokenizer.render(messages, add_generation_prompt=True), max_new_tokens)

    def complete(self, text: str, max_new_tokens: int) -> Iterator[str]:
        """Stream the continuation of ``text`` (already rendered): one text piece per token."""
        ids = self.ids_to_feed(text)
        if self.context is not None:
            max_new_tokens = fit(len(ids), len(self.generator.held_ids), max_new_tokens, self.context)
        self.fed_new = len(ids)
        yield from text_pieces(self.tokenizer, self.generator.generate(ids, max_new_tokens, self.tokenizer.stop_ids))

    @property
    def finish_reason(self) -> str | None:
        return self.generator.finish_reason

    def close(self) -> None:
        """Release the tail session behind the current generator (a remote link deletes it on the server)."""
        self.generator.tail.close()
