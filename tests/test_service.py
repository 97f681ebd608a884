"""The tail service over a real socket: parity, bad inputs, sessions, capacity, auth and operations."""

from __future__ import annotations

import struct
import time

import httpx
import numpy as np
import pytest
from conftest import TINY, bundles
from servers import service_thread

from client.remote import RemoteTail, ServiceError
from client.settings import ClientSettings
from splitcore import protocol, wire
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.sampling import SamplingParams

PROMPT = list(range(30, 50))


@pytest.fixture(scope="module")
def tiny(export_bundle):
    out = export_bundle(TINY, 2)
    client, server = bundles(out)
    return out, client, server


@pytest.fixture(scope="module")
def service(tiny):
    out, _, _ = tiny
    with service_thread(out / "server", max_body_bytes=64 * 1024, default_max_length=256) as url:
        yield url


def generate(client_bundle, link, prompt=PROMPT, n=24) -> list[int]:
    generator = SplitGenerator(HeadRunner(client_bundle), link, prefill_chunk=8)
    return [c.token for c in generator.generate(prompt, n, stop_ids=())]


def remote(client_bundle, url: str, params: SamplingParams | None = None, **settings) -> RemoteTail:
    return RemoteTail.open(client_bundle, ClientSettings(server_url=url, **settings), params or SamplingParams())


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


def test_seeded_sampling_is_deterministic_over_http(tiny, service):
    _, client, _ = tiny
    params = SamplingParams(temperature=1.0, top_k=50, seed=3)
    first, second = (generate(client, remote(client, service, params)) for _ in range(2))
    assert first == second
    assert first != generate(client, remote(client, service, SamplingParams(temperature=1.0, top_k=50, seed=4)))


def test_logits_mode_returns_the_last_position_logits(tiny, service):
    _, client, server = tiny
    head = HeadRunner(client)
    ids = np.asarray([PROMPT], dtype=np.int64)
    hidden = head.forward(ids, np.ones_like(ids), np.arange(ids.shape[1])[None, :], head.new_cache())
    sid = open_session(service, client.manifest_sha256)
    response = step(service, sid, wire.encode(hidden.astype(np.float32)), 0, client.manifest_sha256,
                    {protocol.RETURN_HEADER: "logits"})
    assert response.status_code == 200 and response.headers["content-type"] == wire.MEDIA_TYPE
    logits = wire.decode(response.content)
    tail = TailRunner(server)
    expected = tail.forward(hidden, np.ones_like(ids), np.arange(ids.shape[1])[None, :], tail.new_cache())[0, -1]
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def open_session(url: str, sha: str, **body) -> str:
    response = httpx.post(f"{url}{protocol.SESSIONS_PATH}", json={"manifest_sha256": sha, **body})
    assert response.status_code == 201, response.text
    return response.json()["session_id"]


def step(url: str, sid: str, body: bytes, past: int | None, sha: str | None, headers: dict | None = None):
    h = {"Content-Type": wire.MEDIA_TYPE, **(headers or {})}
    if past is not None:
        h[protocol.PAST_LENGTH_HEADER] = str(past)
    if sha is not None:
        h[protocol.MANIFEST_HEADER] = sha
    return httpx.post(f"{url}{protocol.steps_path(sid)}", content=body, headers=h)


def hidden_frame(size: int, seq: int = 1, dtype=np.float16, fill: float | None = None) -> bytes:
    data = np.random.default_rng(0).standard_normal((1, seq, size)).astype(dtype)
    if fill is not None:
        data[0, 0, 0] = fill
    return wire.encode(data)


def bad_inputs(size: int, sha: str):
    good = hidden_frame(size)
    return {
        "garbage body": (b"\x00garbage" * 5, 0, sha, 422, "magic"),
        "empty body": (b"", 0, sha, 422, "shorter"),
        "truncated frame": (good[:-10], 0, sha, 422, "data bytes"),
        "unknown dtype code": (b"SPT1" + struct.pack("<BBH", 9, 3, 0) + good[8:], 0, sha, 422, "dtype code"),
        "wrong dtype": (wire.encode(np.zeros((1, 1, size), np.int64)), 0, sha, 422, "float16 or float32"),
        "wrong rank": (wire.encode(np.zeros((1, size), np.float16)), 0, sha, 422, f"[1, seq >= 1, {size}]"),
        "wrong hidden size": (hidden_frame(size + 1), 0, sha, 422, f"[1, seq >= 1, {size}]"),
        "batch of two": (wire.encode(np.zeros((2, 1, size), np.float16)), 0, sha, 422, "[1, seq"),
        "NaN": (hidden_frame(size, fill=np.nan), 0, sha, 422, "NaN"),
        "infinity": (hidden_frame(size, fill=np.inf), 0, sha, 422, "infinity"),
        "oversized body": (hidden_frame(size, seq=300, dtype=np.float32), 0, sha, 413, "limit"),
        "past max length": (hidden_frame(size, seq=10), 0, sha, 422, "prefix 0 + current 10 > 8"),
        "wrong position": (good, 3, sha, 409, "holds 0 positions but the step continues from 3"),
        "missing position": (good, None, sha, 422, "x-past-length"),
        "wrong manifest": (good, 0, "0" * 64, 409, "same export"),
        "missing manifest": (good, 0, None, 409, "exported for manifest"),
    }


@pytest.mark.parametrize("case", list(bad_inputs(1, "").keys()))
def test_bad_step_is_a_clear_4xx_and_harms_no_other_session(tiny, service, case):
    _, client, _ = tiny
    sha, size = client.manifest_sha256, client.manifest.model.hidden_size
    bystander = remote(client, service)
    before = generate(client, bystander, n=4)

    sid = open_session(service, sha, max_length=8)
    body, past, manifest, status, message = bad_inputs(size, sha)[case]
    response = step(service, sid, body, past, manifest)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["detail"]
    # The failed step changed nothing: the session still accepts position 0, the bystander still works.
    assert step(service, sid, hidden_frame(size), 0, sha).status_code == 200
    assert len(before) == 4 and bystander.step(np.zeros((1, 1, size), np.float32), bystander.length) is not None
    bystander.close()


def test_unknown_and_closed_sessions_are_404(tiny, service):
    _, client, _ = tiny
    sha, size = client.manifest_sha256, client.manifest.model.hidden_size
    assert step(service, "no-such-session", hidden_frame(size), 0, sha).status_code == 404
    sid = open_session(service, sha)
    assert httpx.delete(f"{service}{protocol.SESSIONS_PATH}/{sid}").status_code == 204
    response = step(service, sid, hidden_frame(size), 0, sha)
    assert response.status_code == 404 and "never opened" in response.json()["detail"]
    assert httpx.delete(f"{service}{protocol.SESSIONS_PATH}/{sid}").status_code == 404


@pytest.mark.parametrize(
    ("body", "fragment"),
    [({"manifest_sha256": "x", "max_length": 0}, "max_length"), ({"manifest_sha256": "x", "bogus": 1}, "bogus"),
     ({"manifest_sha256": "x", "sampling": {"top_p": 2}}, "top_p")],
)
def test_bad_session_requests_are_422(service, body, fragment):
    response = httpx.post(f"{service}{protocol.SESSIONS_PATH}", json=body)
    assert response.status_code == 422 and fragment in response.json()["detail"]


def test_malformed_json_is_422(service):
    response = httpx.post(f"{service}{protocol.SESSIONS_PATH}", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["error"] == "InvalidRequest"


def test_session_longer_than_the_model_is_refused(tiny, service):
    _, client, _ = tiny
    too_long = client.manifest.model.max_position_embeddings + 1
    response = httpx.post(f"{service}{protocol.SESSIONS_PATH}",
                          json={"manifest_sha256": client.manifest_sha256, "max_length": too_long})
    assert response.status_code == 422 and f"max_length {too_long}" in response.json()["detail"]


def test_full_server_refuses_new_sessions_and_keeps_old_ones(tiny):
    out, client, _ = tiny
    with service_thread(out / "server", max_sessions=2, evict_idle_s=3600) as url:
        first, second = remote(client, url), remote(client, url)
        response = httpx.post(f"{url}{protocol.SESSIONS_PATH}", json={"manifest_sha256": client.manifest_sha256})
        assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
        assert "server full" in response.json()["detail"]
        assert generate(client, first, n=3) and generate(client, second, n=3)
        metrics = httpx.get(f"{url}/metrics").text
        assert "split_sessions_rejected_total 1.0" in metrics and "split_active_sessions 2.0" in metrics


def test_idle_sessions_expire(tiny):
    out, client, _ = tiny
    with service_thread(out / "server", session_ttl_s=0.3) as url:
        sid = open_session(url, client.manifest_sha256)
        time.sleep(0.5)
        response = step(url, sid, hidden_frame(client.manifest.model.hidden_size), 0, client.manifest_sha256)
        assert response.status_code == 404 and "expired" in response.json()["detail"]


def test_token_auth(tiny):
    out, client, _ = tiny
    with service_thread(out / "server", token="s3cret") as url:
        body = {"manifest_sha256": client.manifest_sha256}
        missing = httpx.post(f"{url}{protocol.SESSIONS_PATH}", json=body)
        wrong = httpx.post(f"{url}{protocol.SESSIONS_PATH}", json=body, headers={"Authorization": "Bearer nope"})
        assert missing.status_code == wrong.status_code == 401
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert httpx.get(f"{url}/healthz").status_code == 200
        with pytest.raises(ServiceError, match="401"):
            remote(client, url, token="nope")
        assert generate(client, remote(client, url, token="s3cret"), n=3)


def test_operations_endpoints(tiny, service):
    _, client, _ = tiny
    ready = httpx.get(f"{service}/readyz").json()
    assert ready["status"] == "ready" and ready["provider"] == "CPUExecutionProvider"
    assert ready["manifest_sha256"] == client.manifest_sha256 and ready["layers"] == [2, 4]
    metrics = httpx.get(f"{service}/metrics").text
    for name in ("split_active_sessions", "split_kv_reserved_bytes", "split_positions_processed_total",
                 "split_step_seconds_bucket", "split_tokens_sampled_total"):
        assert name in metrics
    spec = httpx.get(f"{service}/openapi.json").json()
    paths = {"/v1/sessions", "/v1/sessions/{session_id}/steps", "/readyz", "/healthz", "/metrics"}
    assert paths <= set(spec["paths"])
    assert wire.MEDIA_TYPE in spec["paths"]["/v1/sessions/{session_id}/steps"]["post"]["requestBody"]["content"]
