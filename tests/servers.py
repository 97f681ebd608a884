"""Real servers on loopback for tests: uvicorn in a thread (any app: the tail service, the gateway), or
`python -m services`, `python -m client serve` or an image's exact command as a child process, waited on until a
readiness path says 200."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from services.app import create_app
from services.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 60.0, verify=True, path: str = "/readyz",
               headers: dict[str, str] | None = None, alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until ``path`` answers 200; fail early when ``alive`` says the server is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}{path}", timeout=1.0, verify=verify, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if not alive():
            raise AssertionError(f"server for {url} stopped before {path} answered")
        time.sleep(0.1)
    raise TimeoutError(f"service at {url} not ready after {timeout} s")


@contextmanager
def serve_app(make_app: Callable[[int], FastAPI], ready_path: str = "/readyz",
              headers: dict[str, str] | None = None) -> Iterator[str]:
    """uvicorn on a free loopback port in a thread, serving ``make_app(port)``; yields the base URL once
    ``ready_path`` answers 200."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(port), host="127.0.0.1", port=port, log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, path=ready_path, headers=headers, alive=thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def service_thread(bundle: Path, **settings) -> Iterator[str]:
    """The tail service's app, served by uvicorn on a free port in this process; yields the base URL."""
    with serve_app(lambda port: create_app(ServerSettings(bundle=bundle, host="127.0.0.1", port=port,
                                                          **settings))) as url:
        yield url


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


def start(command: list[str], env: dict[str, str], cwd: Path, port: int, log: Path, timeout: float = 120.0,
          ready_path: str = "/readyz") -> Running:
    """``command`` as a child process, its stdout and stderr in ``log``; returns once ``ready_path`` answers 200."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    running = Running(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{command} exited with {process.returncode}; log:\n{running.output()[-3000:]}")
        try:
            if httpx.get(f"{running.url}{ready_path}", timeout=2).status_code == 200:
                return running
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"{command} not ready after {timeout:.0f} s; log:\n{running.output()[-3000:]}")
