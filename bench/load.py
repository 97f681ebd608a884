"""``python -m bench.load``: many concurrent sessions against one tail service on loopback.

Each simulated session opens, sends a prompt's worth of hidden states in one chunk, then single-token steps; the
hidden states are synthetic (the tail's cost does not depend on their values) so the measurement is the service's,
not a head's competing for the same cores. Every level is bounded in steps and in time and stops by itself.

Besides throughput and latency it measures the KV facts of issue 11: the bytes one session's slot reserves (from
/readyz, checked against the manifest) and the KV bytes a decode step copies, counted on a batched decode run of the
same tail in this process: every KV output onnxruntime hands back must be the slots' own memory.

    python -m bench.load --bundle bundles/smollm2-k4 --levels 1,4,16,64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from bench.http_service import start_service
from splitcore import names, protocol, wire
from splitcore.errors import SplitError
from splitcore.graphs import TailRunner
from splitcore.manifest import Bundle, load_bundle

log = logging.getLogger("bench.load")


class Connection:
    """One keep-alive HTTP/1.1 connection, as little client as a load generator on the service's own cores can be
    (httpx costs a millisecond or more of CPU per request, taken from the service it measures)."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.fixed = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
                      ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.fixed}{extra}"
                f"Content-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readuntil(b"\r\n")
        fields = {}
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode().partition(":")
            fields[name.strip().lower()] = value.strip()
        data = await self.reader.readexactly(int(fields.get("content-length", 0)))
        if fields.get("connection") == "close":
            await self.close()
        return int(status_line.split()[1]), fields, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


@dataclass
class Level:
    sessions: int
    step_latencies_s: list[float] = field(default_factory=list)
    prompt_latencies_s: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    retry_after_missing: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        lat = np.asarray(self.step_latencies_s or [np.nan])
        ttft = np.asarray(self.prompt_latencies_s or [np.nan])
        return {
            "sessions": self.sessions,
            "aggregate_tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
            # While every session decodes (prefill excluded): one token per session per median step.
            "decode_tokens_per_s": self.sessions / float(np.percentile(lat, 50)),
            "step_latency_ms": {"p50": float(np.percentile(lat, 50) * 1e3), "p99": float(np.percentile(lat, 99) * 1e3)},
            "prompt_latency_ms": {"p50": float(np.percentile(ttft, 50) * 1e3),
                                  "p99": float(np.percentile(ttft, 99) * 1e3)},
            "tokens": self.tokens,
            "errors": self.errors,
            "rejected_sessions": self.rejected,
            "rejected_without_retry_after": self.retry_after_missing,
            "seconds": self.seconds,
        }


async def one_session(http: Connection, sha: str, prompt: bytes, step: bytes, prompt_len: int,
                      steps: int, level: Level) -> None:
    opening = json.dumps({"manifest_sha256": sha, "max_length": prompt_len + steps}).encode()
    status, fields, data = await http.request("POST", protocol.SESSIONS_PATH, opening,
                                              {"Content-Type": "application/json"})
    if status == 503:
        level.rejected += 1
        level.retry_after_missing += "retry-after" not in fields
        return
    if status != 201:
        level.errors[str(status)] = level.errors.get(str(status), 0) + 1
        return
    sid = json.loads(data)["session_id"]
    position = 0
    try:
        for body in [prompt] + [step] * steps:
            started = time.perf_counter()
            status, _, _ = await http.request("POST", protocol.steps_path(sid), body, {
                "Content-Type": wire.MEDIA_TYPE, protocol.PAST_LENGTH_HEADER: str(position)})
            if status != 200:
                level.errors[str(status)] = level.errors.get(str(status), 0) + 1
                return
            if position:  # decode steps; the prompt is prefill (time to first token)
                level.step_latencies_s.append(time.perf_counter() - started)
                level.tokens += 1
            else:
                level.prompt_latencies_s.append(time.perf_counter() - started)
            position += prompt_len if not position else 1
    finally:
        await http.request("DELETE", f"{protocol.SESSIONS_PATH}/{sid}")
        await http.close()


