"""Parts of the gateway that need no model: stop sequences, the pool, the request checks, sampling defaults, and
the HTTP layer over a fake engine (cancellation when the client goes away)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from servers import serve_app

from client.gateway.app import create_app
from client.gateway.defaults import model_defaults, sampling_defaults
from client.gateway.engine import Finished, Job, Usage
from client.gateway.errors import APIError
from client.gateway.pool import ConversationPool
from client.gateway.schemas import ChatRequest, CompletionRequest
from client.gateway.sequence import CachedSequence
from client.gateway.settings import GatewaySettings
from client.gateway.stops import StopMatcher
from client.settings import ClientSettings
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
    def __init__(self, held: tuple[int, ...] = ()) -> None:
        self.held, self.closed = held, False

    @property
    def positions(self) -> int:
        return len(self.held)

    def extends(self, ids) -> bool:
        return bool(self.held) and len(ids) > len(self.held) and tuple(ids[: len(self.held)]) == self.held

    def close(self) -> None:
        self.closed = True


GREEDY = SamplingParams()


def test_pool_reuses_the_longest_held_prefix_for_the_same_sampling() -> None:
    pool = ConversationPool(lambda params: FakeConversation(), size=4)
    held = [(1, 2), (1, 2, 3, 4), (7, 8, 9)]
    leases = [pool.acquire(ids, GREEDY) for ids in held]
    for lease, ids in zip(leases, held):
        lease.conversation.held = ids
        pool.release(lease, clean=True)
    lease = pool.acquire([1, 2, 3, 4, 5, 6], GREEDY)
    assert lease.reused and lease.conversation.held == (1, 2, 3, 4)
    assert not pool.acquire([1, 2, 3, 4, 5, 6], SamplingParams(temperature=0.5)).reused
    assert pool.acquire([1, 2, 3, 4, 5, 6], GREEDY).conversation.held == (1, 2)  # the next longest
    assert [lease.conversation.held for lease in pool.idle] == [(7, 8, 9)]


class FakeGenerator:
    """What CachedSequence needs of a SplitGenerator: the ids the caches hold, the pending one, and generate."""

    def __init__(self, ids: list[int], pending: int | None) -> None:
        self.ids, self.pending, self.fed = ids, pending, []
        self.finish_reason = None

    @property
    def held_ids(self) -> list[int]:
        return self.ids + ([self.pending] if self.pending is not None else [])

    def generate(self, ids, max_new_tokens, stop_ids):
        self.fed = ([self.pending] if self.pending is not None else []) + list(ids)
        return iter(())


def test_cached_sequence_matches_token_ids_not_text() -> None:
    """"Once upon a ti" + "me" reads like "Once upon a time", but a BPE encodes the whole word differently: ids
    that do not start with the held ones start afresh, so a reused sequence computes what a fresh one would."""
    tokenizer = SimpleNamespace(stop_ids=[0], tokenizer=None)  # no token is decoded here
    ti, time_ = 301, 302  # "ti" and "time" as one token each
    sequence = CachedSequence(FakeGenerator([5, 6, ti], pending=None), tokenizer)
    assert not sequence.extends([5, 6, time_])
    assert not sequence.extends([5, 6, ti])  # nothing new to feed
    assert sequence.extends([5, 6, ti, 7])
    with pytest.raises(ValueError, match="does not continue"):
        list(sequence.complete([5, 6, time_, 7], 4))
    # The pending token (generated last turn, not fed yet) is part of what must match, and is fed first.
    sequence = CachedSequence(FakeGenerator([5, 6], pending=9), tokenizer)
    assert not sequence.extends([5, 6, 8, 1])
    list(sequence.complete([5, 6, 9, 1, 2], 4))
    assert sequence.generator.fed == [9, 1, 2] and sequence.fed_new == 3


def test_pool_is_bounded_and_closes_what_it_drops() -> None:
    pool = ConversationPool(lambda params: FakeConversation(), size=2)
    leases = [pool.acquire([1], GREEDY) for _ in range(3)]
    for lease in leases:
        pool.release(lease, clean=True)
    assert [lease.conversation.closed for lease in leases] == [True, False, False]
    failed = pool.acquire([1], GREEDY)
    pool.release(failed, clean=False)
    assert failed.conversation.closed and len(pool.idle) == 2


def test_seeded_sampling_with_a_penalty_never_continues_a_conversation() -> None:
    """Draws are keyed by seed and position, so a seeded conversation continues like a fresh one; its repetition
    penalty would also see the earlier answers, which a fresh one's does not."""
    pool = ConversationPool(lambda params: FakeConversation(), size=2)
    penalised = SamplingParams(temperature=1.0, seed=3, repetition_penalty=1.3)
    lease = pool.acquire([1], penalised)
    pool.release(lease, clean=True)
    assert lease.conversation.closed and pool.idle == []
    seeded = SamplingParams(temperature=1.0, seed=3)
    lease = pool.acquire([1], seeded)
    pool.release(lease, clean=True)
    assert not lease.conversation.closed and len(pool.idle) == 1


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


