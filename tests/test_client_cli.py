"""`python -m client` as a user meets it: every mistake and every bad tail ends in one line and exit code 2.

The tail is the fake one (tests/fake_tail.py) or the in-process one (--local); the head is a random:tiny export.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY
from fake_tail import Answer, FakeTail

from client.cli import DEFAULT_PROMPT, main, read_prompt
from client.conversation import ContextExceeded, fit
from client.settings import ClientSettings
from client.split import Split
from splitcore import wire
from splitcore.errors import SplitError
from splitcore.manifest import load_bundle

# Child processes and real sockets: the full suite runs these, `make test-fast` skips them.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def out(export_bundle):
    return export_bundle(TINY, 2)


@pytest.fixture(scope="module")
def context(out) -> int:
    return load_bundle(out / "client", "client").manifest.model.max_position_embeddings


@pytest.fixture
def tail():
    with FakeTail() as fake:
        yield fake


def client(*args: str, stdin: str | None = None, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SPLIT_CLIENT_")}
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, input=stdin or "", capture_output=True,
                          text=True, timeout=timeout, env={**environment, "PYTHONIOENCODING": "utf-8", **env})


def one_error_line(result: subprocess.CompletedProcess | str, expected: str) -> None:
    stderr = result if isinstance(result, str) else result.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("client: error: ") and expected in lines[0], stderr
    assert isinstance(result, str) or result.returncode == 2


def run_main(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


# Defect 2: an empty prompt is an error; without a prompt, stdin is read when it is not a terminal.

class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_read_prompt_takes_stdin_unless_it_is_a_terminal():
    assert read_prompt("hello", io.StringIO("ignored")) == "hello"
    assert read_prompt(None, io.StringIO("from a pipe\n")) == "from a pipe\n"
    assert read_prompt(None, Tty("")) == DEFAULT_PROMPT
    with pytest.raises(SplitError, match="stdin was empty"):
        read_prompt(None, io.StringIO("  \n"))
    with pytest.raises(SplitError, match="the prompt is empty"):
        read_prompt("   ", Tty(""))


def test_an_empty_prompt_is_refused(capsys):
    code, err = run_main(capsys, "--local", "")
    assert code == 2
    one_error_line(err, "the prompt is empty")


def test_a_piped_prompt_is_answered_like_the_same_argument(out):
    given = client("--local", "--raw", "--bundle", str(out), "--max-new-tokens", "6", "tell me a story")
    piped = client("--local", "--raw", "--bundle", str(out), "--max-new-tokens", "6", stdin="tell me a story")
    assert given.returncode == piped.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout
    assert client("--local", "--bundle", str(out), stdin="").returncode == 2


# Defects 3, 7, 8: settings mistakes are one line, before anything is loaded or sent.

@pytest.mark.parametrize("argv, env, expected", [
    (["--ca-cert", "/nope.pem"], {}, "--ca-cert: /nope.pem is not a file"),
    (["--server-url", "localhost:8000"], {}, "write e.g. http://localhost:8000"),
    (["--server-url", "ftp://host"], {}, "is not an http:// or https:// URL"),
    (["--max-new-tokens", "0"], {}, "--max-new-tokens: Input should be greater than or equal to 1 (got 0)"),
    (["--top-p", "2"], {}, "--top-p: Input should be less than or equal to 1"),
    ([], {"SPLIT_CLIENT_TEMPERATURE": "-1"}, "SPLIT_CLIENT_TEMPERATURE: Input should be greater than or equal to 0"),
    ([], {"SPLIT_CLIENT_TIMEOUT_S": "soon"}, "SPLIT_CLIENT_TIMEOUT_S: Input should be a valid number"),
])
def test_a_bad_setting_is_one_line(capsys, monkeypatch, argv, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    code, err = run_main(capsys, *argv, "hi")
    assert code == 2 and time.monotonic() - started < 2
    one_error_line(err, expected)
    assert "usage:" not in err and "pydantic" not in err


def test_a_bad_log_level_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("LOG_LEVEL", "LOUD")
    code, err = run_main(capsys, "hi")
    assert code == 2
    one_error_line(err, "LOG_LEVEL 'LOUD' is not one of")


def test_a_server_url_without_a_scheme_is_not_retried():
    result = client("--server-url", "127.0.0.1:9", "hi", timeout=20)
    one_error_line(result, "is not an http:// or https:// URL")
    assert "retrying" not in result.stderr


# Defects 4, 5: limits are checked against the model's positions (from the manifest) before generating.

def test_fit_clamps_to_the_context_and_refuses_a_prompt_without_room():
    assert fit(10, 0, 5, 100) == 5
    assert fit(10, 0, 1000, 100) == 90
    assert fit(10, 80, 1000, 100) == 10
    with pytest.raises(ContextExceeded, match="the prompt has 100 tokens; this model holds 100 positions"):
        fit(100, 0, 1, 100)
    with pytest.raises(ContextExceeded, match="after the 95 positions this conversation holds"):
        fit(5, 95, 1, 100)


def test_max_new_tokens_past_the_context_is_clamped_and_the_reservation_follows_the_manifest(out, context, tail):
    result = client("--raw", "--bundle", str(out), "--server-url", tail.url, "--max-new-tokens", "100000", "hi")
    assert result.returncode == 0, result.stderr
    clamp = re.fullmatch(rf"generating at most (\d+) tokens, not 100000: the model holds {context} positions and "
                         r"the prompt takes (\d+)\n", result.stderr)
    assert clamp and int(clamp[1]) + int(clamp[2]) == context, result.stderr
    opened = [r for r in tail.requests if r.path == "/v1/sessions"]
    assert len(opened) == 1 and f'"max_length": {context}' in opened[0].body.decode()
    assert max(int(r.headers["x-past-length"]) for r in tail.requests if r.path.endswith("/steps")) < context


def test_the_session_opens_before_the_prompt_and_asks_for_the_context_it_can_shrink(out, context, tail):
    """The session opens while the head loads (no round trip of its own in the time to first token), asking for
    the model's context with min_length 1: the service grants what a KV slot holds (it reserves a whole slot
    whatever is asked)."""
    result = client("--raw", "--bundle", str(out), "--server-url", tail.url, "--max-new-tokens", "3", "hi")
    assert result.returncode == 0, result.stderr
    opens = [r for r in tail.requests if r.path == "/v1/sessions"]
    assert len(opens) == 1
    body = opens[0].body.decode()
    assert f'"max_length": {context}' in body and '"min_length": 1' in body
    assert tail.requests.index(opens[0]) == 0


@pytest.mark.parametrize("mode", ["--local", "remote"])
def test_a_prompt_past_the_context_is_refused_up_front(out, context, tail, mode):
    where = ["--local"] if mode == "--local" else ["--server-url", tail.url]
    started = time.monotonic()
    result = client(*where, "--raw", "--bundle", str(out), stdin="word " * context)
    one_error_line(result, f"this model holds {context} positions")
    assert result.stdout == "" and time.monotonic() - started < 30
    # The session opened ahead of time is deleted again; no hidden state reaches the tail.
    assert not [r for r in tail.requests if r.path.endswith("/steps")], "no hidden state reaches the tail"


# Issue 13 part 4 through the command line: a bad tail is one line, a non-zero exit, and a bounded wait.

def answered(body: dict) -> object:
    """A step answer that gets the session length right, so only the field under test is wrong."""
    def step(request, length):
        return Answer.json({**body, "length": length + wire.decode(request.body).shape[1]})
    return step


@pytest.mark.parametrize("step, expected", [
    (answered({"token": None}), "sent no token (null)"),
    (answered({"token": 2**63}), f"token id {2**63}"),
    (answered({"token": -3}), "token id -3"),
    (lambda request, length: Answer(301, headers={"Location": "https://elsewhere/"}), "redirected"),
    (lambda request, length: Answer(200, b"\x00garbage\x1b[2J"), "malformed step result"),
    (lambda request, length: Answer(200, endless=True), "longer than"),
    (lambda request, length: Answer.json({"token": 1, "length": 1}, drip_s=0.2), "within the 1 s deadline"),
    # Retry-After in digits that are not ASCII (str.isdigit takes them, float() does not): retried as if absent.
    (lambda request, length: Answer(503, b"{}", headers={"Retry-After": "\xb2"}), "503"),
    (lambda request, length: Answer(409, b"[" * 200_000), "409"),  # an error body nested past the JSON parser
    (lambda request, length: Answer(400, b'{"detail": ' + b"[" * 200_000), "400"),
])
def test_a_hostile_tail_ends_the_command_in_one_line(out, tail, step, expected):
    tail.step = step
    started = time.monotonic()
    result = client("--raw", "--bundle", str(out), "--server-url", tail.url, "hi", SPLIT_CLIENT_TIMEOUT_S="1",
                    SPLIT_CLIENT_RETRY_BUDGET_S="1")
    errors = [line for line in result.stderr.splitlines() if "retrying in" not in line]
    one_error_line("\n".join(errors), expected)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert time.monotonic() - started < 15


# Defect 11: --chat stats count tokens, steps and bytes of the same turn.

def test_chat_stats_are_per_turn(out, tail):
    result = client("--chat", "--stats", "--bundle", str(out), "--server-url", tail.url, "--max-new-tokens", "5",
                    stdin="first question\nsecond, longer question with more words\n")
    assert result.returncode == 0, result.stderr
    turns = re.findall(r"prompt (\d+) tokens, generated (\d+);.*; sent (\d+) B, received \d+ B over (\d+) steps",
                       result.stderr)
    assert len(turns) == 2, result.stderr
    for prompt, generated, sent, steps in turns:
        assert int(steps) == int(generated) == 5  # one feed of the turn's prompt, then one step per new token
        assert int(sent) < int(steps) * 2048 + int(prompt) * 64 * 2
    assert len([r for r in tail.requests if r.path == "/v1/sessions"]) == 1, "the second turn reuses the session"


def test_a_chat_turn_past_the_context_is_refused_and_the_chat_goes_on(out, context, tail):
    result = client("--chat", "--bundle", str(out), "--server-url", tail.url, "--max-new-tokens", "3",
                    stdin="word " * context + "\nhi\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("client: error: the prompt has") == 1
    assert len(result.stdout.splitlines()) == 1, "the second turn is answered"


# Issue 13 part 2: one connection pool per process; the next conversation does not wait for the last one's DELETE.

def test_conversations_of_one_process_share_the_pool(out, tail):
    split = Split(ClientSettings(bundle=out, server_url=tail.url), local=False)
    try:
        first = split.generator(max_length=16)
        http = split.http
        list(first.generate([5, 6, 7], 2))
        second = split.generator(max_length=16)
        list(second.generate([5, 6, 7], 2))
        assert split.http is http and first.tail.http is second.tail.http is http
    finally:
        split.close()
    assert len(tail.paths("DELETE")) == 2 and tail.connections <= 2


def test_the_gateway_imports_split_without_the_command_line():
    code = "import sys, client.gateway.engine, client.split; assert 'client.cli' not in sys.modules, sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True).returncode == 0


def test_a_long_lived_client_opens_each_next_session_ahead_of_its_conversation(out, tail):
    """keep_spare (the gateway): each conversation finds its session already open, so its first step is its
    first round trip; the one spare left over is deleted on close."""
    split = Split(ClientSettings(bundle=out, server_url=tail.url), local=False, keep_spare=True)
    try:
        for _ in range(3):
            list(split.generator(max_length=16).generate([5, 6, 7], 2))
        # The last spare opens on its own thread, released by the third conversation's first step: let it finish.
        split.spare.opening.thread.join(timeout=10)
        opens = [tail.requests.index(r) for r in tail.requests if r.path == "/v1/sessions"]
        steps = [i for i, r in enumerate(tail.requests) if r.path.endswith("/steps")]
        assert len(opens) == 4  # one ahead of time, then one more per conversation
        # Each next session opens after the current conversation's first step (not during its prefill), and before
        # the next conversation starts (2 tokens each: a prompt step, then one decode step).
        for n in range(3):
            assert steps[2 * n] < opens[n + 1], (n, opens, steps)
            if n < 2:
                assert opens[n + 1] < steps[2 * n + 2], (n, opens, steps)
    finally:
        split.close()
    assert len(tail.paths("DELETE")) == 4, "every session is deleted, the spare too"


def test_conversations_opened_from_many_threads_never_share_a_spare(out, tail):
    """The gateway opens conversations on several threads at once: each spare goes to one of them only."""
    import threading

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between almost every bytecode: a check-then-take race shows
    try:
        for _ in range(10):
            split = Split(ClientSettings(bundle=out, server_url=tail.url), local=False, keep_spare=True)
            first_spare = split.spare
            links, start = [], threading.Barrier(8)

            def take(split=split, links=links, start=start) -> None:
                start.wait()
                links.append(split.new_generator(split_params(split)).tail)

            threads = [threading.Thread(target=take) for _ in range(8)]
            try:
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(10)
                assert len(links) == 8 and len({id(link) for link in links}) == 8 and None not in links
                assert sum(link is first_spare for link in links) == 1
            finally:
                for link in links:
                    if link is not None:
                        link.close()
                split.close()
    finally:
        sys.setswitchinterval(interval)


def split_params(split: Split):  # noqa: ANN201 - the sampling parameters a Split's spare was opened with
    from client.split import sampling

    return sampling(split.settings)


def test_a_spare_closed_unused_is_never_opened(out, tail):
    """A spare held back until a conversation's first token is skipped when the client closes first."""
    split = Split(ClientSettings(bundle=out, server_url=tail.url), local=False, keep_spare=True)
    split.spare.opening.wait()  # the first spare: opened at start-up
    generator = split.generator(max_length=16)  # takes it; the next one is held back
    held = split.spare
    started = time.monotonic()
    split.close()
    assert time.monotonic() - started < 5
    assert held.session_id is None
    assert len([r for r in tail.requests if r.path == "/v1/sessions"]) == 1
    assert generator.tail.session_id is None  # closed: its session deleted in the background
