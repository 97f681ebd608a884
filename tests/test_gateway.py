"""The OpenAI-compatible gateway, driven by the official `openai` package over real sockets.

A real tail service (uvicorn on loopback) serves the random:tiny tail; the gateway (uvicorn on another port) holds
the tokenizer and head and forwards hidden states to it, as `python -m client serve` does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI
from servers import ROOT, free_port, serve_app, start

from client.gateway import engine as engine_module
from client.gateway.app import create_app as create_gateway
from client.gateway.engine import Engine, Finished
from client.gateway.settings import GatewaySettings
from client.settings import ClientSettings
from client.split import Split
from client.tokenizer import ChatTokenizer
from services.app import create_app as create_tail_service
from services.settings import ServerSettings
from splitcore.manifest import Bundle, load_bundle

MODEL = "random:tiny"
PROMPT = "Name three colours."


def gateway_app(out: Path, server_url: str, local: bool = False, engine: type[Engine] = Engine,
                **gateway: object) -> Callable[[int], FastAPI]:
    def make(port: int) -> FastAPI:
        client = ClientSettings(bundle=out, server_url=server_url, retries=0, timeout_s=30)
        return create_gateway(GatewaySettings(port=port, **gateway), lambda: engine(Split(client, local), 4))

    return make


@pytest.fixture(scope="session")
def out(export_bundle) -> Path:
    return export_bundle(MODEL, 2, "fp32")


@pytest.fixture(scope="session")
def tail_url(out: Path) -> Iterator[str]:
    # The service reserves 2048 positions for clients that do not say (as `python -m client` does not); the tiny
    # model has fewer, and the service refuses to reserve more than the model has.
    positions = load_bundle(out / "server", "server").manifest.model.max_position_embeddings
    # Without the tail's drafts: a step that verifies them runs more positions than the conversation adds, and
    # test_second_turn_sends_only_new_tokens counts positions (tests/test_tail_drafts.py covers the drafts).
    settings = ServerSettings(bundle=out / "server", default_max_length=positions, tail_drafts=False)
    with serve_app(lambda port: create_tail_service(settings.model_copy(update={"port": port})), "/readyz") as url:
        yield url


@pytest.fixture(scope="session")
def gateway_url(out: Path, tail_url: str) -> Iterator[str]:
    with serve_app(gateway_app(out, tail_url), "/v1/models") as url:
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


class HoldingEngine(Engine):
    """Holds a prompt that says "hold" after its first token until another request has finished (or 20 s)."""

    other_finished = threading.Event()
    overlapped = threading.Event()

    def run(self, job, cancelled):
        holding = "hold" in self.tokenizer.decode(job.ids)
        first = True
        for event in super().run(job, cancelled):
            yield event
            if isinstance(event, Finished) and not holding:
                HoldingEngine.other_finished.set()
            if holding and first and not isinstance(event, Finished):
                first = False
                if HoldingEngine.other_finished.wait(timeout=20):
                    HoldingEngine.overlapped.set()


def test_requests_are_served_concurrently(out: Path, tail_url: str) -> None:
    """A short request completes while a long one is held half-way: the two really run at the same time."""
    HoldingEngine.other_finished.clear()
    HoldingEngine.overlapped.clear()
    with serve_app(gateway_app(out, tail_url, engine=HoldingEngine), "/v1/models") as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        long = api.completions.create(model=MODEL, prompt="hold on", max_tokens=8, temperature=0, stream=True)
        first = next(iter(long))  # the long run has started and now waits for the short one
        assert first.choices[0].text is not None
        short = api.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
        assert short.choices[0].finish_reason in ("stop", "length")
        rest = list(long)
    assert HoldingEngine.overlapped.is_set(), "the short request did not finish while the long one was running"
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


LONE = "\ud800"  # half of a UTF-16 surrogate pair, on its own


@pytest.mark.parametrize(("route", "fields", "param"), [
    ("chat/completions", {"messages": [{"role": "user", "content": f"a{LONE}b"}]}, "messages.0.content"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
     "messages.0.content.0.text"),
    ("completions", {"prompt": LONE}, "prompt"),
    ("completions", {"prompt": [f"x{LONE}"]}, "prompt.0"),
    ("completions", {"prompt": "x", "stop": [LONE]}, "stop.0"),
])
def test_lone_surrogate_is_a_400_naming_the_field(gateway_url: str, route: str, fields: dict, param: str) -> None:
    """JSON allows "\\ud800" alone; no tokenizer can encode it. It is the client's mistake: 400, not 500."""
    body = json.dumps({"model": MODEL, "max_tokens": 2, **fields})  # ASCII JSON: the surrogate as an escape
    answer = httpx.post(f"{gateway_url}/v1/{route}", content=body.encode(),
                        headers={"Content-Type": "application/json"}, timeout=30)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"], error


def test_gateway_logs_one_line_per_request_not_per_token(out: Path, tail_url: str, tmp_path: Path) -> None:
    """`python -m client serve` at its default level: each token is one request to the tail, and none is logged."""
    port = free_port()
    command = [sys.executable, "-m", "client", "serve", "--bundle", str(out), "--server-url", tail_url,
               "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"}
    gateway = start(command, env, ROOT, port, tmp_path / "gateway.log", ready_path="/v1/models")
    try:
        before = len(gateway.output().splitlines())
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
        answer = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60).json()
        assert answer["usage"]["completion_tokens"] >= 2
    finally:
        gateway.terminate()
    lines = gateway.output().splitlines()[before:]
    lines = lines[: next((i for i, line in enumerate(lines) if "Shutting down" in line), len(lines))]
    assert len(lines) == 1 and "POST /v1/completions" in lines[0], "one request, these lines:\n" + "\n".join(lines)


