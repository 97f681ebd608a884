"""The tail service over a real socket: parity, sessions, speculation headers, capacity, auth and operations.

Bad inputs of every kind are in tests/test_service_inputs.py; the engine's concurrency in test_batching.py and
test_scheduler.py; the process (drain, start-up refusals, connection deadlines) in test_service_process.py.
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import numpy as np
import pytest
from conftest import TINY, bundles
from servers import serve_app, service_thread

from client.remote import RemoteTail, ServiceError
from client.settings import ClientSettings
from services.app import create_app, load_service
from services.settings import ServerSettings
from splitcore import protocol, wire
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, LmHeadRunner, TailRunner
from splitcore.sampling import Sampler, SamplingParams

PROMPT = list(range(30, 50))


@pytest.fixture(scope="module")
def service(tiny):
    out, _, _ = tiny
    with service_thread(out / "server", max_body_bytes=64 * 1024, slot_length=256) as url:
        yield url


def generate(client_bundle, link, prompt=PROMPT, n=24) -> list[int]:
    generator = SplitGenerator(HeadRunner(client_bundle), link, prefill_chunk=8)
    return [c.token for c in generator.generate(prompt, n, stop_ids=())]


def remote(client_bundle, url: str, params: SamplingParams | None = None, **settings) -> RemoteTail:
    return RemoteTail.open(client_bundle, ClientSettings(server_url=url, **settings), params or SamplingParams())


def open_session(url: str, sha: str, **body) -> str:
    response = httpx.post(f"{url}{protocol.SESSIONS_PATH}", json={"manifest_sha256": sha, **body})
    assert response.status_code == 201, response.text
    return response.json()["session_id"]


def step(url: str, sid: str, hidden: np.ndarray | bytes, past: int | None, sha: str | None, **headers):
    h = {"Content-Type": wire.MEDIA_TYPE, **{f"X-{k.replace('_', '-')}": str(v) for k, v in headers.items()}}
    if past is not None:
        h[protocol.PAST_LENGTH_HEADER] = str(past)
    if sha is not None:
        h[protocol.MANIFEST_HEADER] = sha
    body = hidden if isinstance(hidden, bytes) else wire.encode(hidden)
    return httpx.post(f"{url}{protocol.steps_path(sid)}", content=body, headers=h)


def hidden_states(size: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, seq, size)).astype(np.float32)


def test_greedy_over_http_equals_in_process_split(tiny, service):
    _, client, server = tiny
    local = generate(client, LocalTail(TailRunner(server), SamplingParams()))
    link = remote(client, service)
    assert generate(client, link) == local
    assert len(set(local)) > 5
    # Per decode token: hidden_size x 2 bytes of fp16 plus framing up, a small JSON answer down.
    steps = link.traffic.steps
    hidden_bytes = client.manifest.model.hidden_size * 2
    assert link.traffic.received / steps < 1024
    assert (link.traffic.sent - len(PROMPT) * hidden_bytes) / steps < hidden_bytes + 1024
    link.close()


def test_greedy_over_http_equals_transformers_generate(tiny, service, torch_model):
    """The whole chain at once: service == in-process split (above) == transformers.generate (tests/test_parity.py)."""
    import torch

    _, client, _ = tiny
    loaded = torch_model(TINY)
    eos = client.manifest.tokenizer.eos_token_ids
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Split inference keeps text local."}], add_generation_prompt=True
    )["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=0)
    row = out[0, len(prompt):].tolist()
    expected = row[: next((i for i, t in enumerate(row) if t in eos), len(row))]
    link = remote(client, service)
    got = [c.token for c in SplitGenerator(HeadRunner(client), link, prefill_chunk=7).generate(prompt, 24, eos)]
    link.close()
    assert got == expected and len(set(got)) >= 8, (got, expected)


def test_seeded_sampling_is_deterministic_and_equals_the_client_sampler(tiny, service):
    _, client, server = tiny
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.3, seed=3)
    first, second = (generate(client, remote(client, service, params)) for _ in range(2))
    assert first == second
    assert first != generate(client, remote(client, service, SamplingParams(temperature=1.0, top_k=50, seed=4)))
    # The service's batch sampler is the client's per-row sampler: the same tokens as sampling in process.
    assert first == generate(client, LocalTail(TailRunner(server), params))


def test_logits_mode_returns_the_last_position_logits(tiny, service):
    _, client, server = tiny
    size = client.manifest.model.hidden_size
    hidden = hidden_states(size, 7)
    sid = open_session(service, client.manifest_sha256)
    response = step(service, sid, hidden, 0, client.manifest_sha256, Return="logits")
    assert response.status_code == 200 and response.headers["content-type"] == wire.MEDIA_TYPE
    assert response.headers[protocol.PAST_LENGTH_HEADER] == "7"
    tail = TailRunner(server)
    expected = tail.forward(hidden, tail.new_cache())[0, -1]
    np.testing.assert_allclose(wire.decode(response.content), expected, atol=1e-5, rtol=1e-5)


def test_sample_count_samples_each_of_the_last_positions_with_the_penalty_in_order(tiny, service):
    _, client, server = tiny
    size, sha = client.manifest.model.hidden_size, client.manifest_sha256
    hidden = hidden_states(size, 6, seed=5)
    tail = TailRunner(server)
    logits = tail.forward(hidden, tail.new_cache(), logits_to_keep=4)[0]
    params = SamplingParams(repetition_penalty=50.0)
    sampler, history, expected = Sampler(params), [], []
    for j, row in enumerate(logits):  # position j is penalised with the samples of positions before it
        choice = sampler.choose(row, history, top_logprobs=3 if j == 3 else 0)
        history.append(choice.token)
        expected.append(choice)
    sid = open_session(service, sha, sampling={"repetition_penalty": 50.0}, top_logprobs=3)
    response = step(service, sid, hidden, 0, sha, Sample_Count=4)
    assert response.status_code == 200, response.text
    result = protocol.StepResult.model_validate(response.json())
    assert result.tokens == [c.token for c in expected] and result.token == expected[-1].token
    assert result.logprobs == pytest.approx([c.logprob for c in expected], abs=1e-5)
    assert [t for t, _ in result.top_logprobs] == [t for t, _ in expected[-1].top] and len(result.top_logprobs) == 3
    assert result.length == 6
    too_many = step(service, sid, hidden_states(size, 2), 6, sha, Sample_Count=3)
    assert too_many.status_code == 422 and "X-Sample-Count 3 > the step's 2 positions" in too_many.json()["detail"]


def test_a_step_says_its_run_time_and_a_bundle_without_a_look_ahead_answers_no_guesses(tiny, service):
    _, client, _ = tiny
    size, sha = client.manifest.model.hidden_size, client.manifest_sha256
    sid = open_session(service, sha)
    response = step(service, sid, hidden_states(size, 3), 0, sha, Guess=1, Sample_Count=2)
    assert response.status_code == 200, response.text
    assert "guesses" not in response.json() and client.manifest.lookahead is None
    timing = response.headers[protocol.SERVER_TIMING_HEADER]
    assert timing.startswith("tail;dur=") and 0 < float(timing.split("=")[1]) < 60_000


def test_keep_length_rolls_back_the_latest_step_and_refuses_stale_ones(tiny, service):
    _, client, server = tiny
    size, sha = client.manifest.model.hidden_size, client.manifest_sha256
    prompt, drafts, other = hidden_states(size, 5, 1), hidden_states(size, 4, 2), hidden_states(size, 1, 3)
    sid = open_session(service, sha)
    assert step(service, sid, prompt, 0, sha).status_code == 200
    assert step(service, sid, drafts, 5, sha, Sample_Count=4).json()["length"] == 9
    # Keep 2 of the 4 draft positions, then continue with another position: as if only those had been sent.
    answer = step(service, sid, other, 7, sha, Return="logits", Keep_Length=7)
    assert answer.status_code == 200 and answer.headers[protocol.PAST_LENGTH_HEADER] == "8"
    tail = TailRunner(server)
    cache = tail.new_cache()
    tail.forward(prompt, cache)
    tail.forward(drafts[:, :2], cache)
    np.testing.assert_allclose(wire.decode(answer.content), tail.forward(other, cache)[0, -1], atol=1e-5, rtol=1e-5)
    # The floor is now 7 (the length before the latest step): keeping less, or more than held, is a 409.
    for keep, past in ((6, 6), (9, 9), (5, 5)):
        refused = step(service, sid, other, past, sha, Keep_Length=keep)
        assert refused.status_code == 409 and refused.json()["error"] == "PositionMismatch", refused.text
        assert f"cannot keep {keep} positions: the session holds 8 and its latest step started at 7" in refused.text
    # A replayed older step (its past length is stale) is refused as before.
    stale = step(service, sid, drafts, 5, sha)
    assert stale.status_code == 409 and "holds 8 positions but the step continues from 5" in stale.json()["detail"]
    # X-Past-Length must equal the kept length.
    mismatch = step(service, sid, other, 8, sha, Keep_Length=7)
    assert mismatch.status_code == 409 and "holds 7 positions but the step continues from 8" in mismatch.text
    assert step(service, sid, other, 8, sha, Keep_Length=8).status_code == 200


def test_a_rollback_drops_the_dropped_positions_samples_from_the_penalty(tiny, service):
    _, client, _ = tiny
    size, sha = client.manifest.model.hidden_size, client.manifest_sha256
    prompt, drafts = hidden_states(size, 4, 7), hidden_states(size, 3, 8)
    # The step after the rollback repeats the first draft position: the speculative run sampled exactly the token
    # this step picks, so a history that kept that sample would demote it (penalty 1e4) and pick another.
    nxt = drafts[:, :1]
    penalty = {"repetition_penalty": 1e4}

    def run(speculate: bool) -> int:
        sid = open_session(service, sha, sampling=penalty)
        step(service, sid, prompt, 0, sha, Sample="0")
        if speculate:  # samples at positions 4..6, all rolled back below
            assert len(step(service, sid, drafts, 4, sha, Sample_Count=3).json()["tokens"]) == 3
            return step(service, sid, nxt, 4, sha, Keep_Length=4).json()["token"]
        return step(service, sid, nxt, 4, sha).json()["token"]

    assert run(True) == run(False)


def test_private_output_returns_the_final_hidden_states_of_the_sampled_positions(export_bundle):
    out = export_bundle(TINY, 2, private_output=True)
    client, server = bundles(out)
    size, sha = client.manifest.model.hidden_size, client.manifest_sha256
    hidden = hidden_states(size, 5, 4)
    tail = TailRunner(server)
    expected = tail.forward(hidden, tail.new_cache(), logits_to_keep=3)
    with service_thread(out / "server", slot_length=64) as url:
        sid = open_session(url, sha)
        answer = step(url, sid, hidden, 0, sha, Sample_Count=3)
        assert answer.status_code == 200 and answer.headers["content-type"] == wire.MEDIA_TYPE
        frame = wire.decode(answer.content)
        assert frame.shape == (1, 3, size)
        np.testing.assert_allclose(frame, expected, atol=1e-5, rtol=1e-5)
        link = RemoteTail.open(client, ClientSettings(server_url=url), SamplingParams(), LmHeadRunner(client))
        local = LocalTail(TailRunner(server), SamplingParams(), LmHeadRunner(client))
        assert generate(client, link, n=8) == generate(client, local, n=8)


def test_unknown_and_closed_sessions_are_404(tiny, service):
    _, client, _ = tiny
    sha, size = client.manifest_sha256, client.manifest.model.hidden_size
    assert step(service, "no-such-session", hidden_states(size, 1), 0, sha).status_code == 404
    sid = open_session(service, sha)
    assert httpx.delete(f"{service}{protocol.SESSIONS_PATH}/{sid}").status_code == 204
    response = step(service, sid, hidden_states(size, 1), 0, sha)
    assert response.status_code == 404 and "never opened" in response.json()["detail"]
    assert httpx.delete(f"{service}{protocol.SESSIONS_PATH}/{sid}").status_code == 404


def test_session_longer_than_a_slot_is_refused(tiny, service):
    _, client, _ = tiny
    response = httpx.post(f"{service}{protocol.SESSIONS_PATH}",
                          json={"manifest_sha256": client.manifest_sha256, "max_length": 257})
    assert response.status_code == 422
    assert "max_length 257 > the 256 positions of this server's KV slots" in response.json()["detail"]
    opened = httpx.post(f"{service}{protocol.SESSIONS_PATH}", json={"manifest_sha256": client.manifest_sha256})
    assert opened.json()["max_length"] == 256  # the slot length, when the client does not say


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clocked(tiny):
    """A service of 2 slots whose sessions age by an injected clock: yields (url, clock)."""
    out, _, server = tiny
    clock = Clock()
    settings = ServerSettings(bundle=out / "server", max_sessions=2, slot_length=64, evict_idle_s=60,
                              session_ttl_s=600)
    with serve_app(lambda port: create_app(settings, server, load_service(settings, server, clock))) as url:
        yield url, clock


def test_full_server_evicts_the_oldest_idle_session_or_refuses_with_retry_after(tiny, clocked):
    _, client, _ = tiny
    url, clock = clocked
    sha, size = client.manifest_sha256, client.manifest.model.hidden_size
    oldest = open_session(url, sha)
    clock.now += 10
    newer = open_session(url, sha)
    clock.now += 40  # idle 50 s and 40 s: nobody may be evicted yet
    refused = httpx.post(f"{url}{protocol.SESSIONS_PATH}", json={"manifest_sha256": sha})
    assert refused.status_code == 503 and refused.json()["error"] == "CapacityExceeded"
    assert refused.headers["Retry-After"] == "10"  # the oldest becomes evictable in 10 s
    metrics = httpx.get(f"{url}/metrics").text
    assert "split_sessions_rejected_total 1.0" in metrics and "split_active_sessions 2.0" in metrics
    clock.now += 15  # 65 s and 55 s idle: the oldest goes, the newer stays
    third = open_session(url, sha)
    assert step(url, oldest, hidden_states(size, 1), 0, sha).status_code == 404
    assert step(url, newer, hidden_states(size, 1), 0, sha).status_code == 200
    assert step(url, third, hidden_states(size, 1), 0, sha).status_code == 200


def test_idle_sessions_expire(tiny, clocked):
    _, client, _ = tiny
    url, clock = clocked
    sid = open_session(url, client.manifest_sha256)
    clock.now += 601
    response = step(url, sid, hidden_states(client.manifest.model.hidden_size, 1), 0, client.manifest_sha256)
    assert response.status_code == 404 and "expired" in response.json()["detail"]


def test_a_dead_engine_fails_healthz_and_answers_waiting_steps_with_503(tiny):
    out, client, server = tiny
    sha, size = client.manifest_sha256, client.manifest.model.hidden_size
    settings = ServerSettings(bundle=out / "server", slot_length=64)
    service = load_service(settings, server)
    with serve_app(lambda port: create_app(settings, server, service)) as url:
        sid = open_session(url, sha)
        assert httpx.get(f"{url}/healthz").status_code == 200
        engine = service.engine
        engine.scheduler.plan = lambda: 1 / 0  # a bug in the loop: the next step kills it

        async def waiting_step() -> httpx.Response:
            async with httpx.AsyncClient(timeout=5) as http:
                return await http.post(f"{url}{protocol.steps_path(sid)}", content=wire.encode(hidden_states(size, 1)),
                                       headers={"Content-Type": wire.MEDIA_TYPE, protocol.PAST_LENGTH_HEADER: "0",
                                                protocol.MANIFEST_HEADER: sha})

        answer = asyncio.run(asyncio.wait_for(waiting_step(), 5))  # a hang would time out here
        assert answer.status_code == 503 and "ZeroDivisionError" in answer.json()["detail"]
        health = httpx.get(f"{url}/healthz")
        assert health.status_code == 503 and "engine-loop failed" in health.json()["detail"]
        assert httpx.get(f"{url}/readyz").status_code == 503
        later = step(url, sid, hidden_states(size, 1), 0, sha)
        assert later.status_code == 503 and later.headers["Retry-After"] == "1"


def test_token_auth_is_checked_before_the_body_is_read(tiny):
    out, client, _ = tiny
    with service_thread(out / "server", token="s3cret", slot_length=64) as url:
        body = {"manifest_sha256": client.manifest_sha256}
        missing = httpx.post(f"{url}{protocol.SESSIONS_PATH}", json=body)
        wrong = httpx.post(f"{url}{protocol.SESSIONS_PATH}", json=body, headers={"Authorization": "Bearer nope"})
        assert missing.status_code == wrong.status_code == 401
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert httpx.get(f"{url}/healthz").status_code == 200
        # A client that announces a huge body and sends none is answered at once: nothing is read before the token.
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 30000000\r\n\r\n")
            assert raw.recv(4096).startswith(b"HTTP/1.1 401")
        with pytest.raises(ServiceError, match="401"):
            remote(client, url, token="nope")
        assert generate(client, remote(client, url, token="s3cret"), n=3)


def test_operations_endpoints(tiny, service):
    _, client, server = tiny
    ready = httpx.get(f"{service}/readyz").json()
    assert ready["status"] == "ready" and ready["provider"] == "CPUExecutionProvider"
    assert ready["manifest_sha256"] == client.manifest_sha256 and ready["layers"] == [2, 4]
    # A slot holds what the manifest says a position costs, for slot_length positions (+1 scratch).
    manifest = server.manifest
    assert ready["kv_bytes_per_slot"] == manifest.kv_bytes_per_token(manifest.tail) * (256 + 1)
    metrics = httpx.get(f"{service}/metrics").text
    for name in ("split_active_sessions", "split_kv_reserved_bytes", "split_kv_slots",
                 "split_positions_processed_total", "split_step_seconds_bucket", "split_tokens_sampled_total",
                 "split_decode_batch_size_bucket"):
        assert name in metrics
    spec = httpx.get(f"{service}/openapi.json").json()
    paths = {"/v1/sessions", "/v1/sessions/{session_id}/steps", "/readyz", "/healthz", "/metrics"}
    assert paths <= set(spec["paths"])
    assert wire.MEDIA_TYPE in spec["paths"]["/v1/sessions/{session_id}/steps"]["post"]["requestBody"]["content"]


def test_a_conversation_asking_for_more_than_a_slot_gets_the_slot_when_it_can_work_with_less(tiny, service):
    """Chat and gateway clients ask for the model's whole context and state the least they need (min_length)."""
    _, client, _ = tiny
    url = f"{service}{protocol.SESSIONS_PATH}"
    body = {"manifest_sha256": client.manifest_sha256, "max_length": 10**6}
    assert httpx.post(url, json=body).status_code == 422  # without min_length the whole ask is required
    granted = httpx.post(url, json={**body, "min_length": 16})
    assert granted.status_code == 201, granted.text
    slot = granted.json()["max_length"]
    assert 16 <= slot < 10**6
    refused = httpx.post(url, json={**body, "min_length": slot + 1})
    assert refused.status_code == 422 and "KV slots" in refused.json()["detail"]
    assert httpx.post(url, json={**body, "max_length": 8, "min_length": 9}).status_code == 422
    httpx.delete(f"{url}/{granted.json()['session_id']}")


def test_a_chat_client_works_against_slots_shorter_than_the_models_context(tiny):
    """The defect this guards: chat reserved the model's context and a default service refused it outright."""
    out, client, _ = tiny
    with service_thread(out / "server", slot_length=64) as url:
        settings = ClientSettings(server_url=url, max_length=client.manifest.model.max_position_embeddings)
        link = RemoteTail.open(client, settings, SamplingParams(), min_length=1)
        try:
            assert link.max_length == 64
            assert len(generate(client, link, n=8)) == 8
        finally:
            link.close()
