"""What the int8 head costs in accuracy and buys in speed, against the fp32 head of the same export, torch-free.

Accuracy over a fixed prompt set: the fp32 split generates greedily, then both heads (same fp32 tail) run the
prompt + continuation teacher-forced; we count positions where the greedy token agrees and measure the logit drift.
Speed: the median latency of a single-token head step, each head on the same cache length.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from bench.prompts import prompt_ids
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.manifest import load_bundle
from splitcore.sampling import SamplingParams

PROMPTS = 4
PROMPT_LENGTH = 32
CONTINUATION = 32
TIMED_STEPS = 24


def int8_report(split: Path, int8: Path, prompts: int = PROMPTS, continuation: int = CONTINUATION) -> dict:
    client = load_bundle(split / "client", "client")
    fp32_head = HeadRunner(client, ["CPUExecutionProvider"])
    int8_head = HeadRunner(load_bundle(int8 / "client", "client"), ["CPUExecutionProvider"])
    tail = TailRunner(load_bundle(split / "server", "server"), ["CPUExecutionProvider"])
    agree = total = 0
    max_drift = rel_drift = 0.0
    for variant in range(prompts):
        ids = prompt_ids(client, PROMPT_LENGTH, variant * 17)
        generator = SplitGenerator(fp32_head, LocalTail(tail, SamplingParams()))
        sequence = ids + [c.token for c in generator.generate(ids, continuation, stop_ids=())]
        reference = _teacher_forced(fp32_head, tail, sequence)[len(ids) - 1 : -1]
        quantized = _teacher_forced(int8_head, tail, sequence)[len(ids) - 1 : -1]
        agree += int(np.sum(reference.argmax(-1) == quantized.argmax(-1)))
        total += reference.shape[0]
        drift = float(np.abs(quantized - reference).max())
        max_drift = max(max_drift, drift)
        rel_drift = max(rel_drift, drift / float(np.abs(reference).max()))
    fp32_ms, int8_ms = _step_ms(fp32_head, client), _step_ms(int8_head, client)
    return {
        "prompts": prompts,
        "prompt_tokens": PROMPT_LENGTH,
        "teacher_forced_positions": total,
        "greedy_agreement": agree / total,
        "logit_max_abs_drift": max_drift,
        "logit_relative_drift": rel_drift,
        "head_step_ms": {"fp32": fp32_ms, "int8": int8_ms},
        "head_step_speedup": fp32_ms / int8_ms,
        "head_file_bytes": {"fp32": _graph_bytes(split / "client"), "int8": _graph_bytes(int8 / "client")},
    }


def _teacher_forced(head: HeadRunner, tail: TailRunner, sequence: list[int]) -> np.ndarray:
    ids = np.asarray([sequence], dtype=np.int64)
    mask = np.ones_like(ids)
    positions = np.arange(ids.shape[1], dtype=np.int64)[None, :]
    hidden = head.forward(ids, mask, positions, head.new_cache())
    return tail.forward(hidden, mask, positions, tail.new_cache(), logits_to_keep=0)[0]


def _step_ms(head: HeadRunner, client) -> float:
    cache = head.new_cache()
    ids = np.asarray([prompt_ids(client, PROMPT_LENGTH)], dtype=np.int64)
    head.forward(ids, np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None, :], cache)
    times = []
    for _ in range(TIMED_STEPS):
        past = cache.length
        mask = np.ones((1, past + 1), dtype=np.int64)
        start = time.perf_counter()
        head.forward(ids[:, -1:], mask, np.asarray([[past]], dtype=np.int64), cache)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def _graph_bytes(client_dir: Path) -> int:
    manifest = load_bundle(client_dir, "client", verify=False).manifest
    return sum(manifest.files[f].bytes for f in filter(None, (manifest.head.file, manifest.head.data_file)))
