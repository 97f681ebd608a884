"""``python -m bench.load``: many concurrent sessions against one tail service on loopback.

Each simulated session opens, sends a prompt's worth of hidden states in one chunk, then single-token steps; the
hidden states are synthetic (the tail's cost does not depend on their values) so the measurement is the service's,
not a head's competing for the same cores. Every level is bounded in steps and in time and stops by itself.

    python -m bench.load --bundle bundles/smollm2-k4 --levels 1,4,16,64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.http_service import start_service
from splitcore import protocol, wire
from splitcore.errors import SplitError
from splitcore.manifest import load_bundle

log = logging.getLogger("bench.load")


@dataclass
class Level:
    sessions: int
    step_latencies_s: list[float] = field(default_factory=list)
    prompt_latencies_s: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        lat = np.asarray(self.step_latencies_s or [np.nan])
        ttft = np.asarray(self.prompt_latencies_s or [np.nan])
        return {
            "sessions": self.sessions,
            "aggregate_tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
            "step_latency_ms": {"p50": float(np.percentile(lat, 50) * 1e3), "p99": float(np.percentile(lat, 99) * 1e3)},
            "prompt_latency_ms": {"p50": float(np.percentile(ttft, 50) * 1e3),
                                  "p99": float(np.percentile(ttft, 99) * 1e3)},
            "tokens": self.tokens,
            "errors": self.errors,
            "rejected_sessions": self.rejected,
            "seconds": self.seconds,
        }


async def one_session(http: httpx.AsyncClient, sha: str, prompt: bytes, step: bytes, prompt_len: int,
                      steps: int, level: Level) -> None:
    opened = await http.post(protocol.SESSIONS_PATH, json={"manifest_sha256": sha,
                                                           "max_length": prompt_len + steps})
    if opened.status_code == 503:
        level.rejected += 1
        return
    if opened.status_code != 201:
        level.errors[str(opened.status_code)] = level.errors.get(str(opened.status_code), 0) + 1
        return
    sid = opened.json()["session_id"]
    position = 0
    try:
        for body in [prompt] + [step] * steps:
            started = time.perf_counter()
            answer = await http.post(protocol.steps_path(sid), content=body, headers={
                "Content-Type": wire.MEDIA_TYPE, protocol.PAST_LENGTH_HEADER: str(position)})
            if answer.status_code != 200:
                level.errors[str(answer.status_code)] = level.errors.get(str(answer.status_code), 0) + 1
                return
            if position:  # decode steps; the prompt is prefill (time to first token)
                level.step_latencies_s.append(time.perf_counter() - started)
                level.tokens += 1
            else:
                level.prompt_latencies_s.append(time.perf_counter() - started)
            position += prompt_len if not position else 1
    finally:
        await http.delete(f"{protocol.SESSIONS_PATH}/{sid}")


async def run_level(url: str, sha: str, hidden: int, sessions: int, prompt_len: int, steps: int,
                    limit_s: float) -> Level:
    rng = np.random.default_rng(0)
    prompt = wire.encode(rng.standard_normal((1, prompt_len, hidden)).astype(np.float16))
    step = wire.encode(rng.standard_normal((1, 1, hidden)).astype(np.float16))
    level = Level(sessions)
    limits = httpx.Limits(max_connections=sessions + 4)
    async with httpx.AsyncClient(base_url=url, headers={protocol.MANIFEST_HEADER: sha}, limits=limits,
                                 timeout=limit_s) as http:
        started = time.perf_counter()
        work = [one_session(http, sha, prompt, step, prompt_len, steps, level) for _ in range(sessions)]
        try:
            await asyncio.wait_for(asyncio.gather(*work), timeout=limit_s)
        except TimeoutError:
            level.errors["timeout"] = level.errors.get("timeout", 0) + 1
        level.seconds = time.perf_counter() - started
    return level


def floors(levels: dict[int, dict]) -> dict:
    """The issue's floors, computed where the levels they compare were measured."""
    out = {}
    one, sixteen, many = levels.get(1), levels.get(16), levels.get(64)
    if one and sixteen:
        out["16_sessions_throughput_x_one"] = sixteen["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"]
        out["16_sessions_p99_x_one_median"] = sixteen["step_latency_ms"]["p99"] / one["step_latency_ms"]["p50"]
        out["16_sessions_errors"] = sum(sixteen["errors"].values())
    if many:
        out["64_sessions_non_503_errors"] = sum(many["errors"].values())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-k4"), help="export output dir")
    p.add_argument("--levels", default="1,4,16,64", help="concurrent sessions per level")
    p.add_argument("--prompt", type=int, default=32, help="prompt positions per session")
    p.add_argument("--steps", type=int, default=32, help="decode steps per session")
    p.add_argument("--limit-s", type=float, default=180.0, help="time limit per level")
    p.add_argument("--out", type=Path, default=Path("reports/load"))
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        server = load_bundle(args.bundle / "server", "server")
    except SplitError as e:
        print(f"bench.load: error: {e}", file=sys.stderr)
        return 2
    service = start_service(args.bundle / "server")
    results: dict[int, dict] = {}
    try:
        for sessions in (int(n) for n in args.levels.split(",")):
            log.info("level %d sessions: %d decode steps each ...", sessions, args.steps)
            level = asyncio.run(run_level(service.url, server.manifest_sha256, server.manifest.model.hidden_size,
                                          sessions, args.prompt, args.steps, args.limit_s))
            results[sessions] = level.summary()
            r = results[sessions]
            log.info("  %.1f tokens/s, p50 %.1f ms, p99 %.1f ms, errors %s, rejected %d",
                     r["aggregate_tokens_per_s"], r["step_latency_ms"]["p50"], r["step_latency_ms"]["p99"],
                     r["errors"] or 0, r["rejected_sessions"])
    finally:
        service.stop()
    report = {"model": server.manifest.model.id, "split_layer": server.manifest.split_layer,
              "tail_dtype": server.manifest.tail.dtype, "levels": list(results.values()), "floors": floors(results)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "load.md").write_text(markdown(report))
    sys.stdout.write(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"Tail service under load: {report['model']} split at {report['split_layer']} "
             f"({report['tail_dtype']} tail)", "",
             "| sessions | aggregate tokens/s | step p50 ms | step p99 ms | prompt p50 ms | prompt p99 ms | errors "
             "| rejected (503) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["levels"]:
        lines.append(f"| {r['sessions']} | {r['aggregate_tokens_per_s']:.1f} | {r['step_latency_ms']['p50']:.1f} | "
                     f"{r['step_latency_ms']['p99']:.1f} | {r['prompt_latency_ms']['p50']:.0f} | "
                     f"{r['prompt_latency_ms']['p99']:.0f} | {sum(r['errors'].values())} | {r['rejected_sessions']} |")
    lines += ["", "Floors: " + ", ".join(f"{k} = {v:.2f}" if isinstance(v, float) else f"{k} = {v}"
                                          for k, v in report["floors"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
