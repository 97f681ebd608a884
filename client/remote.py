"""The tail behind HTTP: a session on the tail service, with replay when the session or the connection is lost.

The client keeps the hidden states it has sent (fp16, as sent). When the server forgets the session (restart, pod
replaced, TTL) it opens a new session, replays those exact bytes in chunks, and retries the step: the new server
rebuilds the same KV cache, so greedy output is identical to an uninterrupted run. Replaying the bytes already sent,
rather than recomputing them, also keeps boundary noise from being re-drawn (which would let an observer average it
out).

When a step fails without an answer (connection dropped, deadline passed), the client first retries it on the same
session: the step states the positions it continues, so a server that did apply it refuses with 409 and only then is
the session abandoned (deleted, best effort) and replayed. Retries back off exponentially with jitter for at most
``retry_budget_s``, enough for a service restarted after ``kill -9``. Everything the service answers is checked
(status, JSON shape, token range, length), and any answer that is not what the protocol promises ends the run with
one line instead of a traceback or a replay.
"""

from __future__ import annotations

import json
import logging
import random
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from client.http import Reply, ServiceError, TailClient, TailUnreachable, Traffic, Transient, printable
from client.settings import ClientSettings
from splitcore import protocol, wire
from splitcore.errors import WireError
from splitcore.generation import TokenChooser
from splitcore.graphs import LmHeadRunner
from splitcore.manifest import Bundle
from splitcore.sampling import Choice, History, SamplingParams

__all__ = ["RemoteTail", "ServiceError", "TailUnreachable", "Traffic"]

log = logging.getLogger(__name__)

