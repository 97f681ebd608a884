"""The OpenAI-compatible gateway, driven by the official `openai` package over real sockets.

A real tail service (uvicorn on loopback) serves the random:tiny tail; the gateway (uvicorn on another port) holds
the tokenizer and head and forwards hidden states to it, as `python -m client serve` does.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from client.cli import Split
from client.gateway.app import create_app as create_gateway
from client.gateway.engine import Engine
from client.gateway.settings import GatewaySettings
from client.settings import ClientSettings
from client.tokenizer import ChatTokenizer
from services.app import create_app as create_tail_service
from services.settings import ServerSettings
from splitcore.manifest import load_bundle

ROOT = Path(__file__).resolve().parents[1]
MODEL = "random:tiny"
PROMPT = "Name three colours."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(make_app: Callable[[int], FastAPI], ready_path: str, headers: dict | None = None) -> Iterator[str]:
    """uvicorn on a free loopback port in a thread; yields the base URL once ``ready_path`` answers 200."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(port), host="127.0.0.1", port=port, log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + ready_path, headers=headers, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and thread.is_alive(), f"server on {url} did not start"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def gateway_app(out: Path, server_url: str, local: bool = False, **gateway: object) -> Callable[[int], FastAPI]:
    def make(port: int) -> FastAPI:
        client = ClientSettings(bundle=out, server_url=server_url, retries=0, timeout_s=30)
        return create_gateway(GatewaySettings(port=port, **gateway), lambda: Engine(Split(client, local), 4))

    return make


@pytest.fixture(scope="session")
def out(export_bundle) -> Path:
    return export_bundle(MODEL, 2, "fp32")


@pytest.fixture(scope="session")
def tail_url(out: Path) -> Iterator[str]:
    # The service reserves 2048 positions for clients that do not say (as `python -m client` does not); the tiny
    # model has fewer, and the service refuses to reserve more than the model has.
    positions = load_bundle(out / "server", "server").manifest.model.max_position_embeddings
    settings = ServerSettings(bundle=out / "server", default_max_length=positions)
    with serve(lambda port: create_tail_service(settings.model_copy(update={"port": port})), "/readyz") as url:
        yield url


@pytest.fixture(scope="session")
def gateway_url(out: Path, tail_url: str) -> Iterator[str]:
    with serve(gateway_app(out, tail_url), "/v1/models") as url:
        yield url


@pytest.fixture(scope="session")
def api(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="not-needed-on-loopback", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def tokenizer(out: Path) -> ChatTokenizer:
    return ChatTokenizer(load_bundle(out / "client", "client"))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def greedy_chat(api: openai.OpenAI, messages: list[dict], max_tokens: int = 16, **kwargs):
    return api.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, **kwargs)


def positions_processed(tail_url: str) -> float:
    text = httpx.get(f"{tail_url}/metrics").text
    return float(re.search(r"^split_positions_processed_total (\S+)$", text, re.M).group(1))


def test_models_lists_the_bundle_model(api: openai.OpenAI) -> None:
    assert [m.id for m in api.models.list().data] == [MODEL]
    assert api.models.retrieve(MODEL).id == MODEL


def test_chat_completion_with_usage(api: openai.OpenAI, tokenizer: ChatTokenizer) -> None:
    answer = greedy_chat(api, user(PROMPT), max_tokens=12)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == MODEL
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.prompt_tokens == len(tokenizer.chat_ids(user(PROMPT)))
    assert 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 12


