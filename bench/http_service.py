"""Config (d)'s plumbing: the tail service in a child process on a free loopback port, and RemoteTail links to it.

Written against the interfaces the client already names (``python -m services`` with ``SPLIT_SERVER_BUNDLE``, as
in the Makefile's ``serve``; ``client.remote.RemoteTail.open(bundle, settings, params)``, as in client/cli.py).
Traffic counters are read from ``RemoteTail.traffic``.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from splitcore.errors import SplitError
from splitcore.manifest import load_bundle
from splitcore.sampling import SamplingParams

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


@dataclass
class Service:
    process: subprocess.Popen
    url: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_service(server_bundle: Path, timeout_s: float = 300.0, settings: dict[str, str] | None = None) -> Service:
    """``settings``: extra SPLIT_SERVER_* variables for this run (e.g. the slot length)."""
    port = _free_port()
    # No drain period: the benchmark stops the service only when it is done with it.
    # The service's own per-session lines would bury the benchmark's progress display.
    env = {**os.environ, "SPLIT_SERVER_BUNDLE": str(server_bundle), "SPLIT_SERVER_DRAIN_S": "0",
           "SPLIT_SERVER_LOG_LEVEL": os.environ.get("SPLIT_SERVER_LOG_LEVEL", "WARNING"), **(settings or {})}
    command = [sys.executable, "-m", "services", "--host", HOST, "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SplitError(f"tail service exited with code {process.returncode} before listening on port {port}")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return Service(process, f"http://{HOST}:{port}")
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SplitError(f"tail service did not listen on {HOST}:{port} within {timeout_s:.0f} s")


class RemoteTailFactory:
    """One RemoteTail (one server session) per generation; traffic summed over all of them."""

    def __init__(self, client_dir: Path, url: str) -> None:
        from client.settings import ClientSettings

        self.bundle = load_bundle(client_dir, "client")
        self.settings = ClientSettings(bundle=client_dir, server_url=url)
        self.tails: list = []

    def open(self, params: SamplingParams):
        from client.remote import RemoteTail

        if self.tails:
            self.tails[-1].close()  # its generation is over: free the server's session
        tail = RemoteTail.open(self.bundle, self.settings, params)
        self.tails.append(tail)
        return tail

    def traffic(self) -> dict[str, int] | None:
        if not self.tails:
            return None
        return {"sent": sum(t.traffic.sent for t in self.tails),
                "received": sum(t.traffic.received for t in self.tails)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]
