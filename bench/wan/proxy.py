"""A TCP proxy that holds every byte for a fixed one-way delay in each direction: a long link's latency on one
machine, where the kernel has no ``sch_netem`` for ``tc netem``.

Each direction is a queue of (due time, chunk): a chunk read at t is written at t + delay, in order, so bursts are
delayed but not serialised (the bandwidth is not limited). An RTT of r is a one-way delay of r / 2.

    python -m bench.wan.proxy --target 10.203.0.1:8000 --delay-ms 15

prints ``listening HOST PORT`` on stdout once it accepts connections, and exits when stdin, a pipe, closes (its
parent went away), on SIGTERM/SIGINT, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHUNK = 1 << 16
READY_TIMEOUT_S = 20.0


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy reader to writer, each chunk no earlier than ``delay_s`` after it was read; EOF travels the same way."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while True:
            try:
                data = await reader.read(CHUNK)
            except OSError:  # a reset ends this direction like an EOF (and the connection with it)
                data = b""
            queue.put_nowait((loop.time() + delay_s, data))
            if not data:
                return

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    reading = asyncio.ensure_future(read())
    try:
        await deliver()
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await reading


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()


class DelayProxy:
    """Accepts on ``listen`` and forwards each connection to ``target`` through two delayed pumps."""

    def __init__(self, target: tuple[str, int], delay_s: float) -> None:
        if delay_s < 0:
            raise ValueError(f"the delay must be >= 0 s, got {delay_s}")
        self.target, self.delay_s = target, delay_s
        self.connections = 0
        self.live: set[asyncio.Task] = set()

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        self.live.add(task)
        try:
            await self._forward(client_reader, client_writer)
        except asyncio.CancelledError:  # the proxy is stopping: drop the connection quietly
            pass
        finally:
            self.live.discard(task)

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError as e:
            log.warning("cannot reach %s:%d: %s", *self.target, e)
            await _close(client_writer)
            return
        pumps = [asyncio.ensure_future(_pump(client_reader, server_writer, self.delay_s)),
                 asyncio.ensure_future(_pump(server_reader, client_writer, self.delay_s))]
        try:
            # Both directions end at their EOF; a reset on either side ends both.
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            for pump in pending:
                pump.cancel()
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            await _close(server_writer)
            await _close(client_writer)

    async def stop(self) -> None:
        """Drop every open connection."""
        for task in list(self.live):
            task.cancel()
        await asyncio.gather(*self.live, return_exceptions=True)

    async def serve(self, host: str, port: int, started: asyncio.Future | None = None) -> asyncio.Server:
        server = await asyncio.start_server(self.handle, host, port)
        if started is not None:
            started.set_result(server.sockets[0].getsockname()[:2])
        return server


async def _main(args: argparse.Namespace) -> None:
    host, port = parse_address(args.listen)
    proxy = DelayProxy(parse_address(args.target), args.delay_ms / 1000)
    server = await proxy.serve(host, port)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print(f"listening {bound_host} {bound_port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    def stdin_readable() -> None:  # the parent holds our stdin: when it closes, the parent went away
        if not os.read(stdin, 4096):
            loop.remove_reader(stdin)
            stop.done() or stop.set_result(None)

    stdin = sys.stdin.fileno() if sys.stdin is not None else -1
    watch = stdin >= 0 and stat.S_ISFIFO(os.fstat(stdin).st_mode)
    if watch:
        loop.add_reader(stdin, stdin_readable)
    try:
        await asyncio.wait_for(stop, args.max_seconds)
    except TimeoutError:
        log.warning("proxy: %.0f s are up, stopping", args.max_seconds)
    if watch:
        loop.remove_reader(stdin)
    server.close()
    await proxy.stop()


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


@dataclass
class ProxyProcess:
    """``python -m bench.wan.proxy`` as a child process; ``address`` is where it listens."""

    process: subprocess.Popen
    host: str
    port: int
    delay_ms: float

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_proxy(target: str, delay_ms: float, listen: str = "127.0.0.1:0", max_seconds: float = 7200.0,
                python: str = sys.executable) -> ProxyProcess:
    """Start the proxy and wait (bounded) for its ``listening`` line."""
    command = [python, "-m", "bench.wan.proxy", "--listen", listen, "--target", target,
               "--delay-ms", str(delay_ms), "--max-seconds", str(max_seconds)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready: list[str] = []
    reader = threading.Thread(target=lambda: ready.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(READY_TIMEOUT_S)
    line = ready[0] if ready else ""
    if not line.startswith("listening "):
        proxy = ProxyProcess(process, "", 0, delay_ms)
        proxy.stop()
        raise RuntimeError(f"the delay proxy did not start within {READY_TIMEOUT_S:.0f} s (exit code "
                           f"{process.returncode}); its stderr is above")
    _, host, port = line.split()
    return ProxyProcess(process, host, int(port), delay_ms)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wan.proxy", description="TCP proxy with a one-way delay.")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept on (port 0: any free port)")
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay in each direction (RTT / 2)")
    p.add_argument("--max-seconds", type=float, default=7200.0, help="stop after this long whatever happens")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    started = time.monotonic()
    asyncio.run(_main(args))
    log.debug("proxy ran %.1f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
