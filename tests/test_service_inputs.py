"""Bad input over a real socket, on both routes: always a clear 4xx JSON error, never a 500, a hang, a dropped
connection or a harmed bystander."""

from __future__ import annotations

import json
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import TINY, bundles
from servers import serve_app, service_thread
from test_service import generate, hidden_states, open_session, remote, step

from services.app import create_app, load_service
from services.settings import ServerSettings
from splitcore import protocol, wire
from splitcore.generation import LocalTail
from splitcore.graphs import TailRunner
from splitcore.sampling import SamplingParams


@pytest.fixture(scope="module")
def service(tiny):
    out, _, _ = tiny
    with service_thread(out / "server", max_body_bytes=64 * 1024, max_open_bytes=4096, max_generated=100,
                        slot_length=256) as url:
        yield url


def frame(size: int, seq: int = 1, dtype=np.float16, fill: float | None = None) -> bytes:
    data = np.random.default_rng(0).standard_normal((1, seq, size)).astype(dtype)
    if fill is not None:
        data[0, 0, 0] = fill
    return wire.encode(data)


def overflowing(rank: int = 4) -> bytes:
    """A frame whose dims multiply past 2**64 (int64 wraps around), with a few bytes of data."""
    return wire.MAGIC + struct.pack("<BBH", 1, rank, 0) + struct.pack(f"<{rank}I", *[2**32 - 1] * rank) + b"\0" * 64


def bad_steps(size: int, sha: str):
    good = frame(size)
    return {
        "garbage body": (b"\x00garbage" * 5, 0, sha, {}, 422, "magic"),
        "empty body": (b"", 0, sha, {}, 422, "shorter"),
        "truncated frame": (good[:-10], 0, sha, {}, 422, "data bytes"),
        "dims overflow int64": (overflowing(), 0, sha, {}, 422, "data bytes"),
        "unknown dtype code": (b"SPT1" + struct.pack("<BBH", 9, 3, 0) + good[8:], 0, sha, {}, 422, "dtype code"),
        "wrong dtype": (wire.encode(np.zeros((1, 1, size), np.int64)), 0, sha, {}, 422, "float16 or float32"),
        "wrong rank": (wire.encode(np.zeros((1, size), np.float16)), 0, sha, {}, 422, f"[1, seq >= 1, {size}]"),
        "wrong hidden size": (frame(size + 1), 0, sha, {}, 422, f"[1, seq >= 1, {size}]"),
        "batch of two": (wire.encode(np.zeros((2, 1, size), np.float16)), 0, sha, {}, 422, "[1, seq"),
        "zero positions": (wire.encode(np.zeros((1, 0, size), np.float16)), 0, sha, {}, 422, "[1, seq >= 1"),
        "NaN": (frame(size, fill=np.nan), 0, sha, {}, 422, "NaN"),
        "infinity": (frame(size, fill=np.inf), 0, sha, {}, 422, "infinity"),
        "oversized body": (frame(size, seq=300, dtype=np.float32), 0, sha, {}, 413, "limit"),
        "past max length": (frame(size, seq=10), 0, sha, {}, 422, "prefix 0 + current 10 > 8"),
        "wrong position": (good, 3, sha, {}, 409, "holds 0 positions but the step continues from 3"),
        "missing position": (good, None, sha, {}, 422, "x-past-length"),
        "huge position": (good, 10**30, sha, {}, 422, "x-past-length"),
        "negative position": (good, -1, sha, {}, 422, "x-past-length"),
        "position not a number": (good, "seven", sha, {}, 422, "x-past-length"),
        "position 0.0": (good, "0.0", sha, {}, 422, "decimal digits"),  # int() or pydantic's lax int took these
        "position 0_0": (good, "0_0", sha, {}, 422, "decimal digits"),
        "keep +0": (good, 0, sha, {"Keep-Length": "+0"}, 422, "decimal digits"),
        "wrong manifest": (good, 0, "0" * 64, {}, 409, "same export"),
        "missing manifest": (good, 0, None, {}, 409, "carries no X-Manifest-Sha256 header"),
        "keep past the length": (good, 0, sha, {"Keep-Length": 1}, 409, "cannot keep 1 positions"),
        "negative keep": (good, 0, sha, {"Keep-Length": -1}, 422, "x-keep-length"),
        "sample count 0": (good, 0, sha, {"Sample-Count": 0}, 422, "x-sample-count"),
        "sample count huge": (good, 0, sha, {"Sample-Count": 2**70}, 422, "x-sample-count"),
        "sample count > seq": (good, 0, sha, {"Sample-Count": 2}, 422, "X-Sample-Count 2 > the step's 1"),
        "sample 2": (good, 0, sha, {"Sample": 2}, 422, "x-sample"),
        "guess 2": (good, 0, sha, {"Guess": 2}, 422, "x-guess"),
        "guess yes": (good, 0, sha, {"Guess": "yes"}, 422, "x-guess"),
        "draft 17": (good, 0, sha, {"Draft": 17}, 422, "x-draft"),
        "draft -1": (good, 0, sha, {"Draft": -1}, 422, "x-draft"),
        "drafted huge": (good, 0, sha, {"Drafted": 2**70}, 422, "x-drafted"),
        "drafted without its positions": (good, 0, sha, {"Drafted": 1}, 422, "holding 1 of the tail's drafts has 2"),
        "unknown return": (good, 0, sha, {"Return": "everything"}, 422, "x-return"),
    }


