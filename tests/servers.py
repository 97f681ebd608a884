"""Run the tail service as a real process on a free loopback port and wait until /readyz says 200."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    process: subprocess.Popen
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, as Kubernetes sends it; returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"no exit {timeout:.0f} s after SIGTERM; log:\n{self.output()[-3000:]}") from None


def start(command: list[str], env: dict[str, str], cwd: Path, port: int, log: Path, timeout: float = 120.0) -> Running:
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    running = Running(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{command} exited with {process.returncode}; log:\n{running.output()[-3000:]}")
        try:
            if httpx.get(f"{running.url}/readyz", timeout=2).status_code == 200:
                return running
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"{command} not ready after {timeout:.0f} s; log:\n{running.output()[-3000:]}")