def test_model_generation_defaults_apply_when_the_request_leaves_them_out(
    out: Path, tail_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose generation defaults say greedy answers a request without temperature greedily.

    Today's manifests carry no generation defaults, so the reader is replaced with one that finds
    ``do_sample: false`` (which is what transformers' generation_config means by greedy).
    """
    monkeypatch.setattr(engine_module, "model_defaults", lambda manifest: {"temperature": 0.0})
    with serve_app(gateway_app(out, tail_url), "/v1/models") as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        texts = {api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16).choices[0].text
                 for _ in range(3)}
        greedy = api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0)
        hot = {api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16,
                                      temperature=2.0).choices[0].text for _ in range(3)}
    assert texts == {greedy.choices[0].text}
    assert len(hot) > 1, "a request's own temperature still wins over the model's default"


def template_tokenizer(out: Path, tmp_path: Path, template: str) -> ChatTokenizer:
    """The tiny bundle's tokenizer with another chat template (the bundle on disk stays as exported)."""
    bundle = load_bundle(out / "client", "client")
    spec = bundle.manifest.tokenizer
    (tmp_path / spec.file).write_bytes(bundle.path(spec.file).read_bytes())
    (tmp_path / spec.chat_template_file).write_text(template)
    return ChatTokenizer(Bundle(tmp_path, bundle.manifest, bundle.manifest_sha256, "client"))


def test_chat_templates_render_as_transformers_renders_them(out: Path, tmp_path: Path) -> None:
    """transformers' ``{% generation %}`` block (renders its body) and its ``tojson`` (``ensure_ascii=False``, keys
    in order, no HTML escaping) behave here as they do in ``apply_chat_template``."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = ("{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
                "{{ messages[0]['content'] | tojson }}{{ {'b': 1, 'a': 2} | tojson }}")
    messages = [{"role": "user", "content": "a<b é"}, {"role": "assistant", "content": "ok & done"}]
    tokenizer = template_tokenizer(out, tmp_path, template)
    rendered = tokenizer.render(messages)
    assert rendered == _compile_jinja_template(template).render(messages=messages, add_generation_prompt=True)
    assert rendered == '[a<b é][ok & done]"a<b é"{"b": 1, "a": 2}'
    assert isinstance(tokenizer.template.environment, ImmutableSandboxedEnvironment)


@pytest.mark.parametrize(("route", "fields", "param", "fragment"), [
    ("chat/completions", {"messages": user("hi"), "seed": 2**63}, "seed", "less than or equal"),
    ("completions", {"prompt": ""}, "prompt", "encodes to no tokens"),
    ("completions", {"prompt": [""]}, "prompt", "encodes to no tokens"),
    ("completions", {"prompt": "x" * 5000}, "prompt", "maximum context length"),  # not "messages"
    # Strict, as OpenAI: true is not 1, 3.0 is not 3 and "yes" is not true.
    ("completions", {"prompt": "hi", "temperature": True}, "temperature", "valid number"),
    ("completions", {"prompt": "hi", "max_tokens": 3.0}, "max_tokens", "valid integer"),
    ("chat/completions", {"messages": user("hi"), "stream": "yes"}, "stream", "valid boolean"),
])
def test_a_bad_value_is_a_400_naming_its_field(gateway_url: str, route: str, fields: dict, param: str,
                                               fragment: str) -> None:
    answer = httpx.post(f"{gateway_url}/v1/{route}", json={"model": MODEL, "max_tokens": 2, **fields}, timeout=30)
    good = {k: v for k, v in fields.items() if k in ("messages", "prompt")}
    if param not in good:  # the same request with that field as the API types it is served
        ok = httpx.post(f"{gateway_url}/v1/{route}", json={"model": MODEL, "max_tokens": 2, "temperature": 0,
                                                          **good}, timeout=30)
        assert ok.status_code == 200, ok.text
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


def test_a_body_over_the_limit_is_413_before_it_is_read(gateway_url: str) -> None:
    limit = GatewaySettings().max_body_bytes
    body = json.dumps({"model": MODEL, "prompt": "x" * limit}).encode()
    announced = httpx.post(f"{gateway_url}/v1/completions", content=body,
                           headers={"Content-Type": "application/json"}, timeout=30)
    chunked = httpx.post(f"{gateway_url}/v1/completions", content=iter([body[:1000], body[1000:]]),
                         headers={"Content-Type": "application/json"}, timeout=30)
    for answer in (announced, chunked):
        assert answer.status_code == 413, answer.text
        assert answer.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{gateway_url}/v1/models").status_code == 200


def test_prompts_are_encoded_off_the_event_loop(out: Path, tail_url: str) -> None:
    """Encoding takes time in proportion to the prompt: on the event loop, one long prompt held up every request."""
    where: list[str] = []

    class Watched(Engine):
        def job(self, *args, **kwargs):
            try:
                asyncio.get_running_loop()
                where.append("event loop")
            except RuntimeError:
                where.append("worker thread")
            return super().job(*args, **kwargs)

    with serve_app(gateway_app(out, tail_url, engine=Watched), "/v1/models") as url:
        answer = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                            timeout=30)
    assert answer.status_code == 200, answer.text
    assert where == ["worker thread"]
