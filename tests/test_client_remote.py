"""The HTTP tail link against a fake tail that misbehaves: every bad answer ends in one clear error, in bounded time.

No export needed: the link only reads the manifest's hash, vocabulary and hidden size, given here by a stand-in.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
from fake_tail import Answer, FakeTail, free_port, token_for, wait_for

from client.http import ServiceError, TailClient, TailUnreachable
from client.remote import RemoteTail
from client.settings import ClientSettings
from splitcore.errors import SplitError
from splitcore.sampling import SamplingParams

VOCAB, HIDDEN = 300, 8


def bundle(output_mode: str = "logits"):
    model = SimpleNamespace(vocab_size=VOCAB, hidden_size=HIDDEN, max_position_embeddings=64)
    return SimpleNamespace(manifest_sha256="ab" * 32, manifest=SimpleNamespace(output_mode=output_mode, model=model))


def hidden(seq: int = 1) -> np.ndarray:
    return np.ones((1, seq, HIDDEN), np.float32)


def link(tail: FakeTail, **settings) -> RemoteTail:
    return RemoteTail.open(bundle(), ClientSettings(server_url=tail.url, **settings), SamplingParams())


@pytest.fixture
def tail():
    with FakeTail() as fake:
        yield fake


def test_a_well_behaved_tail_gives_its_tokens_and_the_session_is_deleted(tail):
    remote = link(tail)
    assert remote.step(hidden(3), 0).token == token_for(3)
    assert remote.step(hidden(), 3).token == token_for(4)
    session = remote.session_id
    remote.close()
    assert tail.paths("DELETE") == [f"/v1/sessions/{session}"]
    assert remote.traffic.steps == 2 and remote.traffic.sent > 2 * HIDDEN * 2 and remote.traffic.received > 0


GARBAGE = [
    ("garbage", Answer(200, b"<html>oops</html>"), "malformed step result"),
    ("empty body", Answer(200, b""), "malformed step result"),
    ("empty object", Answer.json({}), "malformed step result"),
    ("missing length", Answer.json({"token": 5}), "length"),
    ("extra field", Answer.json({"token": 5, "length": 1, "surprise": True}), "surprise"),
    ("string token", Answer.json({"token": "5", "length": 1}), "token"),
    ("null token", Answer.json({"token": None, "length": 1}), "no token (null)"),
    ("token past vocab", Answer.json({"token": VOCAB, "length": 1}), f"token id {VOCAB}"),
    ("negative token", Answer.json({"token": -1, "length": 1}), "token id -1"),
    ("token past 2^63", Answer.json({"token": 2**63, "length": 1}), f"token id {2**63}"),
    ("top token past vocab", Answer.json({"token": 1, "top_logprobs": [[10**6, 0.0]], "length": 1}), "1000000"),
    ("wrong length", Answer.json({"token": 1, "length": 7}), "holds 7 positions"),
    ("guess past vocab", Answer.json({"token": 1, "length": 1, "guesses": [[VOCAB, 0.5]]}), f"guess ({VOCAB}, 0.5)"),
    ("negative guess", Answer.json({"token": 1, "length": 1, "guesses": [[-1, 0.5]]}), "guess (-1, 0.5)"),
    ("guess chance above 1", Answer.json({"token": 1, "length": 1, "guesses": [[2, 7.5]]}), "chance in [0, 1]"),
    ("guess chance not a number", Answer(200, b'{"token": 1, "length": 1, "guesses": [[2, NaN]]}',
                                         {"Content-Type": "application/json"}), "guesses"),
    ("more guesses than tokens", Answer.json({"token": 1, "length": 1, "guesses": [[2, 0.5], [3, 0.5]]}),
     "2 guesses for 1 tokens"),
    ("more drafts than asked for", Answer.json({"token": 1, "length": 1, "drafts": [2, 3, 4]}),
     "sent 3 drafts; the step asked for 2"),
    ("draft past vocab", Answer.json({"token": 1, "length": 1, "drafts": [VOCAB]}), f"the draft {VOCAB}"),
    ("negative draft", Answer.json({"token": 1, "length": 1, "drafts": [-1]}), "the draft -1"),
    ("draft not an id", Answer.json({"token": 1, "length": 1, "drafts": ["5"]}), "drafts"),
    ("drafts after no token", Answer.json({"token": 1, "length": 1, "drafts": [2], "drafts_after": 1}),
     "drafts after token 1 of a step that sampled 1"),
    ("redirect", Answer(302, headers={"Location": "http://elsewhere/"}), "redirected"),
    ("temporary redirect", Answer(307, headers={"Location": "/v2"}), "does not follow redirects"),
    ("huge declared body", Answer(200, b"{}", {"Content-Length": str(1 << 40)}), "declares"),
    ("endless body", Answer(200, endless=True), "longer than"),
    ("500 with newlines", Answer(500, b"boom\n\x1b[31mred\nTraceback"), "500 boom  [31mred Traceback"),
    ("unauthorized", Answer.json({"detail": "bad token"}, 401), "401 bad token"),
]


@pytest.mark.parametrize("answer, expected", [g[1:] for g in GARBAGE], ids=[g[0] for g in GARBAGE])
def test_a_bad_step_answer_is_one_clear_error_without_retries(tail, answer, expected):
    remote = link(tail)
    tail.step = lambda request, length: answer
    started = time.monotonic()
    with pytest.raises(ServiceError) as error:
        remote.step(hidden(), 0, draft=2)
    message = str(error.value)
    assert expected in message and "\n" not in message and "\x1b" not in message, message
    assert time.monotonic() - started < 5
    assert len(tail.paths("POST")) == 2, "a bad answer is not retried or replayed"
    remote.close()


@pytest.mark.parametrize("body", [b"garbage", b"{}", b'{"session_id": "../../admin", "max_length": 8, '
                                  b'"idle_ttl_s": 1.0, "provider": "x"}'])
def test_a_bad_open_answer_is_one_clear_error(tail, body):
    tail.opened = lambda request: Answer(201, body)
    with pytest.raises(ServiceError, match="session") as error:
        link(tail)
    assert "\n" not in str(error.value)


def test_a_tail_reserving_fewer_positions_than_asked_is_refused(tail):
    tail.opened = lambda request: Answer.json({"session_id": "s1", "max_length": 4, "idle_ttl_s": 1.0,
                                               "provider": "x"}, 201)
    with pytest.raises(ServiceError, match="reserved 4 positions; this conversation needs 32"):
        link(tail, max_length=32)


def test_a_slow_drip_ends_at_the_deadline_not_at_each_read_timeout(tail):
    """One byte every 0.1 s never trips a read timeout; the request deadline (and the retry budget) still hold."""
    remote = link(tail, timeout_s=1.0, retry_budget_s=1.0)
    tail.step = lambda request, length: Answer.json({"token": 1, "length": 1}, drip_s=0.1)
    started = time.monotonic()
    with pytest.raises(TailUnreachable, match="within the 1 s deadline"):
        remote.step(hidden(), 0)
    assert time.monotonic() - started < 1.0 + 1.0 + 1.0 + 0.5  # first try, the budget, one more try, slack
    remote.close()


def test_a_read_timeout_retries_the_same_session_then_replays_once_and_deletes_the_old_one(tail):
    remote = link(tail, timeout_s=0.5)
    remote.step(hidden(2), 0)
    first = remote.session_id
    slow = {"left": 1}

    def step(request, length):
        if slow["left"] and first in request.path:
            slow["left"] -= 1
            tail.sessions[first] += 1  # the step is applied, but its answer comes too late
            return Answer.json({"token": 1, "length": length + 1}, delay_s=1.0)
        return None

    tail.step = step
    assert remote.step(hidden(), 2).token == token_for(3)
    assert remote.replays == 1 and remote.session_id != first
    opens = tail.paths("POST").count("/v1/sessions")
    assert opens == 2, "one timeout, one replay: no storm"
    assert wait_for(lambda: f"/v1/sessions/{first}" in tail.paths("DELETE")), "the abandoned session is deleted"
    remote.close()


def test_a_dropped_answer_on_a_live_session_is_retried_without_replay(tail):
    remote = link(tail, timeout_s=0.5)
    remote.step(hidden(2), 0)
    late = {"left": 1}

    def step(request, length):
        if late["left"]:
            late["left"] -= 1
            return Answer.json({"token": 1, "length": length + 1}, delay_s=1.0)  # not applied: retry is safe
        return None

    tail.step = step
    assert remote.step(hidden(), 2).token == token_for(3)
    assert remote.replays == 0
    remote.close()


@pytest.mark.slow
def test_the_default_budget_outlasts_a_restart_after_kill_9():
    """The service is gone for 6 s (as after `kill -9` and a restart); the default settings carry the client over."""
    port = free_port()
    first = FakeTail(port).start()
    remote = RemoteTail.open(bundle(), ClientSettings(server_url=first.url), SamplingParams())
    remote.step(hidden(4), 0)
    first.stop()
    later = FakeTail(port)

    def restart():
        time.sleep(6)
        later.start()

    import threading

    threading.Thread(target=restart, daemon=True).start()
    started = time.monotonic()
    try:
        assert remote.step(hidden(), 4).token == token_for(5)
        assert 5.5 < time.monotonic() - started < 10.5
        assert remote.replays == 1 and later.sessions[remote.session_id] == 5
    finally:
        remote.close()
        later.stop()


def test_an_unreachable_tail_is_given_up_after_the_budget_with_jittered_backoff():
    url = f"http://127.0.0.1:{free_port()}"
    waits: list[float] = []
    remote = RemoteTail(bundle(), ClientSettings(server_url=url, retry_budget_s=2.0), SamplingParams(),
                        sleep=lambda s: (waits.append(s), time.sleep(s)))
    started = time.monotonic()
    with pytest.raises(TailUnreachable, match=f"tail service at {url} unusable after .* attempts over"):
        remote.with_retries(remote.open_session)
    assert time.monotonic() - started < 2.5
    assert len(waits) >= 3 and all(later > earlier for earlier, later in zip(waits, waits[1:]))
    jittered = {round(remote.backoff(3, None), 6) for _ in range(20)}
    assert len(jittered) > 10 and all(0.5 <= w <= 1.0 for w in jittered)
    remote.close()


def test_a_retry_count_still_caps_the_attempts():
    url = f"http://127.0.0.1:{free_port()}"
    remote = RemoteTail(bundle(), ClientSettings(server_url=url, retries=2), SamplingParams(), sleep=lambda s: None)
    with pytest.raises(TailUnreachable, match="unusable after 3 attempts"):
        remote.with_retries(remote.open_session)


def test_a_busy_tail_is_retried_after_its_retry_after(tail):
    busy = {"left": 1}

    def opened(request):
        if busy["left"]:
            busy["left"] -= 1
            return Answer.json({"detail": "full"}, 503, headers={"Retry-After": "1"})
        return None

    tail.opened = opened
    started = time.monotonic()
    link(tail).close()
    assert time.monotonic() - started >= 1.0


def test_conversations_share_one_connection_and_closing_does_not_wait_for_the_delete(tail):
    http = TailClient(tail.url)
    settings = ClientSettings(server_url=tail.url)
    tail_delete_delay = 1.0
    original = tail.route

    def route(request):
        answer = original(request)
        if request.method == "DELETE":
            answer.delay_s = tail_delete_delay
        return answer

    tail.route = route
    first = RemoteTail.open(bundle(), settings, SamplingParams(), http=http)
    first.step(hidden(), 0)
    started = time.monotonic()
    first.close()
    second = RemoteTail.open(bundle(), settings, SamplingParams(), http=http)
    second.step(hidden(), 0)
    assert time.monotonic() - started < tail_delete_delay / 2, "the next conversation waited for the DELETE"
    second.close()
    http.close()
    assert len(tail.paths("DELETE")) == 2
    assert tail.connections <= 2  # one for the conversations, one for the DELETE running beside them


def test_every_failure_is_a_split_error():
    assert issubclass(ServiceError, SplitError) and issubclass(TailUnreachable, ServiceError)


def test_a_bad_ca_file_is_one_line(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(SplitError, match="cannot use the CA certificate") as error:
        TailClient("https://127.0.0.1:1", bad)
    assert "\n" not in str(error.value)


def test_a_rollback_cuts_the_replay_frames_from_the_end_keeping_their_bytes():
    import numpy as np

    from client.remote import cut_frames
    from splitcore import wire

    chunks = [np.random.default_rng(i).standard_normal((1, n, 4)).astype(np.float16) for i, n in enumerate((5, 1, 4))]
    frames = [wire.encode(c) for c in chunks]
    first_two = frames[:2]
    cut_frames(frames, 10, 8)  # the last frame loses 2 of its 4 positions
    assert frames[:2] == first_two and wire.decode(frames[2]).tobytes() == chunks[2][:, :2].tobytes()
    cut_frames(frames, 8, 5)  # whole frames dropped, the first kept as it was sent
    assert frames == first_two[:1]
    cut_frames(frames, 5, 5)
    assert frames == first_two[:1]


def test_sampling_the_client_takes_is_sent_as_the_service_reads_it(tail):
    """The service reads the open body strictly (50.0 is not a top_k); SamplingParams takes it, so the client sends
    the integer."""
    bodies = []

    def opened(request):
        bodies.append(json.loads(request.body))
        return None

    tail.opened = opened
    RemoteTail.open(bundle(), ClientSettings(server_url=tail.url), SamplingParams(top_k=50.0)).close()
    assert bodies[0]["sampling"]["top_k"] == 50 and isinstance(bodies[0]["sampling"]["top_k"], int)


def test_the_tails_own_run_time_is_read_from_its_server_timing_header(tail):
    remote = link(tail)
    cases = [("tail;dur=5.5", 0.0055), ("tail;dur=12", 0.012), ("tail;dur=-1", None), ("tail;dur=1e3", None),
             ("db;dur=3", None), ("tail;dur=" + "9" * 40, None), ("", None)]
    for header, expected in cases:
        def step(request, length, header=header):
            tail.sessions[request.path.split("/")[3]] = length + 1
            return Answer.json({"token": 7, "length": length + 1}, headers={"Server-Timing": header} if header else {})

        tail.step = step
        remote.step(hidden(), remote.length)
        assert remote.compute_seconds == expected, header
    remote.close()