async def run_level(url: str, sha: str, hidden: int, sessions: int, prompt_len: int, steps: int,
                    limit_s: float) -> Level:
    rng = np.random.default_rng(0)
    prompt = wire.encode(rng.standard_normal((1, prompt_len, hidden)).astype(np.float16))
    step = wire.encode(rng.standard_normal((1, 1, hidden)).astype(np.float16))
    level = Level(sessions)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connections = [Connection(host, int(port), {protocol.MANIFEST_HEADER: sha}) for _ in range(sessions)]
    started = time.perf_counter()
    work = [one_session(c, sha, prompt, step, prompt_len, steps, level) for c in connections]
    try:
        await asyncio.wait_for(asyncio.gather(*work), timeout=limit_s)
    except TimeoutError:
        level.errors["timeout"] = level.errors.get("timeout", 0) + 1
    level.seconds = time.perf_counter() - started
    return level


def kv_copy_check(server: Bundle, rows: int = 16, steps: int = 8, length: int = 256) -> dict:
    """KV bytes a batched decode step copies: run ``steps`` decode runs of ``rows`` slots exactly as the service's
    runner binds them (splitcore/kvpool.py), and count the bytes of every KV output onnxruntime returns that is not
    the slots' own memory. Also checks that the buffers were never reallocated. On the provider the service gets
    (the best available)."""
    tail = TailRunner(server)
    pool = tail.new_pool(rows, length)
    slots = [pool.acquire() for _ in range(rows)]
    size = server.manifest.model.hidden_size
    rng = np.random.default_rng(0)
    for slot in slots:
        tail.forward(rng.standard_normal((1, 16, size)).astype(tail.dtype), pool, slot)
    buffers = pool.buffer_addresses()
    copied = outputs = 0
    for _ in range(steps):
        binding = tail.session.io_binding()
        binding.bind_cpu_input(tail.first_input, rng.standard_normal((rows, 1, size)).astype(tail.dtype))
        totals = pool.lengths[:rows] + 1
        binding.bind_cpu_input(names.SEQLENS_K, (totals - 1).astype(np.int32))
        binding.bind_cpu_input(names.TOTAL_SEQUENCE_LENGTH, np.array(int(totals.max()), dtype=np.int32))
        binding.bind_ortvalue_input(names.LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(np.array(1, np.int64)))
        binding.bind_output(tail.output_name, "cpu")
        pool.bind(binding, tail.spec.past, tail.spec.present, 0, rows)
        tail.session.run_with_iobinding(binding)
        pool.lengths[:rows] += 1
        for value in binding.get_outputs()[1:]:  # the present KV outputs, after the logits
            outputs += 1
            pointer = value.data_ptr()
            if not any(lo <= pointer < hi for lo, hi in buffers):
                copied += int(np.prod(value.shape())) * pool.shape.dtype.itemsize
    reallocated = [v.data_ptr() for v in pool._values] != [lo for lo, _ in buffers]
    return {"rows": rows, "decode_steps": steps, "kv_outputs_checked": outputs,
            "kv_bytes_copied_per_step": copied / steps, "buffers_reallocated": reallocated}


