"""A fake tail service on loopback for client tests: speaks the session protocol with canned tokens, or misbehaves.

Plain asyncio in a thread, so a test can answer with anything at the byte level: garbage, redirects, endless or
trickling bodies. ``FakeTail.step`` (and ``opened``) decide each answer; the default follows the protocol, with the
next token ``token_for(length)``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from splitcore import protocol, wire


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drip_s: float | None = None  # send the whole answer one byte at a time, this far apart
    delay_s: float = 0.0  # wait before answering
    endless: bool = False  # a chunked body that never ends

    @classmethod
    def json(cls, body: object, status: int = 200, headers: dict[str, str] | None = None, **kw) -> Answer:
        return cls(status, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}, **kw)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def token_for(length: int) -> int:
    return 40 + length % 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeTail:
    """``step(request, session_length) -> Answer | None`` overrides step answers (None: the normal one)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.requests: list[Request] = []
        self.sessions: dict[str, int] = {}
        self.connections = 0
        self.step: Callable[[Request, int], Answer | None] = lambda request, length: None
        self.opened: Callable[[Request], Answer | None] = lambda request: None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self, method: str) -> list[str]:
        return [r.path for r in self.requests if r.method == method]

    def start(self) -> FakeTail:
        ready = threading.Event()
        self.loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            server = self.loop.run_until_complete(asyncio.start_server(self.handle, "127.0.0.1", self.port))
            self.server = server
            ready.set()
            self.loop.run_forever()
            server.close()
            for writer in list(self.writers):
                writer.transport.abort()
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(server.wait_closed())
            self.loop.close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(10), "fake tail did not start"
        return self

    def stop(self) -> None:
        """Like ``kill -9``: the listener and every connection go, and with them every session."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop = None
        self.sessions.clear()

    def __enter__(self) -> FakeTail:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    return
                self.requests.append(request)
                await self.answer(writer, self.route(request))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def route(self, request: Request) -> Answer:
        parts = request.path.strip("/").split("/")
        if request.method == "POST" and request.path == protocol.SESSIONS_PATH:
            custom = self.opened(request)
            if custom is not None:
                return custom
            body = json.loads(request.body)
            session_id = secrets.token_urlsafe(8)
            self.sessions[session_id] = 0
            return Answer.json({"session_id": session_id, "max_length": body.get("max_length") or 64,
                                "idle_ttl_s": 60.0, "provider": "fake"}, 201)
        if request.method == "DELETE" and len(parts) == 3:
            self.sessions.pop(parts[2], None)
            return Answer(204)
        if request.method == "POST" and len(parts) == 4 and parts[3] == "steps":
            if parts[2] not in self.sessions:
                return Answer.json({"error": "SessionNotFound", "detail": "unknown session"}, 404)
            length = self.sessions[parts[2]]
            custom = self.step(request, length)
            if custom is not None:
                return custom
            if "x-keep-length" in request.headers:  # a speculative step rolled back (trusted here)
                length = min(length, int(request.headers["x-keep-length"]))
            past = int(request.headers["x-past-length"])
            if past != length:
                return Answer.json({"error": "PositionMismatch", "detail": f"past {past} != {length}"}, 409)
            length += wire.decode(request.body).shape[1]
            self.sessions[parts[2]] = length
            sample = request.headers.get("x-sample", "1") == "1"
            count = int(request.headers.get("x-sample-count", "1"))
            tokens = [token_for(length - count + 1 + i) for i in range(count)]
            return Answer.json({"token": tokens[-1] if sample else None, "logprob": -0.5, "top_logprobs": [],
                                "length": length, "tokens": tokens if sample else [],
                                "logprobs": [-0.5] * count if sample else []})
        return Answer.json({"detail": "not found"}, 404)

    async def answer(self, writer: asyncio.StreamWriter, answer: Answer) -> None:
        await asyncio.sleep(answer.delay_s)
        headers = dict(answer.headers)
        if answer.endless:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers.setdefault("Content-Length", str(len(answer.body)))
        head = f"HTTP/1.1 {answer.status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        data = head.encode("latin-1") + (b"" if answer.endless else answer.body)
        if answer.drip_s is not None:
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
                await asyncio.sleep(answer.drip_s)
            return
        writer.write(data)
        await writer.drain()
        if answer.endless:
            chunk = b"x" * 65536
            while True:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    line = await reader.readline()
    if not line:
        return None
    method, path, _ = line.decode().split(" ", 2)
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, value = line.decode().split(":", 1)
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return Request(method, path, headers, body)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