def send(url: str, sid: str, body: bytes, past, sha, headers: dict) -> httpx.Response:
    h = {"Content-Type": wire.MEDIA_TYPE, **{f"X-{k}": str(v) for k, v in headers.items()}}
    if past is not None:
        h[protocol.PAST_LENGTH_HEADER] = str(past)
    if sha is not None:
        h[protocol.MANIFEST_HEADER] = sha
    return httpx.post(f"{url}{protocol.steps_path(sid)}", content=body, headers=h)


def assert_clear_4xx(response: httpx.Response, status: int | None = None) -> None:
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    assert status is None or response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"], body


@pytest.mark.parametrize("case", list(bad_steps(1, "").keys()))
def test_bad_step_is_a_clear_4xx_and_changes_nothing(tiny, service, case):
    _, client, _ = tiny
    sha, size = client.manifest_sha256, client.manifest.model.hidden_size
    sid = open_session(service, sha, max_length=8)
    body, past, manifest, headers, status, message = bad_steps(size, sha)[case]
    response = send(service, sid, body, past, manifest, headers)
    assert_clear_4xx(response, status)
    assert message in response.json()["detail"]
    # The failed step changed nothing: the session still accepts position 0.
    assert step(service, sid, hidden_states(size, 1), 0, sha).status_code == 200


def temperature(sha: str, raw: str) -> str:
    return f'{{"manifest_sha256": "{sha}", "sampling": {{"temperature": {raw}}}}}'


def bad_opens(sha: str):
    return {
        "max_length 0": ({"max_length": 0}, 422, "max_length"),
        "max_length huge": ({"max_length": 10**30}, 422, "max_length"),
        "max_length a string": ({"max_length": "long"}, 422, "max_length"),
        "unknown field": ({"bogus": 1}, 422, "bogus"),
        "top_p 2": ({"sampling": {"top_p": 2}}, 422, "top_p"),
        "sampling a list": ({"sampling": [1, 2]}, 422, "sampling"),
        "JSON Infinity": (temperature(sha, "Infinity"), 422, "temperature"),
        "JSON NaN": (temperature(sha, "NaN"), 422, "temperature"),
        "temperature 1e400": (temperature(sha, "1e400"), 422, "temperature"),
        "negative seed": ({"sampling": {"seed": -1}}, 422, "seed"),
        "seed 2**70": ({"sampling": {"seed": 2**70}}, 422, "seed"),
        "top_k 10**30": ({"sampling": {"top_k": 10**30}}, 422, "top_k"),
        "repetition_penalty 1e300": ({"sampling": {"repetition_penalty": 1e300}}, 422, "repetition_penalty"),
        "top_logprobs 21": ({"top_logprobs": 21}, 422, "top_logprobs"),
        "generated id 2**63": ({"generated": [5, 2**63]}, 422, "generated"),
        "generated id -1": ({"generated": [-1]}, 422, "token id -1"),
        "generated id = vocab": ({"generated": [512]}, 422, "vocabulary is 0..511"),
        "generated too long": ({"generated": [1] * 101}, 422, "at most 100"),
        "generated strings": ({"generated": ["a"]}, 422, "generated"),
        "wrong manifest": ({"manifest_sha256": "f" * 64}, 409, "same export"),
        "not JSON": ("{not json", 422, "JSON"),
        "max_length true": ({"max_length": True}, 422, "max_length"),  # strict: true is not 1
        "max_length 8.0": ({"max_length": 8.0}, 422, "max_length"),
        "nested past the JSON parser": ("[" * 3000, 422, "not readable JSON"),
        "invalid UTF-8": (b'{"manifest_sha256": "\xff"}', 422, "not readable JSON"),
        "empty body": ("", 422, "body"),
        "body over the limit": ({"generated": [1] * 2000}, 413, "limit of 4096"),
    }


