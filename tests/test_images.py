"""The images' exact commands, parsed from the Dockerfiles, run here against a CPU bundle: the server one gets ready
on a loopback port, answers its HEALTHCHECK, drains and exits 0 on SIGTERM; the client one talks to it.

What differs from the container: ``python`` is this interpreter, and the bundle path, port, host and provider are
overridden (no CUDA, no /bundles here). Everything else comes from the Dockerfile's ENV.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import onnxruntime as ort
import pytest
from conftest import TINY
from dockerfiles import last_stage, parse
from servers import free_port, start
from test_k8s_lint import ROOT

SERVER = last_stage(parse(ROOT / "Dockerfile.server"))
CLIENT = last_stage(parse(ROOT / "Dockerfile.client"))
TOKEN = "test-token-0123456789abcdef"


def local(command: list[str]) -> list[str]:
    assert command[0] == "python", f"the image command should start with its python: {command}"
    return [sys.executable, *command[1:]]


def image_env(stage, **overrides: str) -> dict[str, str]:
    """This environment without any SPLIT_* variable, plus the image's SPLIT_* ENV, plus overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLIT_")}
    env.update({k: v for k, v in stage.env.items() if k.startswith("SPLIT_")})
    env.update(overrides)
    return env


@pytest.fixture(scope="module")
def tiny(export_bundle):
    return export_bundle(TINY, 2)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA")
def test_server_command_without_a_gpu_exits_with_one_clear_line(tiny):
    env = image_env(SERVER, SPLIT_SERVER_BUNDLE=str(tiny / "server"), SPLIT_SERVER_PORT=str(free_port()))
    result = subprocess.run(local(SERVER.command), env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("services: error:") and "CUDAExecutionProvider" in lines[0]


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    port = free_port()
    env = image_env(
        SERVER, SPLIT_SERVER_BUNDLE=str(tiny / "server"), SPLIT_SERVER_PORT=str(port), SPLIT_SERVER_HOST="127.0.0.1",
        SPLIT_SERVER_PROVIDERS='["CPUExecutionProvider"]', SPLIT_SERVER_TOKEN=TOKEN, SPLIT_SERVER_DRAIN_S="1",
        SPLIT_SERVER_GRACEFUL_SHUTDOWN_S="5",
    )
    running = start(local(SERVER.command), env, ROOT, port, tmp_path_factory.mktemp("server") / "service.log")
    yield running, env
    if running.process.poll() is None:
        running.process.kill()


def test_server_command_is_ready_and_passes_its_healthcheck(served):
    running, env = served
    ready = httpx.get(f"{running.url}/readyz").json()
    assert ready["status"] == "ready" and ready["provider"] == "CPUExecutionProvider", ready
    assert ready["io_binding"] is False
    check = subprocess.run(local(SERVER.healthcheck), env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


def test_client_command_talks_to_the_service_and_matches_local(served, tiny):
    running, _ = served
    env = image_env(CLIENT, SPLIT_CLIENT_BUNDLE=str(tiny / "client"), SPLIT_CLIENT_SERVER_URL=running.url,
                    SPLIT_CLIENT_TOKEN=TOKEN, SPLIT_CLIENT_MAX_NEW_TOKENS="8")
    outputs = []
    for extra in ([], ["--local"]):
        result = subprocess.run([*local(CLIENT.command), *extra, "hello"], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1] and outputs[0].endswith("\n")
    wrong = subprocess.run([*local(CLIENT.command), "hello"], env={**env, "SPLIT_CLIENT_TOKEN": "wrong"}, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "Bearer" in wrong.stderr + wrong.stdout, wrong.stderr


def test_sigterm_drains_then_exits_zero(served):
    """Runs last in this module: it stops the service."""
    running, _ = served
    running.process.send_signal(signal.SIGTERM)
    statuses = set()
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        try:
            statuses.add(httpx.get(f"{running.url}/readyz", timeout=1).status_code)
        except httpx.TransportError:
            break
        time.sleep(0.05)
    assert 503 in statuses, f"/readyz during the drain answered {statuses}"
    assert running.process.wait(30) == 0, running.output()[-2000:]
    assert "draining" in running.output()
