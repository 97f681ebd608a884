"""What stands between a socket and the handlers: auth before the body, bounded bodies, and connection deadlines.

``Guard`` is the outermost ASGI middleware of the session API. It checks the bearer token from the headers alone,
refuses a body larger than the route's limit (declared or actual) and one that does not arrive within
``body_timeout_s``, and reads the body before any handler parses it. It also answers an unexpected exception with a
500 JSON body instead of letting it reach the server (which would close the connection and lose the client's next
request, typically the DELETE of its session).

``GuardedH11Protocol`` closes a connection whose request head does not arrive within ``head_timeout_s`` of the
connection opening or of the previous response (idle openers and slowloris); uvicorn's ``timeout_keep_alive`` and
h11's head size limit do the rest (see ``uvicorn_options``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

from services.settings import ServerSettings
from splitcore import protocol

log = logging.getLogger(__name__)

API_PREFIX = protocol.SESSIONS_PATH


class Guard:
    def __init__(self, app, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self.token = settings.token.get_secret_value().encode() if settings.token else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"started": False}

        async def tracked_send(message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            if scope["path"].startswith(API_PREFIX):
                refusal, receive = await self._admit(scope, receive)
                if refusal is not None:
                    await _respond(scope, tracked_send, *refusal)
                    return
            await self.app(scope, receive, tracked_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not state["started"]:
                await _respond(scope, tracked_send, 500, "InternalError",
                               "internal error; the server log has the details")

    async def _admit(self, scope, receive):
        """(status, error, detail[, headers]) to refuse with, or None and a receive that replays the read body."""
        headers = dict(scope["headers"])
        if self.token is not None:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given, self.token):
                return (401, "Unauthorized", "this server needs 'Authorization: Bearer <token>' with the configured "
                        "token", {"WWW-Authenticate": "Bearer"}), receive
        if scope["method"] != "POST":
            return None, receive
        limit = self.settings.max_open_bytes if scope["path"] == API_PREFIX else self.settings.max_body_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return (413, "PayloadTooLarge", f"body of {int(declared)} bytes exceeds the limit of {limit}"), receive
        try:
            body = await asyncio.wait_for(_read(receive, limit), self.settings.body_timeout_s)
        except TimeoutError:
            late = f"the body did not arrive within {self.settings.body_timeout_s:g} s"
            return (408, "RequestTimeout", late), receive
        if body is None:
            return (413, "PayloadTooLarge", f"body exceeds the limit of {limit} bytes"), receive
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay


async def _read(receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _respond(scope, send, status: int, error: str, detail: str, headers: dict | None = None) -> None:
    app = scope.get("app")
    service = getattr(getattr(app, "state", None), "service", None)
    if service is not None:
        service.metrics.errors.labels(str(status)).inc()
    log.info("%s %s -> %d: %s", scope.get("method"), scope.get("path"), status, detail,
             extra={"status": status, "path": scope.get("path")})
    body = json.dumps({"error": error, "detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def guarded_protocol(head_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections that do not send a request head in time."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            awaited = self.cycle  # the head has arrived once uvicorn starts a new request cycle

            def expire() -> None:
                idle = self.cycle is None or self.cycle.response_complete  # never cut a request being served
                if self.cycle is awaited and idle and not self.transport.is_closing():
                    log.debug("closing a connection that sent no request head in %.0f s", head_timeout_s)
                    self.transport.close()

            self._head_timer = self.loop.call_later(head_timeout_s, expire)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._head_timer.cancel()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


def uvicorn_options(settings: ServerSettings) -> dict:
    """Connection limits of the settings as uvicorn.Config arguments (used by the entry point and the tests)."""
    return {
        "http": guarded_protocol(settings.head_timeout_s),
        "timeout_keep_alive": settings.keep_alive_s,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "limit_concurrency": settings.max_connections,
    }
