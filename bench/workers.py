"""The orchestrator's side of ``bench.worker``: start a configuration's process, send it runs, read the results."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from splitcore.errors import SplitError

log = logging.getLogger(__name__)


class WorkerError(SplitError):
    """A configuration's process failed to start or to run."""


class Worker:
    def __init__(self, config: str, label: str, path: Path, model: str, seed: int) -> None:
        spec = {"config": config, "path": str(path), "model": model, "seed": seed}
        self.config = label
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        ready = self._read()
        if "error" in ready:
            self.close()
            raise WorkerError(f"configuration {config} failed to start: {ready['error']}")

    def run(self, ids: list[int], new_tokens: int) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"ids": ids, "new_tokens": new_tokens}) + "\n")
        self.process.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise WorkerError(f"configuration {self.config} failed: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def _read(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise WorkerError(f"configuration {self.config}: worker exited with code {code} (see its stderr above)")
        return json.loads(line)
