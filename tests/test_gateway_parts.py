"""Parts of the gateway that need no model: stop sequences, the conversation pool, the request checks."""

from __future__ import annotations

import pytest

from client.gateway.errors import APIError
from client.gateway.pool import ConversationPool
from client.gateway.schemas import ChatRequest, CompletionRequest
from client.gateway.stops import StopMatcher
from splitcore.sampling import SamplingParams


def run_stops(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher, sent = StopMatcher(stops), []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        sent.append(text)
        if stopped:
            return sent, True
    return [*sent, matcher.flush()], False


def test_stop_sequence_split_over_pieces_is_cut_and_never_sent() -> None:
    sent, stopped = run_stops(["END"], ["abc E", "N", "D tail"])
    assert stopped and "".join(sent) == "abc " and sent[0] == "abc "  # " E" waits: it may start "END"


def test_held_back_text_is_released_when_it_does_not_become_a_stop() -> None:
    sent, stopped = run_stops(["END"], ["abc E", "x"])
    assert not stopped and "".join(sent) == "abc Ex"


def test_earliest_of_several_stops_wins() -> None:
    sent, stopped = run_stops(["b", "a"], ["xyab"])
    assert stopped and "".join(sent) == "xy"


def test_no_stops_passes_everything_through() -> None:
    assert run_stops([], ["a", "b"]) == (["a", "b", ""], False)


class FakeConversation:
    def __init__(self, held: str = "") -> None:
        self.held, self.closed = held, False

    @property
    def positions(self) -> int:
        return len(self.held)

    def extends(self, text: str) -> bool:
        return bool(self.held) and len(text) > len(self.held) and text.startswith(self.held)

    def close(self) -> None:
        self.closed = True


GREEDY = SamplingParams()


def test_pool_reuses_the_longest_held_prefix_for_the_same_sampling() -> None:
    pool = ConversationPool(lambda params: FakeConversation(), size=4)
    leases = [pool.acquire(held, GREEDY) for held in ("ab", "abcd", "xyz")]
    for lease, held in zip(leases, ("ab", "abcd", "xyz")):
        lease.conversation.held = held
        pool.release(lease, clean=True)
    lease = pool.acquire("abcdef", GREEDY)
    assert lease.reused and lease.conversation.held == "abcd"
    assert not pool.acquire("abcdef", SamplingParams(temperature=0.5)).reused
    assert pool.acquire("abcdef", GREEDY).conversation.held == "ab"  # the next longest
    assert [lease.conversation.held for lease in pool.idle] == ["xyz"]


def test_pool_is_bounded_and_closes_what_it_drops() -> None:
    pool = ConversationPool(lambda params: FakeConversation(), size=2)
    leases = [pool.acquire("t", GREEDY) for _ in range(3)]
    for lease in leases:
        pool.release(lease, clean=True)
    assert [lease.conversation.closed for lease in leases] == [True, False, False]
    failed = pool.acquire("t", GREEDY)
    pool.release(failed, clean=False)
    assert failed.conversation.closed and len(pool.idle) == 2


def test_seeded_sampling_never_continues_a_conversation() -> None:
    pool = ConversationPool(lambda params: FakeConversation(), size=2)
    seeded = SamplingParams(temperature=1.0, seed=3)
    lease = pool.acquire("a", seeded)
    pool.release(lease, clean=True)
    assert lease.conversation.closed and pool.idle == []


@pytest.mark.parametrize("extra", [{"n": 3}, {"logprobs": True}, {"tools": [{"type": "function"}]},
                                   {"response_format": {"type": "json_object"}}])
def test_unsupported_values_are_refused_by_name(extra: dict) -> None:
    request = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], **extra)
    with pytest.raises(APIError) as refused:
        request.check_supported()
    assert refused.value.status == 400 and refused.value.param == next(iter(extra))


def test_defaults_and_harmless_extras_are_accepted() -> None:
    ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=1, user="u", logprobs=False,
                presence_penalty=0).check_supported()


def test_text_parts_are_joined_and_developer_is_system() -> None:
    message = ChatRequest(model="m", messages=[{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                                 {"type": "text", "text": "b"}]}])
    assert message.messages[0].for_template() == {"role": "system", "content": "ab"}


def test_one_prompt_per_request() -> None:
    with pytest.raises(APIError):
        CompletionRequest(model="m", prompt=["a", "b"]).text()
