"""Stop sequences: cut the output at the first one, holding back text that could still turn into one."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text pieces as they stream; get back what is safe to send and whether a stop sequence was hit.

    The text sent never contains a stop sequence, and never has to be taken back: a tail that is the beginning of
    a stop sequence is held until the next piece decides it (or ``flush`` at the end releases it).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = self._partial(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    def _partial(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the start of a stop sequence."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