def test_model_generation_defaults_are_read_only_where_present() -> None:
    assert model_defaults(SimpleNamespace()) == {}  # today's manifests: nothing, today's behaviour
    assert model_defaults(SimpleNamespace(generation=None)) == {}
    record = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": None, "max_length": 2048}
    assert model_defaults(SimpleNamespace(generation=record)) == {"temperature": 0.6, "top_p": 0.9}
    greedy = {"do_sample": False, "temperature": 0.6}  # transformers ignores temperature without do_sample
    assert model_defaults(SimpleNamespace(generation=greedy)) == {"temperature": 0.0}


def test_sampling_defaults_precedence() -> None:
    built_in = ClientSettings()
    assert sampling_defaults({}, built_in) == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    model = {"temperature": 0.2, "top_k": 40}
    assert sampling_defaults(model, built_in) == {"temperature": 0.2, "top_p": 1.0, "top_k": 40,
                                                  "repetition_penalty": 1.0}
    chosen = ClientSettings(top_k=5)  # set on purpose (flag or SPLIT_CLIENT_TOP_K): wins over the model
    assert sampling_defaults(model, chosen)["top_k"] == 5


class SlowEngine:
    """Generates one piece every 10 ms until its job's max_tokens or until cancelled; records what happened."""

    model_id, created, context = "fake", 0, 100_000
    tokenizer = SimpleNamespace(spec=SimpleNamespace(add_bos_token=False, bos_token=None),
                                render=lambda messages, add_generation_prompt: "rendered")

    def __init__(self) -> None:
        self.produced = 0
        self.stopped = threading.Event()

    def sampling(self, temperature, top_p, seed) -> SamplingParams:
        return SamplingParams()

    def job(self, text: str, max_tokens: int | None, params: SamplingParams, stops=(), param: str = "messages") -> Job:
        return Job((1,), max_tokens or 1000, params, stops)

    def run(self, job: Job, cancelled: threading.Event):
        try:
            for _ in range(job.max_tokens):
                if cancelled.is_set():
                    break
                time.sleep(0.01)
                self.produced += 1
                yield "x"
            yield Finished("length", Usage(1, self.produced, 0))
        finally:
            self.stopped.set()

    def close(self) -> None:
        pass


@pytest.mark.parametrize("stream", [False, True])
def test_generation_stops_when_the_client_goes_away(stream: bool) -> None:
    """1,000 tokens at 10 ms each would take 10 s; the client hangs up early and the engine stops soon after."""
    engine = SlowEngine()
    with serve_app(lambda port: create_app(GatewaySettings(port=port), lambda: engine), "/v1/models") as url:
        body = {"model": "fake", "prompt": "p", "max_tokens": 1000, "stream": stream}
        with httpx.Client(timeout=httpx.Timeout(30, read=0.5)) as client:
            if stream:  # read the first chunk, then hang up
                with client.stream("POST", f"{url}/v1/completions", json=body) as answer:
                    next(answer.iter_bytes())
            else:
                with pytest.raises(httpx.ReadTimeout):
                    client.post(f"{url}/v1/completions", json=body)
        assert engine.stopped.wait(5), f"still generating 5 s after the client left ({engine.produced} tokens)"
    assert engine.produced < 500