def test_streaming_chat_matches_the_whole_answer(api: openai.OpenAI) -> None:
    whole = greedy_chat(api, user(PROMPT), max_tokens=12)
    chunks = list(greedy_chat(api, user(PROMPT), max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    with_reason = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(with_reason) == 1 and with_reason[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_ends_with_done(gateway_url: str) -> None:
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 3, "temperature": 0, "stream": True}
    events = httpx.post(f"{gateway_url}/v1/completions", json=body, timeout=60).text.strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in events[-2]


def test_completions_plain_and_streaming(api: openai.OpenAI) -> None:
    whole = api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(b"Once upon a time")  # random:tiny's tokenizer is byte-level
    streamed = api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_seed_makes_sampling_reproducible(api: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        answer = api.chat.completions.create(model=MODEL, messages=user(PROMPT), max_tokens=24, temperature=1.0,
                                              top_p=0.95, seed=seed)
        return answer.choices[0].message.content

    first = sample(7)
    assert sample(7) == first, "same seed, same text"
    assert sample(8) != first, "another seed should sample another text"


def test_stop_sequences_are_cut_from_the_output(api: openai.OpenAI) -> None:
    full = greedy_chat(api, user(PROMPT), max_tokens=24).choices[0].message.content
    # A two-character stop sequence from the middle of the greedy answer; the answer must stop right before it.
    start = next((i for i in range(2, len(full) - 2) if "\ufffd" not in full[i : i + 2]), None)
    assert start is not None, f"greedy answer {full!r} too short to pick a stop sequence from"
    stop = full[start : start + 2]
    expected = full[: full.index(stop)]
    cut = greedy_chat(api, user(PROMPT), max_tokens=24, stop=[stop, "never-appears"])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    chunks = list(greedy_chat(api, user(PROMPT), max_tokens=24, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_greedy_output_equals_the_command_line_client(api: openai.OpenAI, out: Path, tail_url: str) -> None:
    cli = subprocess.run(
        [sys.executable, "-m", "client", "--bundle", str(out), "--server-url", tail_url, "--max-new-tokens", "16",
         PROMPT],
        cwd=ROOT, capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert cli.returncode == 0, cli.stderr.decode()
    printed = cli.stdout.decode("utf-8")
    assert printed.endswith("\n")
    assert greedy_chat(api, user(PROMPT), max_tokens=16).choices[0].message.content == printed[:-1]


def plain_first_turn(api: openai.OpenAI, tokenizer: ChatTokenizer):
    """A one-token first turn whose reply text maps back to that token.

    random:tiny often emits unused special tokens or broken UTF-8, which the client never sees as such; a
    conversation continuing such a reply does not extend what the caches hold, so it (rightly) starts afresh.
    """
    for text in ("Hello there.", "Remember the number 42.", "What is two plus two?", "Say something.", "Hi!"):
        first = greedy_chat(api, user(text), max_tokens=1)
        reply = first.choices[0].message.content
        if reply and "\ufffd" not in reply and len(tokenizer.encode(reply, add_special_tokens=False)) == 1:
            return user(text), first
    pytest.fail("no candidate first turn of random:tiny answers with a plain-text token; add candidates")


def test_second_turn_sends_only_new_tokens(api: openai.OpenAI, tail_url: str, tokenizer: ChatTokenizer) -> None:
    first_messages, first = plain_first_turn(api, tokenizer)
    reply = first.choices[0].message.content
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # After turn 1 the caches hold the prompt; the one generated token is pending, to be fed with the next turn.
    held = first.usage.prompt_tokens

    before = positions_processed(tail_url)
    messages = [*first_messages, {"role": "assistant", "content": reply}, *user("Which number was it?")]
    second = greedy_chat(api, messages, max_tokens=6)
    processed = positions_processed(tail_url) - before

    usage = second.usage
    assert usage.prompt_tokens_details.cached_tokens == held
    new_tokens = usage.prompt_tokens - held
    decoded = usage.completion_tokens - (1 if second.choices[0].finish_reason == "length" else 0)
    assert processed == new_tokens + decoded, (
        f"tail processed {processed} positions; expected the {new_tokens} new prompt tokens + {decoded} decode steps "
        f"(the whole prompt is {usage.prompt_tokens})"
    )
    # Reuse changes nothing: the pooled conversation now holds turn 2's answer too, so asking turn 2 again starts
    # from scratch, and greedy decoding gives the same answer.
    again = greedy_chat(api, messages, max_tokens=6)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == second.choices[0].message.content


def test_requests_are_served_concurrently(api: openai.OpenAI) -> None:
    long = greedy_chat(api, user("Tell me a long story."), max_tokens=200, stream=True)
    first = next(iter(long))
    assert first.choices[0].delta.role == "assistant"
    # While the long answer is still streaming, a short one completes.
    assert greedy_chat(api, user("Hi"), max_tokens=2).choices[0].finish_reason in ("stop", "length")
    rest = list(long)
    assert rest[-1].choices[0].finish_reason in ("stop", "length")


def test_errors_have_the_openai_shape_and_status(api: openai.OpenAI, gateway_url: str) -> None:
    bad = httpx.post(f"{gateway_url}/v1/chat/completions", content=b"{not json",
                     headers={"Content-Type": "application/json"})
    assert bad.status_code == 400
    assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
    assert "not valid JSON" in bad.json()["error"]["message"]

    with pytest.raises(openai.NotFoundError) as unknown:
        api.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"

    with pytest.raises(openai.BadRequestError) as too_long:
        greedy_chat(api, user(PROMPT), max_tokens=2000)
    assert too_long.value.code == "context_length_exceeded" and "1024" in too_long.value.message

    with pytest.raises(openai.BadRequestError) as several:
        api.chat.completions.create(model=MODEL, messages=user("hi"), n=2)
    assert several.value.param == "n"

    with pytest.raises(openai.BadRequestError) as hot:
        api.completions.create(model=MODEL, prompt="hi", temperature=3)
    assert hot.value.param == "temperature"

    with pytest.raises(openai.BadRequestError) as penalty:
        api.completions.create(model=MODEL, prompt="hi", frequency_penalty=0.5)
    assert penalty.value.param == "frequency_penalty"


def test_unreachable_tail_is_a_502(out: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with serve(gateway_app(out, closed), "/v1/models") as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as lost:
                api.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2, stream=stream)
            assert lost.value.status_code == 502 and lost.value.code == "tail_unreachable"
            assert closed in lost.value.message


def test_api_key_is_required_once_set(out: Path) -> None:
    """Also the in-process tail (``serve --local``): no tail service at all."""
    with serve(gateway_app(out, "http://unused", local=True, api_key="s3cret"), "/v1/models",
               headers={"Authorization": "Bearer s3cret"}) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert right.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_exposed_bind_needs_the_flag_and_a_key() -> None:
    with pytest.raises(ValueError, match="allow-remote"):
        GatewaySettings(host="0.0.0.0")
    with pytest.raises(ValueError, match="API key"):
        GatewaySettings(host="0.0.0.0", allow_remote=True)
    assert GatewaySettings(host="0.0.0.0", allow_remote=True, api_key="k").host == "0.0.0.0"
    refused = subprocess.run([sys.executable, "-m", "client", "serve", "--host", "0.0.0.0"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr
