"""The tail behind HTTP: a session on the tail service, with replay when the session or the connection is lost.

The client keeps the hidden states it has sent (fp16, as sent). When the server forgets the session (restart, pod
replaced, TTL) or the connection drops, it opens a new session, replays those exact bytes in chunks, and retries
the step: the new server rebuilds the same KV cache, so greedy output is identical to an uninterrupted run. Replaying
the bytes already sent, rather than recomputing them, also keeps boundary noise from being re-drawn (which would
let an observer average it out).
"""

from __future__ import annotations

import logging
import secrets
import ssl
import time
from collections.abc import Callable

import httpx
import numpy as np

from client.settings import ClientSettings
from splitcore import protocol, wire
from splitcore.errors import SplitError
from splitcore.generation import TokenChooser
from splitcore.graphs import LmHeadRunner
from splitcore.manifest import Bundle
from splitcore.sampling import Choice, SamplingParams

log = logging.getLogger(__name__)

WIRE_DTYPE = np.float16
RETRYABLE_STATUS = {502, 503, 504}


class ServiceError(SplitError):
    """The tail service refused a request for a reason retrying will not fix."""


class TailUnreachable(ServiceError):
    """The tail service could not be reached (or kept failing) through every retry."""


class SessionLost(Exception):
    """The server no longer has our session (404) or could not be reached: replay into a new one."""


class Traffic:
    """Bytes on the wire in both directions, request and response bodies plus headers."""

    def __init__(self) -> None:
        self.sent = self.received = self.steps = 0

    def request(self, request: httpx.Request) -> None:
        self.sent += len(request.content) + sum(len(k) + len(v) + 4 for k, v in request.headers.raw) + 32

    def response(self, response: httpx.Response) -> None:
        response.read()
        self.received += len(response.content) + sum(len(k) + len(v) + 4 for k, v in response.headers.raw) + 16


class RemoteTail:
    """A TailLink that runs the tail on the service; one instance is one conversation."""

    def __init__(self, bundle: Bundle, settings: ClientSettings, params: SamplingParams,
                 lm_head: LmHeadRunner | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.bundle = bundle
        # Private-output mode: the service returns the final hidden state and the token is chosen here.
        self.chooser = TokenChooser(params, lm_head) if bundle.manifest.output_mode == "hidden" else None
        self.settings = settings
        self.params = params
        self.sleep = sleep
        self.traffic = Traffic()
        # The affinity key lives as long as this conversation, replays included (a replay after a lost replica
        # hashes to a live one).
        headers = {protocol.MANIFEST_HEADER: bundle.manifest_sha256,
                   protocol.AFFINITY_HEADER: secrets.token_urlsafe(12)}
        if settings.token:
            headers["Authorization"] = f"Bearer {settings.token}"
        verify: ssl.SSLContext | bool = True
        if settings.ca_cert:
            verify = ssl.create_default_context(cafile=str(settings.ca_cert))
        self.http = httpx.Client(
            base_url=settings.server_url.rstrip("/"), headers=headers, timeout=settings.timeout_s, verify=verify,
            event_hooks={"request": [self.traffic.request], "response": [self.traffic.response]},
        )
        self.session_id: str | None = None
        self.sent: list[bytes] = []  # fp16 hidden-state frames of every position the server holds, in order
        self.length = 0
        self.generated: list[int] = []
        self.replays = 0

    @classmethod
    def open(cls, bundle: Bundle, settings: ClientSettings, params: SamplingParams,
             lm_head: LmHeadRunner | None = None) -> RemoteTail:
        tail = cls(bundle, settings, params, lm_head)
        tail.with_retries(tail.open_session)
        return tail

    def open_session(self) -> None:
        body = protocol.OpenSession(
            manifest_sha256=self.bundle.manifest_sha256,
            max_length=self.settings.max_length,
            sampling=protocol.Sampling(**vars(self.params)),
            generated=self.generated,
        )
        response = self.request("POST", protocol.SESSIONS_PATH, json=body.model_dump())
        self.session_id = protocol.SessionOpened.model_validate(response.json()).session_id
        log.debug("opened session %s", self.session_id)

    def step(self, hidden_states: np.ndarray, past_length: int, sample: bool = True) -> Choice | None:
        if past_length != self.length:
            raise ValueError(f"this conversation holds {self.length} positions, the step continues {past_length}")
        frame = wire.encode(hidden_states.astype(WIRE_DTYPE, copy=False))
        result = self.with_retries(lambda: self.send(frame, past_length, sample))
        self.sent.append(frame)
        self.length += hidden_states.shape[1]
        self.traffic.steps += 1
        if not sample:
            return None
        if self.chooser is not None:
            choice = self.chooser.choose(wire.decode(result).astype(np.float32)[0, -1])
            self.generated.append(choice.token)
            return choice
        result = protocol.StepResult.model_validate_json(result)
        assert result.token is not None
        self.generated.append(result.token)
        return Choice(result.token, result.logprob or 0.0, [tuple(t) for t in result.top_logprobs])

    def send(self, frame: bytes, past_length: int, sample: bool) -> bytes:
        """The raw answer: a JSON step result, or in private-output mode a frame of the final hidden state."""
        if self.session_id is None:
            self.replay()
        response = self.request(
            "POST", protocol.steps_path(self.session_id), content=frame,
            headers={"Content-Type": wire.MEDIA_TYPE, protocol.PAST_LENGTH_HEADER: str(past_length),
                     protocol.SAMPLE_HEADER: "1" if sample else "0"},
        )
        return response.content

    def replay(self) -> None:
        """A fresh session, fed every frame the lost one had (no sampling), so it holds the same KV cache."""
        self.session_id = None
        self.open_session()
        self.replays += 1
        position = 0
        for frame in self.sent:
            self.send(frame, position, sample=False)
            position += wire.decode(frame).shape[1]
        log.warning("tail session lost; replayed %d positions into a new session", position)

    def with_retries(self, action):
        """Run ``action``; on a lost session or connection, back off, replay and retry, a bounded number of times."""
        delay = 0.25
        for attempt in range(self.settings.retries + 1):
            try:
                return action()
            except SessionLost as e:
                if attempt == self.settings.retries:
                    raise TailUnreachable(
                        f"tail service at {self.settings.server_url} unusable after {attempt + 1} attempts: {e}"
                    ) from None
                log.warning("%s; retrying in %.2f s (%d/%d)", e, delay, attempt + 1, self.settings.retries)
                self.sleep(delay)
                delay = min(delay * 2, 5.0)
                self.session_id = None
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            where = self.settings.server_url
            raise SessionLost(f"cannot reach the tail service at {where} ({type(e).__name__})") from e
        if response.status_code == 404 and self.session_id is not None:
            raise SessionLost(f"the server lost session {self.session_id}")
        if response.status_code in RETRYABLE_STATUS:
            raise SessionLost(f"the tail service answered {response.status_code}: {error_detail(response)}")
        if response.status_code >= 400:
            raise ServiceError(f"tail service refused {method} {path}: {response.status_code} {error_detail(response)}")
        return response

    def close(self) -> None:
        """Delete the session on the server (best effort); closing twice is harmless."""
        session_id, self.session_id = self.session_id, None
        if session_id is not None and not self.http.is_closed:
            try:
                self.http.delete(f"{protocol.SESSIONS_PATH}/{session_id}")
            except httpx.HTTPError:
                pass
        self.http.close()

    def traffic_report(self) -> str:
        t = self.traffic
        return f"; sent {t.sent} B, received {t.received} B over {t.steps} steps; {self.replays} replays"


def error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        return body.get("detail") or str(body)
    except ValueError:
        return response.text[:200]
