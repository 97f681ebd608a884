"""make bench-wan's parts on loopback: the delay proxy really delays, and the measurement loop and report cover every
RTT and both modes (random:tiny, a few tokens). The namespace pair is tried only as root with `ip`."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import TINY

from bench.wan import netns, report
from bench.wan.__main__ import start_service, stop
from bench.wan.measure import measure, wait_ready
from bench.wan.prompts import KINDS, load_prompts
from bench.wan.proxy import start_proxy

pytestmark = pytest.mark.slow  # every test here starts child processes (the proxy, the service, namespaces)


def echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        with server:
            connection, _ = server.accept()
            with connection:
                while data := connection.recv(1 << 16):
                    connection.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def round_trip(sock: socket.socket, payload: bytes) -> tuple[float, bytes]:
    started = time.perf_counter()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(1 << 16)
        assert chunk, "the proxy closed the connection mid-answer"
        got += chunk
    return time.perf_counter() - started, got


def test_proxy_delays_each_direction_and_keeps_bytes():
    _, port = echo_server()
    one_way_ms = 40
    payload = bytes(range(256)) * 400  # 100 KiB: several chunks each way
    with start_proxy(f"127.0.0.1:{port}", one_way_ms) as proxy, socket.create_connection((proxy.host, proxy.port),
                                                                                        timeout=10) as sock:
        times = []
        for _ in range(3):
            elapsed, got = round_trip(sock, payload)
            assert got == payload, "the proxy changed or reordered bytes"
            times.append(elapsed)
    assert min(times) >= 2 * one_way_ms / 1000, f"round trips {times} s, configured RTT {2 * one_way_ms} ms"
    assert proxy.process.returncode is not None, "the proxy still runs after stop()"


@pytest.fixture
def tiny_service(export_bundle):
    bundle = export_bundle(TINY, 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = start_service(bundle, "127.0.0.1", port, [])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 60)
        yield bundle, url
    finally:
        stop(service)
    assert service.returncode is not None


def test_measurement_loop_and_report_on_loopback(tiny_service, monkeypatch, tmp_path):
    bundle, url = tiny_service
    # random:tiny has no tokenizer: the loop feeds the prompts' bytes as ids.
    monkeypatch.setattr("client.split.ChatTokenizer", lambda _bundle: None)
    rtts = [0, 30]
    result = measure(bundle, url, rtts, new_tokens=3, prompts=load_prompts(per_kind=1), budget_s=120)
    result["meta"] = {"notes": ["test"]}
    summary = report.write(result, tmp_path)

    seen = {(r["rtt_ms"], r["mode"], r["kind"]) for r in result["runs"]}
    assert seen == {(rtt, mode, kind) for rtt in rtts for mode in ("off", "on") for kind in KINDS}
    for run in result["runs"]:
        assert run["tokens"] == 3 and run["steps"] >= 2 and run["decode_sent"] > 0
        assert run["local_prefill_s"] > 0
        if run["mode"] == "off":  # no drafts, no cost estimate (on: the client's own, once it timed both kinds)
            assert run["position_share"] is None
        if run["rtt_ms"] == 30:  # at least the prefill's round trip is in the time to first token
            assert run["ttft_s"] >= 0.030, run
    assert {"b_full_graph_s", "c_split_local_s", "split_http_s"} <= set(result["ttft32"])
    for rtt in rtts:
        for kind in (*KINDS, report.MIXED):
            assert summary["table"][f"{rtt:g}/on/{kind}"]["decode_tok_s"] > 0
            assert f"{rtt:g}/{kind}" in summary["speedup"]
    names = " ".join(f["name"] for f in summary["floors"])
    assert "30 ms RTT, mixed" in names and "chat" in names and "32-token" in names
    markdown = (tmp_path / "wan.md").read_text()
    assert "| 0 ms |" in markdown and "| 30 ms |" in markdown
    assert (tmp_path / "wan.png").stat().st_size > 1000


@pytest.mark.skipif(netns.why_not() is not None, reason=f"no network namespaces here: {netns.why_not()}")
def test_namespace_pair_connects_and_leaves_nothing():
    address = netns.SERVER_ADDRESS
    listen = (f"import socket; s = socket.socket(); s.bind(('{address}', 9000)); s.listen(); print('up', flush=True); "
              "c, _ = s.accept(); c.sendall(b'across'); c.close()")
    connect = f"import socket; c = socket.create_connection(('{address}', 9000), timeout=5); print(c.recv(16).decode())"
    with netns.namespace_pair() as pair:
        listener = subprocess.Popen([*pair.exec_prefix("server"), sys.executable, "-c", listen],
                                    stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout.readline().strip() == "up"
            answer = subprocess.run([*pair.exec_prefix("client"), sys.executable, "-c", connect],
                                    capture_output=True, text=True, timeout=20)
            assert answer.stdout.strip() == "across", answer.stderr
        finally:
            stop(listener)
    names = netns.run("ip", "netns", "list").stdout
    assert pair.server_ns not in names and pair.client_ns not in names
    assert netns.run("ip", "link", "show", pair.server_dev, check=False).returncode != 0