WIRE_DTYPE = np.float16
RETRYABLE_STATUS = {429, 502, 503, 504}
FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 4.0
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# What services/api.py writes.
_MS = r"([0-9]{1,9}(?:\.[0-9]{1,6})?)"
SERVER_TIMING = re.compile(rf"\s*tail;dur={_MS}\s*(?:,\s*draft;dur={_MS}\s*)?")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class RemoteTail:
    """A TailLink that runs the tail on the service; one instance is one conversation.

    ``http``: the process's connection pool to the service (one is made, and closed with the link, when None).
    ``traffic``: where to count bytes (a fresh counter when None).
    """

    def __init__(self, bundle: Bundle, settings: ClientSettings, params: SamplingParams,
                 lm_head: LmHeadRunner | None = None, sleep: Callable[[float], None] = time.sleep,
                 http: TailClient | None = None, traffic: Traffic | None = None) -> None:
        self.bundle = bundle
        # Private-output mode: the service returns the final hidden state and the token is chosen here.
        self.chooser = TokenChooser(params, lm_head) if bundle.manifest.output_mode == "hidden" else None
        self.settings = settings
        self.params = params
        self.sleep = sleep
        self.traffic = traffic or Traffic()
        self.owns_http = http is None
        self.http = http or TailClient(settings.server_url, settings.ca_cert, settings.timeout_s,
                                       settings.max_response_bytes)
        # The affinity key lives as long as this conversation, replays included (a replay after a lost replica
        # hashes to a live one).
        self.headers = {protocol.MANIFEST_HEADER: bundle.manifest_sha256,
                        protocol.AFFINITY_HEADER: secrets.token_urlsafe(12)}
        if settings.token:
            self.headers["Authorization"] = f"Bearer {settings.token}"
        self.random = random.Random()
        self.session_id: str | None = None
        self.max_length: int | None = None
        self.sent: list[bytes] = []  # fp16 hidden-state frames of every position the server holds, in order
        self.length = 0
        self.history = History()  # what this conversation generated, for a replay's repetition penalty
        self.keep: int | None = None  # a rollback the service applies with the next step (X-Keep-Length)
        self.opening: Opening | None = None  # a session being opened in the background
        # Fewest positions this conversation can work with (None: all of settings.max_length); a chat asks for the
        # model's context and takes what the service's KV slots hold.
        self.min_length: int | None = None
        self.replays = 0
        self.compute_seconds: float | None = None  # the tail's run time for the latest step, as it reported it
        self.draft_seconds: float | None = None  # of it, the tail's drafting, as it reported it
        # Called once, after this link's first answered step or when it closes (a spare waiting to open, say).
        self.after_first_step: list[Callable[[], None]] = []

    @classmethod
    def open(cls, bundle: Bundle, settings: ClientSettings, params: SamplingParams,
             lm_head: LmHeadRunner | None = None, http: TailClient | None = None,
             traffic: Traffic | None = None, background: bool = False, min_length: int | None = None,
             held: bool = False) -> RemoteTail:
        """A link with its session open; ``background``: the session opens on a thread while the caller goes on
        (the head computes the prompt meanwhile), and the first step waits for it, so opening costs no round trip
        of its own in the time to first token. An error opening it surfaces at that step. ``held`` (with
        ``background``): the thread waits for ``opening.release()`` (or the first step) before it opens."""
        tail = cls(bundle, settings, params, lm_head, http=http, traffic=traffic)
        tail.min_length = min_length
        if background:
            tail.opening = Opening(tail, held)
            return tail
        try:
            tail.with_retries(tail.open_session)
        except BaseException:
            tail.close()
            raise
        return tail

    def open_session(self) -> None:
        body = protocol.OpenSession(
            manifest_sha256=self.bundle.manifest_sha256,
            max_length=self.settings.max_length,
            min_length=self.min_length if self.settings.max_length else None,
            # What SamplingParams took (a manifest's top_k of 50.0 included) goes out; the service reads it strictly.
            sampling=protocol.Sampling.model_validate(vars(self.params), strict=False),
            generated=self.history.tokens().tolist(),
        )
        reply = self.request("POST", protocol.SESSIONS_PATH, json.dumps(body.model_dump()).encode(),
                             {"Content-Type": "application/json"})
        opened = parse(protocol.SessionOpened, reply, "session")
        if not SESSION_ID.fullmatch(opened.session_id):
            raise ServiceError(f"the tail service named its session {printable(opened.session_id, 60)!r}; "
                               "expected 1-128 letters, digits, '-' or '_'")
        needed = max((self.min_length or self.settings.max_length or 1), self.length + 1)
        if opened.max_length < needed:
            raise ServiceError(f"the tail service reserved {opened.max_length} positions; this conversation needs "
                               f"{needed}")
        self.session_id, self.max_length = opened.session_id, opened.max_length
        log.debug("opened session %s (%d positions)", self.session_id, self.max_length)

    def step(self, hidden_states: np.ndarray, past_length: int, sample: bool = True, guess: bool = False,
             draft: int = 0) -> Choice | None:
        choices = self._run(hidden_states, past_length, 1 if sample else 0, guess, draft if sample else 0)
        return choices[0] if choices else None

    def verify(self, hidden_states: np.ndarray, past_length: int, count: int, guess: bool = False, draft: int = 0,
               drafted: int = 0) -> list[Choice]:
        if not 1 <= count <= hidden_states.shape[1]:
            raise ValueError(f"cannot sample {count} of {hidden_states.shape[1]} positions")
        return self._run(hidden_states, past_length, count, guess, draft, drafted)

    def rollback(self, length: int) -> None:
        """Keep the first ``length`` positions: the frames kept for a replay are cut here at once, the service's
        cache with the next step (X-Keep-Length), so a rollback costs no round trip of its own."""
        if not 0 <= length <= self.length:
            raise ValueError(f"this conversation holds {self.length} positions, cannot keep {length}")
        if length == self.length:
            return
        self.keep = length if self.keep is None else min(self.keep, length)
        cut_frames(self.sent, self.length, length)
        self.length = length
        self.history.rollback(length)
        if self.chooser is not None:
            self.chooser.forget_from(length)

    def _run(self, hidden_states: np.ndarray, past_length: int, count: int, guess: bool = False, draft: int = 0,
             drafted: int = 0) -> list[Choice]:
        if self.opening is not None:
            opening, self.opening = self.opening, None
            opening.wait()
        if past_length != self.length:
            raise ValueError(f"this conversation holds {self.length} positions, the step continues {past_length}")
        frame = wire.encode(hidden_states.astype(WIRE_DTYPE, copy=False))
        seq = hidden_states.shape[1]
        if self.chooser is not None:  # private output: the tail samples nothing, so it drafts nothing
            draft = drafted = 0
        # A replayed session holds none of the drafts a step claims: the service then answers without new ones.
        reply = self.with_retries(lambda: self.send(frame, past_length, count, guess, draft, drafted))
        choices = self.read_step(reply, past_length + seq, count, draft)
        self.compute_seconds, self.draft_seconds = tail_seconds(reply)
        self.keep = None
        self.sent.append(frame)
        self.length += seq
        self.traffic.steps += 1
        self.first_step_done()
        first = past_length + seq - count
        for i, choice in enumerate(choices):
            self.history.add(choice.token, first + i)
        return choices

    def read_step(self, reply: Reply, length: int, count: int, draft: int = 0) -> list[Choice]:
        """The step's answer, checked: a JSON step result, or in private-output mode a frame of the final hidden
        states of the ``count`` sampled positions (chosen here, with the client's own LM head)."""
        if self.chooser is not None and count:
            try:
                hidden = wire.decode(reply.body)
            except WireError as e:
                raise ServiceError(f"the tail service sent a malformed hidden-state frame: {e}") from None
            expected = (1, count, self.bundle.manifest.model.hidden_size)
            if hidden.shape != expected or hidden.dtype.kind != "f" or not np.isfinite(hidden).all():
                raise ServiceError(f"the tail service sent a {hidden.dtype.name} frame of shape {list(hidden.shape)}; "
                                   f"expected a finite float frame of shape {list(expected)}")
            first = length - count
            return [self.chooser.choose(hidden.astype(np.float32)[0, i], first + i) for i in range(count)]
        result = parse(protocol.StepResult, reply, "step result")
        if result.length != length:
            raise ServiceError(f"the tail service says the session holds {result.length} positions after the step; "
                               f"expected {length}")
        if not count:
            return []
        if result.token is None:
            raise ServiceError("the tail service sent no token (null) for a step that asked for one")
        tokens, logprobs = (result.tokens, result.logprobs) if count > 1 else ([result.token], [result.logprob])
        if len(tokens) != count or len(logprobs) != count or tokens[-1] != result.token:
            raise ServiceError(f"the tail service sent {len(tokens)} tokens and {len(logprobs)} log-probabilities "
                               f"for a step that sampled {count} positions")
        vocab = self.bundle.manifest.model.vocab_size
        for token in (*tokens, *(t for t, _ in result.top_logprobs)):
            if not 0 <= token < vocab:
                raise ServiceError(f"the tail service sent token id {printable(str(token), 40)}; this model's "
                                   f"vocabulary is 0..{vocab - 1}")
        top = [tuple(t) for t in result.top_logprobs]
        guesses = self.read_guesses(result, tokens)
        choices = [Choice(token, logprob or 0.0, top if i == count - 1 else [], guess)
                   for i, (token, logprob, guess) in enumerate(zip(tokens, logprobs, guesses))]
        if result.drafts:
            self.check_drafts(result, count, draft)
            choices[result.drafts_after] = replace(choices[result.drafts_after], drafts=tuple(result.drafts))
        return choices

    def check_drafts(self, result: protocol.StepResult, count: int, asked: int) -> None:
        """The tail's drafts, checked like tokens (a draft only ever costs a verified position: the tail samples it
        like any other)."""
        if len(result.drafts) > asked:
            raise ServiceError(f"the tail service sent {len(result.drafts)} drafts; the step asked for {asked}")
        if not 0 <= result.drafts_after < count:
            raise ServiceError(f"the tail service sent drafts after token {printable(str(result.drafts_after), 40)} "
                               f"of a step that sampled {count}")
        vocab = self.bundle.manifest.model.vocab_size
        bad = next((t for t in result.drafts if not 0 <= t < vocab), None)
        if bad is not None:
            raise ServiceError(f"the tail service sent the draft {printable(str(bad), 40)}; this model's vocabulary "
                               f"is 0..{vocab - 1}")

    def read_guesses(self, result: protocol.StepResult, tokens: list[int]) -> list[tuple[int, float] | None]:
        """The look-ahead's guess after each token, checked like the tokens (a guess only ever costs a drafted
        position: the tail verifies it like any draft)."""
        if not result.guesses:
            return [None] * len(tokens)
        vocab = self.bundle.manifest.model.vocab_size
        if len(result.guesses) != len(tokens):
            raise ServiceError(f"the tail service sent {len(result.guesses)} guesses for {len(tokens)} tokens")
        for token, chance in result.guesses:
            if not (0 <= token < vocab and 0.0 <= chance <= 1.0):
                raise ServiceError(f"the tail service sent the guess ({printable(str(token), 40)}, "
                                   f"{printable(str(chance), 40)}); expected a token id below {vocab} and a chance "
                                   "in [0, 1]")
        return list(result.guesses)

    def send(self, frame: bytes, past_length: int, count: int, guess: bool = False, draft: int = 0,
             drafted: int = 0) -> Reply:
        if self.session_id is None:
            self.replay()
        headers = {"Content-Type": wire.MEDIA_TYPE, protocol.PAST_LENGTH_HEADER: str(past_length),
                   protocol.SAMPLE_HEADER: "1" if count else "0"}
        if count > 1:
            headers[protocol.SAMPLE_COUNT_HEADER] = str(count)
        if guess and count:
            headers[protocol.GUESS_HEADER] = "1"
        if draft and count:
            headers[protocol.DRAFT_HEADER] = str(draft)
        if drafted and count:
            headers[protocol.DRAFTED_HEADER] = str(drafted)
        if self.keep is not None:
            headers[protocol.KEEP_LENGTH_HEADER] = str(self.keep)
        return self.request("POST", protocol.steps_path(self.session_id), frame, headers)

    def replay(self) -> None:
        """A fresh session, fed every frame the lost one had (no sampling), so it holds the same KV cache."""
        self.keep = None  # the new session holds exactly the frames kept: nothing to roll back
        self.open_session()
        self.replays += 1
        self.traffic.replays += 1
        try:
            position = 0
            for frame in self.sent:
                seq = wire.decode(frame).shape[1]
                self.read_step(self.send(frame, position, 0), position + seq, 0)
                position += seq
        except Transient:
            self.abandon()  # half fed: useless to retry on
            raise
        if position:
            log.warning("tail session lost; replayed %d positions into a new session", position)

    def with_retries(self, action: Callable[[], T]) -> T:
        """Run ``action``; after a transient failure back off (exponential, jittered) and retry, within the budget.

        The budget is time (no retry starts later than ``retry_budget_s`` after the first try, so a call ends within
        ``retry_budget_s`` + ``timeout_s``) and, when set, a count (``retries``).
        """
        started = time.monotonic()
        failures = escalation = 0
        previous = None
        while True:
            try:
                return action()
            except Transient as e:
                failures += 1
                # A lost session right after failures to connect means the service is back: replay soon.
                escalation = 1 if e.session == "lost" and previous != "lost" else escalation + 1
                previous = e.session
                if e.session == "lost":
                    self.session_id = None
                elif e.session == "abandon":
                    self.abandon()
                wait = self.backoff(escalation, e.retry_after_s)
                spent = time.monotonic() - started
                out_of_count = self.settings.retries is not None and failures > self.settings.retries
                if out_of_count or spent + wait > self.settings.retry_budget_s:
                    raise TailUnreachable(f"tail service at {self.settings.server_url} unusable after {failures} "
                                          f"attempts over {spent:.1f} s: {e}") from None
                log.warning("%s; retrying in %.2f s (attempt %d)", e, wait, failures + 1)
                self.sleep(wait)

    def backoff(self, failures: int, retry_after_s: float | None) -> float:
        """Equal jitter: half the exponential delay, plus up to as much again at random (no synchronized storms)."""
        delay = min(FIRST_BACKOFF_S * 2 ** (failures - 1), MAX_BACKOFF_S)
        wait = delay / 2 + self.random.uniform(0, delay / 2)
        return max(wait, min(retry_after_s, MAX_BACKOFF_S)) if retry_after_s else wait

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Reply:
        reply = self.http.request(method, path, {**self.headers, **(headers or {})}, body, self.traffic)
        status = reply.status
        if 200 <= status < 300:
            return reply
        detail = error_detail(reply)
        if status == 404 and path != protocol.SESSIONS_PATH:
            raise Transient(f"the server lost session {self.session_id}", session="lost")
        if status == 409 and error_kind(reply) == "PositionMismatch":
            raise Transient(f"the session does not hold what this client sent ({detail})", session="abandon")
        if status in RETRYABLE_STATUS:
            raise Transient(f"the tail service answered {status}: {detail}", retry_after_s=retry_after(reply))
        raise ServiceError(f"tail service refused {method} {path}: {status} {detail}")

    def abandon(self) -> None:
        """Forget the current session and delete it on the server in the background (best effort)."""
        session_id, self.session_id = self.session_id, None
        if session_id is not None:
            self.http.defer(lambda: self.delete(session_id))

    def delete(self, session_id: str) -> None:
        self.http.request("DELETE", f"{protocol.SESSIONS_PATH}/{session_id}", self.headers,
                          timeout_s=min(self.settings.timeout_s, 5.0))

    def first_step_done(self) -> None:
        if not self.after_first_step:  # every step after the first: nothing to do
            return
        callbacks, self.after_first_step = self.after_first_step, []
        for callback in callbacks:
            callback()

    def close(self) -> None:
        """Delete the session on the server, off the caller's path (best effort); closing twice is harmless."""
        self.first_step_done()
        if self.opening is not None:
            opening, self.opening = self.opening, None
            opening.cancel()
            try:
                opening.wait()
            except Exception:  # it never opened: nothing to delete
                pass
        self.abandon()
        if self.owns_http:
            self.http.close()

    def traffic_report(self) -> str:
        return traffic_report(self.traffic.snapshot())


