"""HTTP to the tail service: one connection pool per process and tail URL, a hard deadline per request, capped reads.

A per-read timeout does not bound a request: a server that trickles one byte a second never trips a 10 s read
timeout. The pool's sockets therefore take each read's timeout from the deadline of the request the calling thread is
making, so a request ends at its deadline whatever the server does. What the client reads is capped the same way:
a body larger than ``max_response_bytes`` is refused, not buffered.

The pool (and its TLS context, ~33 ms to build) lives as long as the process talks to that tail, shared by every
conversation. Deleting a finished session is deferred to a background thread so that the next conversation's first
token does not wait for it.
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpcore

from splitcore.errors import SplitError

KEEPALIVE_EXPIRY_S = 4.0
log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
CLOSE_DRAIN_S = 2.0  # how long closing the client waits for deferred session deletes


class ServiceError(SplitError):
    """The tail service refused a request, or answered something retrying will not fix."""


class TailUnreachable(ServiceError):
    """The tail service could not be reached (or kept failing) through every retry."""


class Transient(Exception):
    """A failure worth retrying after a pause: no connection, a deadline passed, a 5xx gateway error, a lost session.

    ``session`` says what the failure means for the session the request was about: "keep" (it may still be fine:
    retry it first), "lost" (the server no longer has it) or "abandon" (it cannot be trusted any more: delete it).
    """

    def __init__(self, message: str, session: str = "keep", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.session = session
        self.retry_after_s = retry_after_s


class Traffic:
    """Bytes on the wire in both directions (bodies, headers and an estimate of the request and status lines)."""

    def __init__(self) -> None:
        self.sent = self.received = self.steps = self.replays = 0

    def snapshot(self) -> tuple[int, int, int, int]:
        return self.sent, self.received, self.steps, self.replays


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> object:
        """The body as JSON; ValueError for anything else, a body nested too deep for the parser included."""
        try:
            return json.loads(self.body)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def printable(text: str, limit: int = 200) -> str:
    """Server-provided text made safe for one line of a terminal: no newlines or control characters, bounded."""
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text if len(text) <= limit else text[:limit] + "..."


def ssl_context(ca_cert: Path | None) -> ssl.SSLContext:
    """The TLS context of a pool: the system's trust store, or only ``ca_cert`` when one is given."""
    try:
        return ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    except (OSError, ssl.SSLError) as e:
        raise SplitError(f"cannot use the CA certificate {ca_cert}: {e.strerror or e}; pass a PEM file") from None