def floors(levels: dict[int, dict]) -> dict:
    """The issue's floors, computed where the levels they compare were measured."""
    out = {}
    one, sixteen, many = levels.get(1), levels.get(16), levels.get(64)
    if one and sixteen:
        out["16_sessions_throughput_x_one"] = sixteen["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"]
        out["16_sessions_decode_rate_x_one"] = sixteen["decode_tokens_per_s"] / one["decode_tokens_per_s"]
        out["16_sessions_p99_x_one_median"] = sixteen["step_latency_ms"]["p99"] / one["step_latency_ms"]["p50"]
        out["16_sessions_errors"] = sum(sixteen["errors"].values())
    if many:
        out["64_sessions_non_503_errors"] = sum(many["errors"].values())
        out["64_sessions_503_without_retry_after"] = many["rejected_without_retry_after"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-k4"), help="export output dir")
    p.add_argument("--levels", default="1,4,16,64", help="concurrent sessions per level")
    p.add_argument("--prompt", type=int, default=32, help="prompt positions per session")
    p.add_argument("--steps", type=int, default=32, help="decode steps per session")
    p.add_argument("--slot-length", type=int, default=512, help="SPLIT_SERVER_SLOT_LENGTH of the service")
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
    manifest = server.manifest
    kv = kv_copy_check(server)
    log.info("KV bytes copied per decode step of %d rows: %.0f (%d KV outputs checked, buffers reallocated: %s)",
             kv["rows"], kv["kv_bytes_copied_per_step"], kv["kv_outputs_checked"], kv["buffers_reallocated"])
    service = start_service(args.bundle / "server", settings={"SPLIT_SERVER_SLOT_LENGTH": str(args.slot_length)})
    results: dict[int, dict] = {}
    try:
        ready = httpx.get(f"{service.url}/readyz", timeout=10).json()
        for sessions in (int(n) for n in args.levels.split(",")):
            log.info("level %d sessions: %d decode steps each ...", sessions, args.steps)
            level = asyncio.run(run_level(service.url, server.manifest_sha256, manifest.model.hidden_size,
                                          sessions, args.prompt, args.steps, args.limit_s))
            results[sessions] = level.summary()
            r = results[sessions]
            log.info("  %.1f tokens/s, p50 %.1f ms, p99 %.1f ms, errors %s, rejected %d",
                     r["aggregate_tokens_per_s"], r["step_latency_ms"]["p50"], r["step_latency_ms"]["p99"],
                     r["errors"] or 0, r["rejected_sessions"])
    finally:
        service.stop()
    per_token = manifest.kv_bytes_per_token(manifest.tail)
    report = {"model": manifest.model.id, "split_layer": manifest.split_layer, "tail_dtype": manifest.tail.dtype,
              "tail_weights": manifest.tail.weights, "provider": ready["provider"], "cpus": os.cpu_count(),
              "load_average": list(os.getloadavg()),
              "kv": {"bytes_per_position": per_token, "slot_length": ready["slot_length"], "slots": ready["slots"],
                     "bytes_per_session": ready["kv_bytes_per_slot"],
                     "manifest_bytes_per_session": per_token * (ready["slot_length"] + 1), **kv},
              "levels": list(results.values()), "floors": floors(results)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "load.md").write_text(markdown(report))
    sys.stdout.write(markdown(report))
    return 0


def markdown(report: dict) -> str:
    kv = report["kv"]
    lines = [f"Tail service under load: {report['model']} split at {report['split_layer']} "
             f"({report['tail_weights']} weights, {report['tail_dtype']} KV, {report['provider']}, "
             f"{report['cpus']} CPUs, load average {report['load_average'][0]:.1f} at the end)", "",
             f"KV per session: {kv['bytes_per_session'] / 2**20:.1f} MiB for {kv['slot_length']} positions "
             f"(manifest: {kv['bytes_per_position']} bytes per position x {kv['slot_length'] + 1} = "
             f"{kv['manifest_bytes_per_session']}); {kv['slots']} slots. KV bytes copied per decode step: "
             f"{kv['kv_bytes_copied_per_step']:.0f} ({kv['kv_outputs_checked']} KV outputs of {kv['decode_steps']} "
             f"decode runs of {kv['rows']} rows checked; buffers reallocated: {kv['buffers_reallocated']}).", "",
             "| sessions | aggregate tokens/s | decoding tokens/s | step p50 ms | step p99 ms | prompt p50 ms "
             "| prompt p99 ms | errors | rejected (503) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["levels"]:
        lines.append(f"| {r['sessions']} | {r['aggregate_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['step_latency_ms']['p50']:.1f} | "
                     f"{r['step_latency_ms']['p99']:.1f} | {r['prompt_latency_ms']['p50']:.0f} | "
                     f"{r['prompt_latency_ms']['p99']:.0f} | {sum(r['errors'].values())} | {r['rejected_sessions']} |")
    lines += ["", "Aggregate tokens/s counts the whole level (every session's prompt included); decoding tokens/s is "
              "sessions / median step, the rate while all sessions decode.",
              "", "Floors: " + ", ".join(f"{k} = {v:.2f}" if isinstance(v, float) else f"{k} = {v}"
                                          for k, v in report["floors"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
