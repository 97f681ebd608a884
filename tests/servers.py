"""Real servers on loopback for tests: uvicorn in a thread, or `python -m services` (or an image's exact command)
as a child process, waited on until /readyz says 200."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from services.app import create_app
from services.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 60.0, verify=True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"service at {url} not ready after {timeout} s")


@contextmanager
def service_thread(bundle: Path, **settings):
    """The app from create_app, served by uvicorn on a free port in this process; yields the base URL."""
    port = free_port()
    app = create_app(ServerSettings(bundle=bundle, host="127.0.0.1", port=port, **settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def start_service_process(bundle: Path, port: int, **env: str) -> subprocess.Popen:
    """`python -m services` exactly as a user runs it, configured through SPLIT_SERVER_* variables."""
    environment = {**os.environ, "SPLIT_SERVER_BUNDLE": str(bundle), "SPLIT_SERVER_PORT": str(port),
                   "SPLIT_SERVER_HOST": "127.0.0.1", **env}
    return subprocess.Popen([sys.executable, "-m", "services"], cwd=ROOT, env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


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
