"""A drafter for tests: speculation's hits and misses on demand, whatever the model does."""

from __future__ import annotations

from splitcore.drafting import StepCosts


class FreePositions(StepCosts):
    """Step costs where a drafted position (and a draft of the tail's) costs nothing, whatever the machine's timing:
    every draft worth anything is sent, so a test of what drafts do does not depend on how fast this machine ran its
    steps."""

    def measured_share(self) -> float:
        return 0.0

    def draft_seconds(self) -> float:
        """The tail's drafts cost nothing either."""
        return 0.0


class OracleDrafts:
    """Proposes the known continuation with every ``wrong_every``-th token replaced: hits and misses on demand."""

    def __init__(self, prompt: list[int], continuation: list[int], wrong_every: int = 3, length: int = 4) -> None:
        self.prompt, self.continuation, self.wrong_every, self.length = len(prompt), continuation, wrong_every, length
        self.proposed = self.accepted = 0

    def propose(self, history: list[int], limit: int, guess: tuple[int, float] | None = None, tail=()) -> list[int]:
        done = len(history) - self.prompt  # generated tokens the history holds (the last one not fed yet)
        drafts = list(self.continuation[done : done + min(limit, self.length)])
        for i in range(len(drafts)):
            if (done + i) % self.wrong_every == self.wrong_every - 1:
                drafts[i] = (drafts[i] + 1) % 512
        return drafts

    def wants_guess(self) -> bool:
        return False

    def update(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted

    def observe(self, positions: int, seconds: float, compute: float | None = None, asked: int = 0,
                drafting: float | None = None, made: int = 0) -> None:
        """Step times do not matter here."""

    from_tail = 0  # its drafts are never the tail's own

    def ask_tail(self, room: int) -> int:
        return 0
