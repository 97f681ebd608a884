"""`python -m services` as a process: restart mid-generation, TLS, the SIGTERM drain, refusing to start with one
line, and dropping idle or slow connections."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from servers import ROOT, free_port, start_service_process, stop, wait_ready

from client.remote import RemoteTail
from client.settings import ClientSettings
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.manifest import sha256_file
from splitcore.sampling import SamplingParams

# Child processes and real sockets: the full suite runs these, `make test-fast` skips them.
pytestmark = pytest.mark.slow

PROMPT = list(range(60, 90))


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
        # A drained, finished shutdown is a clean exit.
        assert process.wait(timeout=15) == 0
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


def refusal(bundle, **env: str) -> list[str]:
    """Start `python -m services` where it must refuse: its exit code 2 and its stderr lines (warnings and up)."""
    process = start_service_process(bundle, free_port(), SPLIT_SERVER_LOG_LEVEL="WARNING", **env)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2, stderr
    return stderr.strip().splitlines()


def edited_copy(out, tmp_path, edit) -> object:
    """A copy of the server bundle whose manifest ``edit`` changed (file hashes kept consistent)."""
    broken = tmp_path / "server"
    shutil.copytree(out / "server", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    edit(broken, manifest)
    for name, entry in manifest["files"].items():
        if (broken / name).exists():
            entry["sha256"], entry["bytes"] = sha256_file(broken / name), (broken / name).stat().st_size
    (broken / "manifest.json").write_text(json.dumps(manifest))
    return broken


def test_a_garbage_graph_that_matches_its_hash_is_refused_in_one_line(tiny, tmp_path):
    def garbage(root, manifest) -> None:
        (root / "tail.onnx").write_bytes(b"not an onnx graph" * 100)

    lines = refusal(edited_copy(tiny[0], tmp_path, garbage))
    assert len(lines) == 1 and "onnxruntime cannot load" in lines[0], lines


@pytest.mark.parametrize("edit", ["hidden_size", "dtype"])
def test_a_manifest_that_disagrees_with_its_graph_is_refused_in_one_line(tiny, tmp_path, edit):
    def disagree(root, manifest) -> None:
        if edit == "hidden_size":
            manifest["model"]["hidden_size"] += 1
        else:
            manifest["tail"]["inputs"][0]["dtype"] = "float16"

    lines = refusal(edited_copy(tiny[0], tmp_path, disagree))
    assert len(lines) == 1 and "re-run the export" in lines[0], lines


def test_an_empty_token_is_refused_in_one_line(tiny):
    lines = refusal(tiny[0] / "server", SPLIT_SERVER_TOKEN="")
    assert len(lines) == 1 and "SPLIT_SERVER_TOKEN" in lines[0] and "empty" in lines[0], lines


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="this machine has CUDA")
def test_service_refuses_to_run_without_a_demanded_provider_in_one_line(tiny):
    lines = refusal(tiny[0] / "server", SPLIT_SERVER_PROVIDERS='["CUDAExecutionProvider"]')
    assert len(lines) == 1 and "CUDAExecutionProvider" in lines[0] and "not available" in lines[0], lines


def closed_within(raw: socket.socket, seconds: float) -> bool:
    """True when the server closes ``raw`` (or answers and closes) within ``seconds``."""
    raw.settimeout(seconds)
    try:
        while raw.recv(4096):
            pass
        return True
    except TimeoutError:
        return False


def test_idle_and_slow_connections_are_dropped(tiny):
    out, client, _ = tiny
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_service_process(out / "server", port, SPLIT_SERVER_HEAD_TIMEOUT_S="1",
                                    SPLIT_SERVER_KEEP_ALIVE_S="1", SPLIT_SERVER_BODY_TIMEOUT_S="1")
    try:
        wait_ready(url)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]  # connect, send nothing
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\n")  # half a head, then nothing
        assert all(closed_within(s, 5) for s in [*idle, slow])
        dripping = socket.create_connection(("127.0.0.1", port))
        dripping.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
        dripping.settimeout(5)
        assert dripping.recv(4096).startswith(b"HTTP/1.1 408")
        kept = socket.create_connection(("127.0.0.1", port))
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        kept.settimeout(5)
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        assert closed_within(kept, 5)  # idle after its answer: closed by the keep-alive timeout
        for s in [*idle, slow, dripping, kept]:
            s.close()
        assert httpx.post(f"{url}/v1/sessions", json={"manifest_sha256": client.manifest_sha256}).status_code == 201
    finally:
        stop(process)


def test_a_provider_that_fails_to_start_is_one_line_with_onnxruntimes_reason(tiny, monkeypatch, capsys):
    """What onnxruntime-gpu does without a usable GPU: prints its fallback banner on stdout, falls back to the CPU,
    and the runner refuses (active_providers). The user sees one line with the reason, nothing else."""
    import services.__main__ as entry
    from splitcore.errors import SplitError

    def failing(settings, bundle):
        print("*************** EP Error ***************")
        print("EP Error libcudnn.so.9: cannot open shared object file when using ['CUDAExecutionProvider']")
        print("Falling back to ['CPUExecutionProvider'] and retrying.")
        print("****************************************")
        raise SplitError("onnxruntime could not enable ['CUDAExecutionProvider'] (active: ['CPUExecutionProvider'])")

    monkeypatch.setattr(entry, "load_service", failing)
    monkeypatch.setattr(entry, "configure", lambda level, fmt: None)
    assert entry.main(["--bundle", str(tiny[0] / "server")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, (out, err)
    assert "could not enable" in err and "libcudnn.so.9" in err
