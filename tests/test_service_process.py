"""`python -m services` as a process: restart mid-generation, TLS, concurrency, drain, refusing a bad bundle."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import TINY, bundles
from servers import ROOT, free_port, service_thread, start_service_process, stop, wait_ready

from client.remote import RemoteTail
from client.settings import ClientSettings
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.sampling import SamplingParams

PROMPT = list(range(60, 90))


@pytest.fixture(scope="module")
def tiny(export_bundle):
    out = export_bundle(TINY, 2)
    return (out, *bundles(out))


def in_process(client, server, prompt=PROMPT, n=24) -> list[int]:
    generator = SplitGenerator(HeadRunner(client), LocalTail(TailRunner(server), SamplingParams()))
    return [c.token for c in generator.generate(prompt, n, stop_ids=())]


def test_client_survives_a_service_restart_mid_generation(tiny):
    out, client, server = tiny
    expected = in_process(client, server)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_service_process(out / "server", port)
    try:
        wait_ready(url)
        link = RemoteTail.open(client, ClientSettings(server_url=url, retries=8), SamplingParams())
        generator = SplitGenerator(HeadRunner(client), link, prefill_chunk=8)
        tokens = []
        for choice in generator.generate(PROMPT, 24, stop_ids=()):
            tokens.append(choice.token)
            if len(tokens) == 10:
                stop(process)  # the pod dies: its sessions and KV caches are gone
                process = start_service_process(out / "server", port)
                wait_ready(url)
        assert tokens == expected
        assert link.replays == 1
    finally:
        stop(process)


def test_unreachable_service_ends_with_a_clear_message(tiny):
    _, client, _ = tiny
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "client", "--bundle", str(tiny[0]), "--server-url", f"http://127.0.0.1:{port}", "hi"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"SPLIT_CLIENT_RETRIES": "2", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"tail service at http://127.0.0.1:{port} unusable after 3 attempts" in result.stderr


def test_tls_with_a_generated_certificate(tiny, tmp_path):
    trustme = pytest.importorskip("trustme")
    out, client, server = tiny
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    ca.cert_pem.write_to_path(ca_file)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    process = start_service_process(out / "server", port, SPLIT_SERVER_TLS_CERT=str(cert_file),
                                    SPLIT_SERVER_TLS_KEY=str(key_file))
    try:
        wait_ready(url, verify=str(ca_file))
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")  # not trusted without the CA
        link = RemoteTail.open(client, ClientSettings(server_url=url, ca_cert=ca_file), SamplingParams())
        generator = SplitGenerator(HeadRunner(client), link)
        assert [c.token for c in generator.generate(PROMPT, 8, stop_ids=())] == in_process(client, server, n=8)
    finally:
        stop(process)


def test_concurrent_clients_get_what_they_get_alone(tiny):
    out, client, server = tiny
    prompts = [list(range(start, start + 12 + start % 7)) for start in (20, 41, 77, 103, 150, 199)]
    alone = [in_process(client, server, p, 16) for p in prompts]
    with service_thread(out / "server") as url:
        def over_http(prompt):
            link = RemoteTail.open(client, ClientSettings(server_url=url), SamplingParams())
            generator = SplitGenerator(HeadRunner(client), link, prefill_chunk=5)
            return [c.token for c in generator.generate(prompt, 16, stop_ids=())]

        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(over_http, prompts))
    assert together == alone


def test_sigterm_drains_then_exits(tiny):
    out, client, _ = tiny
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_service_process(out / "server", port, SPLIT_SERVER_DRAIN_S="1.5")
    try:
        wait_ready(url)
        link = RemoteTail.open(client, ClientSettings(server_url=url), SamplingParams())
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{url}/readyz").status_code == 503
        # A live session keeps working while the replica drains; new sessions go elsewhere.
        assert link.step(np.zeros((1, 1, client.manifest.model.hidden_size), np.float32), 0) is not None
        refused = httpx.post(f"{url}/v1/sessions", json={"manifest_sha256": client.manifest_sha256})
        assert refused.status_code == 503
        # uvicorn re-raises the signal it caught once it has shut down cleanly, as process managers expect.
        assert process.wait(timeout=15) in (0, -signal.SIGTERM)
        assert "Traceback" not in process.stderr.read()
    finally:
        stop(process)


def test_service_refuses_a_bundle_whose_files_changed(tiny, tmp_path):
    out, _, _ = tiny
    broken = tmp_path / "server"
    shutil.copytree(out / "server", broken)
    data = broken / "tail.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    process = start_service_process(broken, free_port())
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "sha256" in stderr and "re-run the export" in stderr and "Traceback" not in stderr


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="this machine has CUDA")
def test_service_refuses_to_run_without_a_demanded_provider(tiny):
    out, _, _ = tiny
    process = start_service_process(out / "server", free_port(), SPLIT_SERVER_PROVIDERS='["CUDAExecutionProvider"]')
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "CUDAExecutionProvider" in stderr and "not available" in stderr

