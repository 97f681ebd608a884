"""What each weight scheme buys per decode step and costs in quality, against the fp32 export of the same model.

Speed: the median latency of one single-token step of the head graph and of the tail graph, each after the same
32-token prefix (the client's per-token cost and the server's), measured scheme after scheme in this process.
Quality is what the exporter measured on held-out text and gated on (perplexity ratio and greedy agreement vs fp32,
recorded in the manifest): the benchmark reports it, it does not re-measure it.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import numpy as np

from bench.prompts import prompt_ids
from splitcore import names
from splitcore.graphs import GraphRunner, HeadRunner, TailRunner
from splitcore.manifest import load_bundle

PREFIX = 32
TIMED_STEPS = 24
WARMUP_STEPS = 3
PROVIDERS = ["CPUExecutionProvider"]


def step_report(by_weights: dict[str, Path], steps: int = TIMED_STEPS) -> dict:
    """Per scheme: head and tail step medians in ms, file sizes, the export's quality numbers; and the ratios."""
    schemes = {}
    for scheme, out in by_weights.items():
        client = load_bundle(out / "client", "client")
        server = load_bundle(out / "server", "server")
        ids = prompt_ids(client, PREFIX + 1)
        head = HeadRunner(client, PROVIDERS)
        head_ms = _step_ms(head, np.asarray([ids], dtype=np.int64), steps)
        hidden = head.forward(np.asarray([ids], dtype=np.int64), head.new_cache(len(ids)))
        del head
        tail = TailRunner(server, PROVIDERS)
        tail_ms = _step_ms(tail, hidden, steps)
        del tail
        gc.collect()
        validation = client.manifest.validation or {}
        schemes[scheme] = {
            "head_step_ms": head_ms,
            "tail_step_ms": tail_ms,
            "head_file_bytes": _graph_bytes(client, "head"),
            "tail_file_bytes": _graph_bytes(server, "tail"),
            "quality": validation.get("quality"),
            "quality_floors": validation.get("quality_floors"),
        }
    result: dict = {"prefix_tokens": PREFIX, "timed_steps": steps, "schemes": schemes}
    base = schemes.get("fp32")
    if base:
        result["vs_fp32"] = {
            s: {"head_step_fraction": v["head_step_ms"] / base["head_step_ms"],
                "tail_decode_speedup": base["tail_step_ms"] / v["tail_step_ms"]}
            for s, v in schemes.items() if s != "fp32"
        }
    return result


def _step_ms(runner: GraphRunner, first: np.ndarray, steps: int) -> float:
    """Median ms of a one-position step after ``first[:, :PREFIX]``; the prefix is rolled back after each step so
    every step sees the same cache length."""
    if first.dtype != np.int64:
        first = first.astype(runner.dtype)  # hidden states into an fp16 tail
    cache = runner.new_cache(PREFIX + 1)
    runner.extend(first[:, :PREFIX], cache, extra=_keep(runner))
    step = first[:, PREFIX : PREFIX + 1]
    times = []
    for _ in range(WARMUP_STEPS + steps):
        start = time.perf_counter()
        runner.extend(step, cache, extra=_keep(runner))
        times.append(time.perf_counter() - start)
        cache.truncate(0, PREFIX)
    return 1000 * statistics.median(times[WARMUP_STEPS:])


def _keep(runner: GraphRunner) -> dict[str, np.ndarray] | None:
    return {names.LOGITS_TO_KEEP: np.array(1, dtype=np.int64)} if isinstance(runner, TailRunner) else None


def _graph_bytes(bundle, which: str) -> int:
    manifest = bundle.manifest
    spec = getattr(manifest, which)
    return sum(manifest.files[f].bytes for f in filter(None, (spec.file, spec.data_file)))
