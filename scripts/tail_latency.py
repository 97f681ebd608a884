"""Tail step latency: one decode position after a cached prefix, per provider (KV buffers written in place).

    python scripts/tail_latency.py BUNDLE_DIR [BUNDLE_DIR ...] [--past 128 1024] [--steps 32]

Each BUNDLE_DIR is an export output (holding server/) or a server bundle. Hidden states are random: the latency of
the graph does not depend on them. Prints one line per (bundle, provider, past length) with the median and p90 of
the per-step times, measured after a warm-up step. Every step binds the KV buffers in place (splitcore.kvpool), so
only the step's hidden state goes in and its logits come back through host memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitcore.graphs import TailRunner  # noqa: E402
from splitcore.manifest import load_bundle  # noqa: E402


def step_times(tail: TailRunner, past: int, steps: int) -> list[float]:
    hidden_size = tail.bundle.manifest.model.hidden_size
    rng = np.random.default_rng(0)
    cache = tail.new_cache(past + steps + 1)
    prefix = rng.standard_normal((1, past, hidden_size)).astype(np.float32)
    tail.forward(prefix, cache, logits_to_keep=1)
    times = []
    for _ in range(steps + 1):
        hidden = rng.standard_normal((1, 1, hidden_size)).astype(np.float32)
        started = time.perf_counter()
        tail.forward(hidden, cache, logits_to_keep=1)
        times.append(time.perf_counter() - started)
    return times[1:]


def weight_bytes(bundle) -> int:
    spec = bundle.manifest.tail
    return sum(bundle.manifest.files[name].bytes for name in (spec.file, spec.data_file) if name)


def kv_bytes_per_position(tail: TailRunner) -> int:
    manifest = tail.bundle.manifest
    return manifest.kv_bytes_per_token(manifest.tail)


def configurations(bundle_dtype: str) -> list[tuple[str, list[str]]]:
    configs = []
    if "CUDAExecutionProvider" in ort.get_available_providers():
        configs.append(("CUDA", ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    if bundle_dtype == "float32" or not configs:
        configs.append(("CPU", ["CPUExecutionProvider"]))
    return configs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--past", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--peak-gbs", type=float, default=3350.0,
                   help="memory bandwidth bound in GB/s for the share column (default: H100 SXM HBM3, 3350)")
    args = p.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    for path in args.bundles:
        bundle = load_bundle(path / "server" if (path / "server").is_dir() else path, "server")
        spec = bundle.manifest
        label = (f"{spec.model.id} layers [{spec.tail.layers[0]}, {spec.tail.layers[1]}) {spec.tail.dtype} "
                 f"{spec.tail.weights}")
        for name, providers in configurations(spec.tail.dtype):
            tail = TailRunner(bundle, providers)
            for past in args.past:
                past = min(past, spec.model.max_position_embeddings - args.steps - 2)
                times = sorted(step_times(tail, past, args.steps))
                median, p90 = statistics.median(times), times[int(0.9 * (len(times) - 1))]
                # Bytes one decode step must read: every tail weight once, plus the cached keys and values.
                touched = weight_bytes(bundle) + past * kv_bytes_per_position(tail)
                share = touched / median / (args.peak_gbs * 1e9)
                print(f"{label:56s} {name:5s} past {past:5d}: step median {median * 1e3:7.2f} ms, "
                      f"p90 {p90 * 1e3:7.2f} ms, {touched / median / 1e9:7.1f} GB/s = {share:5.1%} of "
                      f"{args.peak_gbs:.0f} GB/s ({len(times)} steps, active {tail.providers[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
