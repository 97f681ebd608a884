"""The images' exact commands, parsed from the Dockerfiles, run here against a CPU bundle: the server one gets ready
on a loopback port, answers its HEALTHCHECK, drains and exits 0 on SIGTERM; the client one talks to it.

What differs from the container: ``python`` is this interpreter, and the bundle path, port, host and provider are
overridden (no CUDA, no /bundles here). Everything else comes from the Dockerfile's ENV.
"""

from __future__ import annotations

import os
import re
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_server_command_is_ready_and_passes_its_healthcheck(served):
    running, env = served
    ready = httpx.get(f"{running.url}/readyz").json()
    assert ready["status"] == "ready" and ready["provider"] == "CPUExecutionProvider", ready
    check = subprocess.run(local(SERVER.healthcheck), env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- The image build and its smoke test (scripts/images/): what can be checked without an engine ----

BUILT = {"Dockerfile.server": parse(ROOT / "Dockerfile.server"), "Dockerfile.client": parse(ROOT / "Dockerfile.client")}


def test_dockerfiles_need_no_frontend_from_a_registry():
    """A `# syntax=` line makes BuildKit pull its Dockerfile frontend: impossible without a registry."""
    for name in BUILT:
        text = (ROOT / name).read_text()
        assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE), name


def test_every_pip_install_takes_its_index_from_an_arg_and_the_ca_from_the_build_secret():
    for name, stages in BUILT.items():
        for stage in stages.values():
            for run in (r for r in stage.run if "pip install" in r):
                assert "://" not in run, f"{name} {stage.name}: a URL in a RUN step; make it an ARG: {run}"
                assert run.startswith("--mount=type=secret,id=pip-ca"), f"{name} {stage.name}: {run}"
                for command in run.split("&&"):
                    if "pip install" in command:
                        assert re.search(r'--index-url "\$\{?[A-Z_]*INDEX_URL\}?"', command), command
                        assert "--no-cache-dir" in command, f"pip's cache would stay in the layer: {command}"


def test_runtime_images_keep_no_installer():
    for stage in (SERVER, CLIENT):
        assert "pip uninstall --quiet --yes pip setuptools" in " ".join(stage.run), stage.name


@pytest.fixture(scope="module")
def images_scripts():
    sys.path.insert(0, str(ROOT / "scripts" / "images"))
    import engine
    import smoke
    yield engine, smoke
    sys.path.remove(str(ROOT / "scripts" / "images"))


def test_smoke_runs_the_tail_as_the_deployment_does(images_scripts, tmp_path):
    _, smoke = images_scripts
    run = smoke.Smoke("docker", tmp_path)
    context = {**run.pod["securityContext"], **run.tail["securityContext"]}
    assert smoke.hardening(run.pod, run.tail) == [
        "--user", f"{context['runAsUser']}:{context['runAsGroup']}", "--read-only", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges"]
    flags = " ".join(smoke.mounts(run.pod, run.tail, tmp_path / "claim", tmp_path / "empty"))
    for mount in run.tail["volumeMounts"]:
        assert mount["mountPath"] in flags or mount["mountPath"] == "/dev/shm", mount
    assert f"src={tmp_path / 'claim'},dst=/bundles,readonly" in flags and "--shm-size" in flags
    assert run.grace == run.pod["terminationGracePeriodSeconds"] and run.port == int(run.config["SPLIT_SERVER_PORT"])
    assert smoke.quantity("1Gi") == 2**30 and smoke.quantity("40Gi") == 40 * 2**30


def fake_docker(tmp_path, version: str, buildx: bool) -> None:
    script = tmp_path / "docker"
    script.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo "Docker version {version}, build x" && exit 0\n'
                      f'[ "$1" = buildx ] && exit {0 if buildx else 1}\nexit 1\n')
    script.chmod(0o755)


@pytest.mark.parametrize(("version", "buildx", "usable"), [("20.10.24", False, True), ("28.2.2", False, False),
                                                            ("28.2.2", True, True)])
def test_engine_picks_a_client_that_builds_with_buildkit(images_scripts, tmp_path, monkeypatch, version, buildx,
                                                         usable):
    engine, _ = images_scripts
    fake_docker(tmp_path, version, buildx)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("DOCKER", raising=False)
    monkeypatch.setattr(engine, "FALLBACK_DIRS", [])
    if usable:
        assert engine.buildkit_client() == str(tmp_path / "docker")
    else:
        with pytest.raises(engine.NoEngine, match="buildx"):
            engine.buildkit_client()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["smoke.py", "build.py"])
def test_without_an_engine_one_line_says_why(script):
    env = {**os.environ, "DOCKER": "/nonexistent/docker"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "images" / script)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    said = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(said) == 1 and "/nonexistent/docker" in said[0], said
    if script == "smoke.py":
        assert result.returncode == 0 and said[0].startswith("images-smoke: skipped:"), said
    else:
        assert result.returncode == 1 and said[0].startswith("build: error:"), said