class _Deadlines(httpcore.NetworkBackend):
    """The default socket backend, with every connect, read and write bounded by the calling thread's deadline."""

    def __init__(self) -> None:
        self.inner = httpcore.SyncBackend()
        self.local = threading.local()

    def set(self, deadline: float | None) -> None:
        self.local.deadline = deadline

    def bound(self, timeout: float | None, error: type[Exception]) -> float | None:
        deadline = getattr(self.local, "deadline", None)
        if deadline is None:
            return timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise error("request deadline passed")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):  # noqa: ANN001
        timeout = self.bound(timeout, httpcore.ConnectTimeout)
        return _Stream(self.inner.connect_tcp(host, port, timeout, local_address, socket_options), self)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):  # noqa: ANN001
        return _Stream(self.inner.connect_unix_socket(path, self.bound(timeout, httpcore.ConnectTimeout),
                                                      socket_options), self)

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, deadlines: _Deadlines) -> None:
        self.inner = inner
        self.deadlines = deadlines

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self.deadlines.bound(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self.deadlines.bound(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):  # noqa: ANN001
        timeout = self.deadlines.bound(timeout, httpcore.ConnectTimeout)
        return _Stream(self.inner.start_tls(ssl_context, server_hostname, timeout), self.deadlines)

    def get_extra_info(self, info: str) -> object:
        return self.inner.get_extra_info(info)


def certificate_problem(error: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a connection failure, if that is what it was (retrying will not fix it)."""
    seen = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class TailClient:
    """The connections to one tail service, shared by every conversation (and thread) of this process."""

    def __init__(self, base_url: str, ca_cert: Path | None = None, timeout_s: float = 60.0,
                 max_response_bytes: int = 1 << 20) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self.deadlines = _Deadlines()
        context = ssl_context(ca_cert) if self.base_url.startswith("https:") else None
        # Idle connections are dropped before the service would close them (its keep-alive is 5 s by default, as
        # uvicorn's), so a request is never sent on a connection the server is closing at that moment.
        self.pool = httpcore.ConnectionPool(ssl_context=context, max_keepalive_connections=16,
                                            keepalive_expiry=KEEPALIVE_EXPIRY_S, network_backend=self.deadlines)
        self.chores: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.worker: threading.Thread | None = None
        self.lock = threading.Lock()

    def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"",
                traffic: Traffic | None = None, timeout_s: float | None = None) -> Reply:
        """One request, ended by its deadline; raises Transient for transport failures, ServiceError for the rest."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        url = self.base_url + path
        raw_headers = [(k.encode(), v.encode()) for k, v in headers.items()]
        if traffic is not None:
            traffic.sent += len(body) + sum(len(k) + len(v) + 4 for k, v in raw_headers) + len(url) + 32
        deadline = time.monotonic() + timeout
        self.deadlines.set(deadline)
        try:
            reply = self._exchange(method, url, raw_headers, body, timeout)
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.RemoteProtocolError) as e:
            problem = certificate_problem(e)
            if problem is not None:
                raise ServiceError(f"TLS with {self.base_url} failed: {printable(str(problem))}; "
                                   "pass the service's CA with --ca-cert") from None
            if time.monotonic() >= deadline or isinstance(e, httpcore.TimeoutException):
                raise Transient(f"no complete answer to {method} {path} within the {timeout:g} s deadline") from None
            what = printable(str(e)) or type(e).__name__
            raise Transient(f"cannot reach the tail service at {self.base_url} ({type(e).__name__}: {what})") from None
        except (httpcore.UnsupportedProtocol, httpcore.LocalProtocolError) as e:
            raise ServiceError(f"cannot send {method} {url}: {printable(str(e))}") from None
        finally:
            self.deadlines.set(None)
        if traffic is not None:
            traffic.received += len(reply.body) + sum(len(k) + len(v) + 4 for k, v in reply.headers.items()) + 16
        if 300 <= reply.status < 400:
            where = printable(reply.headers.get("location", "nowhere"))
            raise ServiceError(f"the tail service redirected {method} {path} ({reply.status}) to {where}; the client "
                               "does not follow redirects: set the server URL to the service's own address")
        return reply

    def _exchange(self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes,
                  timeout: float) -> Reply:
        limit = self.max_response_bytes
        extensions = {"timeout": {"connect": min(timeout, CONNECT_TIMEOUT_S), "read": timeout, "write": timeout,
                                  "pool": timeout}}
        with self.pool.stream(method, url, headers=headers, content=body, extensions=extensions) as response:
            names = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
            declared = names.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ServiceError(f"the tail service's answer to {method} {url} declares {declared} bytes, more "
                                   f"than the {limit} this client reads")
            data = bytearray()
            for chunk in response.iter_stream():
                data += chunk
                if len(data) > limit:
                    raise ServiceError(f"the tail service's answer to {method} {url} is longer than the {limit} "
                                       "bytes this client reads")
        return Reply(response.status, names, bytes(data))

    def defer(self, chore: Callable[[], None]) -> None:
        """Run ``chore`` on the background thread (best effort: its errors are logged and dropped)."""
        with self.lock:
            if self.worker is None:
                self.worker = threading.Thread(target=self._work, name="tail-closer", daemon=True)
                self.worker.start()
        self.chores.put(chore)

    def _work(self) -> None:
        while (chore := self.chores.get()) is not None:
            try:
                chore()
            except Exception as e:  # noqa: BLE001 - best effort by design; the session expires on its own
                log.debug("deferred request failed: %s", e)

    def close(self, drain_s: float = CLOSE_DRAIN_S) -> None:
        """Finish deferred chores (at most ``drain_s``), then close the connections."""
        with self.lock:
            worker, self.worker = self.worker, None
        if worker is not None:
            self.chores.put(None)
            worker.join(drain_s)
        self.pool.close()
