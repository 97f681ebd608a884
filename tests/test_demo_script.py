"""scripts/demo.sh, what `make demo` runs: its own service or none, and a log that is still there afterwards."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from servers import ROOT, free_port

# Child processes and real sockets: the full suite runs these, `make test-fast` skips them.
pytestmark = pytest.mark.slow

DEMO = ROOT / "scripts" / "demo.sh"


def test_demo_refuses_a_port_someone_listens_on(tmp_path: Path) -> None:
    """With `make serve` up on the port, the demo used to ask that service, then fail with Error 143."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        demo = subprocess.run(["bash", str(DEMO), str(tmp_path / "no-bundle"), str(port), "hi", sys.executable],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert demo.returncode == 1, demo.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in demo.stderr and "PORT=" in demo.stderr
    assert not (tmp_path / "no-bundle").exists(), "refused before starting anything"


def test_demo_answers_and_keeps_the_service_log(export_bundle) -> None:
    out = export_bundle("random:tiny", 2, "fp32")
    demo = subprocess.run(["bash", str(DEMO), str(out), str(free_port()), "Hello", sys.executable],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    log = out / "demo-service.log"
    assert f"its log: {log}" in demo.stderr and "generated" in demo.stderr
    assert "Application startup complete" in log.read_text()