@pytest.mark.parametrize("case", list(bad_opens("").keys()))
def test_bad_open_is_a_clear_4xx(tiny, service, case):
    _, client, _ = tiny
    sha = client.manifest_sha256
    body, status, message = bad_opens(sha)[case]
    content = body if isinstance(body, (str, bytes)) else json.dumps({"manifest_sha256": sha, **body})
    response = httpx.post(f"{service}{protocol.SESSIONS_PATH}", content=content,
                          headers={"Content-Type": "application/json"})
    assert_clear_4xx(response, status)
    assert message in response.json()["detail"], response.json()


def test_a_path_with_a_trailing_slash_is_a_json_404_not_an_empty_redirect(tiny, service):
    _, client, _ = tiny
    response = httpx.post(f"{service}{protocol.SESSIONS_PATH}/", json={"manifest_sha256": client.manifest_sha256})
    assert_clear_4xx(response, 404)


def test_extreme_but_valid_sampling_values_work(tiny, service):
    _, client, server = tiny
    sha, size = client.manifest_sha256, client.manifest.model.hidden_size
    hidden = hidden_states(size, 3)
    tail = TailRunner(server)
    best = int(tail.forward(hidden, tail.new_cache())[0, -1].argmax())
    # A temperature of 1e-308 is greedy in effect, not a division overflow.
    sid = open_session(service, sha, sampling={"temperature": 1e-308, "seed": 2**63 - 1, "top_k": 10**18})
    answer = step(service, sid, hidden, 0, sha)
    assert answer.status_code == 200 and answer.json()["token"] == best
    # top_logprobs beyond top_k: the tokens top-k removed are left out, never answered as null.
    sid = open_session(service, sha, sampling={"temperature": 1.0, "top_k": 1, "seed": 1}, top_logprobs=5)
    result = step(service, sid, hidden, 0, sha).json()
    assert result["token"] == best and result["top_logprobs"] == [[best, 0.0]] and result["logprob"] == 0.0
    assert "null" not in json.dumps(result)


def test_fp16_tail_refuses_values_beyond_the_fp16_range(export_bundle):
    out = export_bundle(TINY, 2, weights="fp16")
    client, _ = bundles(out)
    sha, size = client.manifest_sha256, client.manifest.model.hidden_size
    with service_thread(out / "server", slot_length=64) as url:
        sid = open_session(url, sha)
        for value in (70000.0, -1e30):
            refused = send(url, sid, frame(size, dtype=np.float32, fill=value), 0, sha, {})
            assert_clear_4xx(refused, 422)
            assert "beyond float16" in refused.json()["detail"]
        link = remote(client, url)
        assert generate(client, link, n=6) == generate(client, LocalTail(TailRunner(bundles(out)[1]),
                                                                         SamplingParams()), n=6)


def hostile_requests(rng: np.random.Generator, url: str, sid: str, sha: str, size: int) -> list:
    """Random bad requests over both routes: random bytes, truncated and overflowing frames, huge numbers, wrong
    types, to a fresh victim session (never the bystander's)."""
    good = frame(size, seq=2)
    choice = int(rng.integers(8))
    if choice == 0:
        body = rng.bytes(int(rng.integers(0, 300)))
        return ["step", body, 0, {}]
    if choice == 1:
        return ["step", good[: int(rng.integers(0, len(good) - 1))], 0, {}]
    if choice == 2:
        return ["step", overflowing(int(rng.integers(2, 8))), 0, {}]
    if choice == 3:
        values = [10 ** int(rng.integers(19, 40)), -int(rng.integers(1, 10**6)), "x", "1e9", "", " 5"]
        value = values[int(rng.integers(len(values)))]
        header = ["Past-Length", "Keep-Length", "Sample-Count", "Sample"][int(rng.integers(4))]
        return ["step", good, 0, {header: value}]
    if choice == 4:
        data = np.frombuffer(rng.bytes(2 * size), np.float16).reshape(1, 1, size)  # NaN and inf among them, often
        return ["step", wire.encode(data), 0, {}]
    field = ["max_length", "top_logprobs", "generated", "sampling", "manifest_sha256"][int(rng.integers(5))]
    value = [10**int(rng.integers(19, 400)), -1, "x", [2**64], {"a": 1}, None, 1.5, [True]][int(rng.integers(8))]
    if choice == 5:
        return ["open", json.dumps({"manifest_sha256": sha, field: value})]
    if choice == 6:
        inner = ["temperature", "top_p", "top_k", "repetition_penalty", "seed"][int(rng.integers(5))]
        numbers = ["-1", "1e400", "Infinity", "-Infinity", "NaN", "1e-400", str(2**64), '"a"', "[]"]
        number = numbers[int(rng.integers(len(numbers)))]
        return ["open", f'{{"manifest_sha256": "{sha}", "sampling": {{"{inner}": {number}}}}}']
    return ["open", rng.bytes(int(rng.integers(0, 200)))]


