"""Two network namespaces joined by a veth pair: the tail service on one side, the client on the other.

Everything here stays on this machine: the namespaces have no route out, only their own veth addresses
(10.203.0.1 for the service, 10.203.0.2 for the client) and their loopback. Names carry this process's pid, so
namespaces left by a run that was killed with SIGKILL are recognised (their pid is gone) and removed by the next run.
Deleting a namespace deletes its end of the veth pair, and with it the other end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

PREFIX = "splitwan"
SERVER_ADDRESS = "10.203.0.1"
CLIENT_ADDRESS = "10.203.0.2"
PREFIX_LENGTH = 30
COMMAND_TIMEOUT_S = 10.0
NAME = re.compile(rf"^{PREFIX}-(\d+)-(srv|cli)\b")


class NamespaceError(RuntimeError):
    """An ``ip``/``tc`` command failed; the message has the command and its stderr."""


def why_not() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``), or None when they can."""
    if os.geteuid() != 0:
        return "not root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    return None


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and result.returncode != 0:
        raise NamespaceError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class Pair:
    server_ns: str
    client_ns: str
    server_dev: str
    client_dev: str
    netem: bool  # tc netem works on the veth pair (else the delay proxy adds the delay)

    def exec_prefix(self, side: str) -> list[str]:
        """Prefix a command with this to run it in the ``server`` or ``client`` namespace."""
        return ["ip", "netns", "exec", self.server_ns if side == "server" else self.client_ns]

    def set_delay(self, one_way_ms: float) -> None:
        """With netem: delay every packet leaving either end by ``one_way_ms`` (RTT = 2x)."""
        assert self.netem, "set_delay needs netem"
        for ns, dev in ((self.server_ns, self.server_dev), (self.client_ns, self.client_dev)):
            run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{one_way_ms:g}ms")


def netem_works(ns: str, dev: str) -> bool:
    """Try a zero netem qdisc on one veth end; this kernel may not have sch_netem."""
    if shutil.which("tc") is None:
        return False
    ok = run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", "0ms", check=False).returncode == 0
    if ok:
        run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
    return ok


@contextlib.contextmanager
def namespace_pair(use_netem: bool = True) -> Iterator[Pair]:
    """Make the pair, yield it, and remove it (and every process still inside it) whatever happens."""
    remove_stale()
    tag = f"{PREFIX}-{os.getpid()}"
    pair = Pair(f"{tag}-srv", f"{tag}-cli", f"swan{os.getpid()}s", f"swan{os.getpid()}c", False)
    made: list[str] = []
    try:
        for ns in (pair.server_ns, pair.client_ns):
            run("ip", "netns", "add", ns)
            made.append(ns)
        run("ip", "link", "add", pair.server_dev, "type", "veth", "peer", "name", pair.client_dev)
        for ns, dev, address in ((pair.server_ns, pair.server_dev, SERVER_ADDRESS),
                                 (pair.client_ns, pair.client_dev, CLIENT_ADDRESS)):
            run("ip", "link", "set", dev, "netns", ns)
            run("ip", "-n", ns, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        if use_netem and netem_works(pair.server_ns, pair.server_dev):
            pair = Pair(pair.server_ns, pair.client_ns, pair.server_dev, pair.client_dev, True)
        yield pair
    finally:
        for ns in made:
            remove(ns)
        # A veth end that never moved into a namespace is still in ours.
        if run("ip", "link", "show", pair.server_dev, check=False).returncode == 0:
            run("ip", "link", "del", pair.server_dev, check=False)


def remove(ns: str) -> None:
    """Stop what still runs in ``ns`` (processes this tool started there), then delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in run("ip", "netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and run("ip", "netns", "pids", ns, check=False).stdout.strip():
            time.sleep(0.1)
    run("ip", "netns", "del", ns, check=False)


def remove_stale() -> None:
    """Delete namespaces of earlier runs whose process is gone (a run killed with SIGKILL cannot clean up)."""
    listed = run("ip", "netns", "list", check=False).stdout.splitlines()
    for line in listed:
        match = NAME.match(line)
        if match and not _alive(int(match.group(1))):
            name = line.split()[0]
            log.warning("wan: removing namespace %s left by a run that no longer exists", name)
            remove(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