def tail_seconds(reply: Reply) -> tuple[float | None, float | None]:
    """The tail's run time for a step and its drafting time, from its ``Server-Timing: tail;dur=<ms>[,
    draft;dur=<ms>]`` header; None where absent or not in that form (they only size drafts: a wrong figure costs
    speed, never a token)."""
    match = SERVER_TIMING.fullmatch(reply.headers.get(protocol.SERVER_TIMING_HEADER.lower(), ""))
    if not match:
        return None, None
    return float(match.group(1)) / 1000, None if match.group(2) is None else float(match.group(2)) / 1000


def traffic_report(counts: tuple[int, int, int, int]) -> str:
    sent, received, steps, replays = counts
    return f"; sent {sent} B, received {received} B over {steps} steps; {replays} replays"


class Opening:
    """``open_session`` (with its retries) on a thread of its own; ``wait`` returns once it is done or re-raises.

    ``held``: the thread waits for ``release`` before opening (a long-lived client's next spare session opens after
    the current conversation's first token, not during it); ``wait`` releases it first. ``cancel`` before the
    release skips the open altogether (a spare closed unused).
    """

    def __init__(self, tail: RemoteTail, held: bool = False) -> None:
        self.error: BaseException | None = None
        self.go = threading.Event()
        self.cancelled = False
        if not held:
            self.go.set()
        self.thread = threading.Thread(target=self._run, args=(tail,), name="split-open-session", daemon=True)
        self.thread.start()

    def _run(self, tail: RemoteTail) -> None:
        self.go.wait()
        if self.cancelled:
            return
        try:
            tail.with_retries(tail.open_session)
        except BaseException as e:  # handed to the caller's thread in wait()
            self.error = e

    def release(self) -> None:
        self.go.set()

    def cancel(self) -> None:
        """Skip the open if it has not started (one already under way finishes; its session is then deleted)."""
        self.cancelled = True
        self.go.set()

    def wait(self) -> None:
        self.go.set()
        self.thread.join()
        if self.error is not None:
            raise self.error


