"""The largest request body the gateway reads: a larger one is refused with 413 before it is buffered or parsed.

Prompts are JSON text; an 8 MiB one took 7 s and 1.8 GB to encode before its context check could refuse it. The
body is read here in full (a request is small by then) and handed on, so the app's own reads never see more.
(FastAPI 0.165's own ``max_body_size`` answers a body that outgrows it while being read in plain text, not in
OpenAI's error shape, and the gateway supports FastAPI from 0.110.)
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from client.gateway.errors import APIError, respond


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        announced = dict(scope.get("headers") or []).get(b"content-length")
        if announced is not None and announced.isdigit() and int(announced) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"the request body is larger than this gateway's limit of {self.limit} bytes "
                         "(SPLIT_GATEWAY_MAX_BODY_BYTES)", code="request_too_large")
        await respond(error)(scope, receive, send)
