"""A container engine for `make base-image`, `make images` and `make images-smoke`: use the running one, or start
Docker's daemon for the length of the command and stop it afterwards (only the one started here).

The daemon is started as on a machine without a bridge or iptables (`--bridge=none`, no iptables): builds and
containers then use `--network host` or `--network none`, which is all these commands need. The client must speak
BuildKit: Docker's own before 23, or a newer one with the buildx plugin (a bare newer client refuses BuildKit).

    python3 scripts/images/engine.py COMMAND...   # runs COMMAND with DOCKER=<client> in its environment
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMON_FLAGS = ["--iptables=false", "--ip6tables=false", "--ip-forward=false", "--bridge=none"]
START_TIMEOUT_S = 60
# Debian's docker.io client, looked at after PATH: a newer client earlier on PATH may lack buildx.
FALLBACK_DIRS = ["/usr/bin"]


class NoEngine(Exception):
    """No engine can run here; the message says why in one line."""


def buildkit_client() -> str:
    """$DOCKER, else the first docker client on PATH (or Debian's /usr/bin/docker) that can build with BuildKit."""
    if os.environ.get("DOCKER"):
        if shutil.which(os.environ["DOCKER"]) is None:
            raise NoEngine(f"DOCKER={os.environ['DOCKER']} is not a program here")
        return os.environ["DOCKER"]
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), *FALLBACK_DIRS]
    candidates = dict.fromkeys(str(Path(d, "docker")) for d in dirs if d and os.access(Path(d, "docker"), os.X_OK))
    for docker in candidates:
        version = subprocess.run([docker, "--version"], capture_output=True, text=True).stdout
        major = re.search(r"version (\d+)\.", version)
        if major and int(major.group(1)) < 23:
            return docker  # BuildKit built into the client
        if subprocess.run([docker, "buildx", "version"], capture_output=True).returncode == 0:
            return docker
    if candidates:
        raise NoEngine(f"no docker client here builds with BuildKit ({', '.join(candidates)}: no buildx); "
                       "apt-get install docker.io, or set DOCKER=")
    raise NoEngine("no docker client (apt-get install docker.io)")


def answers(docker: str) -> bool:
    return subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0


class Engine:
    """`with Engine() as docker:` the client to call; the daemon runs until the block ends."""

    def __init__(self) -> None:
        self.daemon: subprocess.Popen | None = None
        self.log: Path | None = None

    def __enter__(self) -> str:
        docker = buildkit_client()
        if answers(docker):
            return docker
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise NoEngine("no container engine is running, and no dockerd to start (apt-get install docker.io)")
        if os.geteuid() != 0:
            raise NoEngine("no container engine is running, and starting dockerd needs root")
        self.log = Path(tempfile.mkstemp(prefix="dockerd.", suffix=".log")[1])
        with self.log.open("w") as log:
            self.daemon = subprocess.Popen([dockerd, *DAEMON_FLAGS], stdout=log, stderr=log, start_new_session=True)
        print(f"engine: started dockerd (pid {self.daemon.pid}, log {self.log})", file=sys.stderr)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(docker):
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                last = self.log.read_text().strip().splitlines()[-1:] or ["no output"]
                self.__exit__()
                raise NoEngine(f"dockerd could not start here: {last[0][:300]}")
            time.sleep(0.5)
        return docker

    def __exit__(self, *exc: object) -> None:
        if self.daemon is None:
            return
        if self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        print(f"engine: stopped dockerd (pid {self.daemon.pid})", file=sys.stderr)
        self.daemon = None
        if self.log is not None:
            self.log.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    if not argv:
        sys.exit(__doc__)
    try:
        with Engine() as docker:
            return subprocess.run(argv, env={**os.environ, "DOCKER": docker}).returncode
    except NoEngine as e:
        print(f"engine: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
