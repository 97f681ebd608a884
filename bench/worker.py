"""One configuration in its own process: build the engine, then time generations asked for on stdin.

Protocol: one JSON object per line. The first line on stdout is ``{"ready": ...}`` (or ``{"error": ...}``); each
request ``{"ids": [...], "new_tokens": n}`` gets one result line. stdout is reserved for the protocol; everything
else, including anything a library prints, goes to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from bench.machine import peak_rss_bytes


def timed(engine, ids: list[int], new_tokens: int) -> dict:
    stamps: list[float] = []
    tokens: list[int] = []

    def on_token(token: int) -> None:
        stamps.append(time.perf_counter())
        tokens.append(token)

    traffic_before = engine.traffic()
    start = time.perf_counter()
    engine.generate(ids, new_tokens, on_token)
    end = time.perf_counter()
    if len(tokens) != new_tokens:
        raise RuntimeError(f"engine produced {len(tokens)} tokens, asked for {new_tokens}")
    result = {
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "ttft_s": stamps[0] - start,
        "decode_s": stamps[-1] - stamps[0],
        "total_s": end - start,
        "tokens": tokens,
        "peak_rss_bytes": {role: peak_rss_bytes(pid) for role, pid in engine.processes().items()},
    }
    traffic_after = engine.traffic()
    if traffic_after is not None:
        before = traffic_before or {"sent": 0, "received": 0}
        result["traffic_bytes"] = {k: traffic_after[k] - before.get(k, 0) for k in traffic_after}
    return result


def main() -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"), format="%(message)s", stream=sys.stderr)
    spec = json.loads(sys.argv[1])
    from bench.engines import build

    try:
        engine = build(spec["config"], Path(spec["path"]), spec["model"], spec["seed"])
    except Exception as e:  # report any build failure to the orchestrator instead of dying silently
        traceback.print_exc()
        protocol.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        return 1
    protocol.write(json.dumps({"ready": engine.processes()}) + "\n")
    try:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                reply = timed(engine, request["ids"], request["new_tokens"])
            except Exception as e:  # one failed run is reported, the orchestrator decides what to do
                traceback.print_exc()
                reply = {"error": f"{type(e).__name__}: {e}"}
            protocol.write(json.dumps(reply) + "\n")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