def cut_frames(frames: list[bytes], held: int, length: int) -> None:
    """Cut ``frames`` (``held`` positions in all) to the first ``length`` positions, from the end: a rollback touches
    only the frames it undoes, not the whole conversation. A frame cut in two is re-encoded from its own fp16 bytes,
    so a replay still sends exactly what crossed before."""
    while frames and held > length:
        tensor = wire.decode(frames[-1])
        seq = tensor.shape[1]
        if held - seq >= length:
            frames.pop()
            held -= seq
        else:
            frames[-1] = wire.encode(tensor[:, : length - (held - seq)])
            held = length


def parse(model: type[M], reply: Reply, what: str) -> M:
    """A protocol body, strictly: garbage, missing or extra fields and wrong types are a ServiceError."""
    try:
        return model.model_validate_json(reply.body, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ServiceError(f"the tail service sent a malformed {what} ({len(e.errors())} problems; first: {where}: "
                           f"{printable(first['msg'], 120)}): {printable(reply.body.decode('utf-8', 'replace'), 80)!r}"
                           ) from None


def error_detail(reply: Reply) -> str:
    try:
        body = reply.json()
    except ValueError:
        return printable(reply.body.decode("utf-8", "replace"))
    detail = body.get("detail") if isinstance(body, dict) else None
    return printable(detail if isinstance(detail, str) else json.dumps(body))


def error_kind(reply: Reply) -> str | None:
    try:
        body = reply.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


def retry_after(reply: Reply) -> float | None:
    value = reply.headers.get("retry-after", "").strip()
    # Seconds as ASCII digits (str.isdigit also takes superscripts and other scripts' digits, float() does not).
    return float(value) if value.isascii() and value.isdigit() else None