def fire(url: str, sha: str, size: int, request: list) -> httpx.Response:
    if request[0] == "open":
        return httpx.post(f"{url}{protocol.SESSIONS_PATH}", content=request[1],
                          headers={"Content-Type": "application/json"})
    victim = open_session(url, sha)
    try:
        return send(url, victim, request[1], request[2], sha, request[3])
    finally:
        httpx.delete(f"{url}{protocol.SESSIONS_PATH}/{victim}")


@pytest.mark.slow
def test_random_bad_input_is_always_4xx_and_a_bystander_gets_its_solo_tokens(tiny, service):
    _, client, server = tiny
    sha, size = client.manifest_sha256, client.manifest.model.hidden_size
    solo = generate(client, LocalTail(TailRunner(server), SamplingParams()), n=16)
    rng = np.random.default_rng(2024)
    answers: list[tuple[list, httpx.Response]] = []

    class Hostile:
        """The bystander's link: before each of its steps, a burst of bad requests from other clients at once."""

        def __init__(self, link) -> None:
            self.link = link

        def step(self, hidden, past, sample=True, guess=False, draft=0):
            burst = [hostile_requests(rng, service, "", sha, size) for _ in range(4)]
            with ThreadPoolExecutor(4) as pool:
                answers.extend(zip(burst, pool.map(lambda r: fire(service, sha, size, r), burst)))
            return self.link.step(hidden, past, sample, guess, draft)

        def close(self) -> None:
            self.link.close()

    link = Hostile(remote(client, service))
    assert generate(client, link, n=16) == solo
    link.close()
    assert len(answers) > 50
    for request, response in answers:
        if request[0] == "step" and response.status_code == 200:
            continue  # random bytes can make a valid frame of finite fp16 values: a fine step
        assert_clear_4xx(response)
    assert "split_errors_total{code=\"500\"}" not in httpx.get(f"{service}/metrics").text


def roundtrip(raw: socket.socket, request: bytes) -> bytes:
    raw.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += raw.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
        b"content-length:")), 0)
    while len(rest) < length:
        rest += raw.recv(65536)
    return head


def test_an_error_answer_keeps_the_connection_for_the_clients_delete(tiny):
    """After a 4xx or even a 500 the connection stays open, so the DELETE a client sends next is not lost."""
    out, client, server = tiny
    sha, size = client.manifest_sha256, client.manifest.model.hidden_size
    settings = ServerSettings(bundle=out / "server", slot_length=64)
    service = load_service(settings, server)
    with serve_app(lambda port: create_app(settings, server, service)) as url:
        port = int(url.rsplit(":", 1)[1])
        ids = [open_session(url, sha) for _ in range(2)]

        def post_step(sid: str, body: bytes) -> bytes:
            return (f"POST {protocol.steps_path(sid)} HTTP/1.1\r\nHost: x\r\nContent-Type: {wire.MEDIA_TYPE}\r\n"
                    f"{protocol.MANIFEST_HEADER}: {sha}\r\n{protocol.PAST_LENGTH_HEADER}: 0\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode() + body

        def delete(sid: str) -> bytes:
            return f"DELETE {protocol.SESSIONS_PATH}/{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode()

        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            assert roundtrip(raw, post_step(ids[0], b"garbage")).startswith(b"HTTP/1.1 422")
            assert roundtrip(raw, delete(ids[0])).startswith(b"HTTP/1.1 204")
        service.tail.decode_rows = lambda *args: 1 / 0  # an unexpected failure of a run: a 500 ...
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            assert roundtrip(raw, post_step(ids[1], frame(size))).startswith(b"HTTP/1.1 500")
            assert roundtrip(raw, delete(ids[1])).startswith(b"HTTP/1.1 204")  # ... and the DELETE still arrives


def test_an_announced_oversized_body_is_refused_before_it_is_read(service):
    """30 MB announced on either route: 413 at once, from the headers alone (nothing of the body is sent here)."""
    port = int(service.rsplit(":", 1)[1])
    for path in (protocol.SESSIONS_PATH, protocol.steps_path("any")):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        f"Content-Length: 30000000\r\n\r\n".encode())
            answer = raw.recv(4096)
            assert answer.startswith(b"HTTP/1.1 413") and b"exceeds the limit" in answer, answer
