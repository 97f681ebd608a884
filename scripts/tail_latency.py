"""Tail decode step latency: one new position per row after a cached prefix, per provider and batch size.

    python scripts/tail_latency.py BUNDLE_DIR [BUNDLE_DIR ...] [--past 128 1024] [--batch 1 4 16] [--steps 32]

Each BUNDLE_DIR is an export output (holding server/) or a server bundle. Hidden states are random: the latency of
the graph does not depend on them. Rows are the first ``batch`` slots of one KV pool (splitcore/kvpool.py), each
holding ``past`` positions, decoded together as the service's runner does (``decode_rows``); the KV is written in
place. On CUDA two configurations: plain runs with IO binding, and the same step replayed as a captured CUDA graph
(splitcore/cudagraphs.py). Prints one line per (bundle, configuration, past, batch): median and p90 of the step
times after a warm-up step, and the bytes a step must read (weights once, plus every row's cached keys and values)
over the median as a share of the GPU's memory bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitcore.graphs import TailRunner  # noqa: E402
from splitcore.manifest import load_bundle  # noqa: E402

# HBM bandwidth by GPU name (GB/s, the vendors' figures), for the share-of-bound column.
PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L4": 300.0}


def step_times(tail: TailRunner, past: int, batch: int, steps: int) -> list[float]:
    hidden_size = tail.bundle.manifest.model.hidden_size
    rng = np.random.default_rng(0)
    pool = tail.new_pool(batch, past + steps + 2)
    slots = [pool.acquire() for _ in range(batch)]
    for slot in slots:
        tail.forward(rng.standard_normal((1, past, hidden_size)).astype(np.float32), pool, slot)
    times = []
    for _ in range(steps + 1):
        hidden = rng.standard_normal((batch, 1, hidden_size)).astype(np.float32)
        started = time.perf_counter()
        tail.decode_rows(hidden, pool, slots)
        times.append(time.perf_counter() - started)
    return times[1:]


def weight_bytes(bundle) -> int:
    spec = bundle.manifest.tail
    return sum(bundle.manifest.files[name].bytes for name in (spec.file, spec.data_file) if name)


def gpu_peak_gbs() -> float | None:
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((gbs for key, gbs in PEAK_GBS.items() if key in name), None)


def configurations(bundle_dtype: str) -> list[tuple[str, list[str], bool]]:
    configs = []
    if "CUDAExecutionProvider" in ort.get_available_providers():
        cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        configs += [("CUDA", cuda, False), ("CUDA+graph", cuda, True)]
    if bundle_dtype == "float32" or not configs:
        configs.append(("CPU", ["CPUExecutionProvider"], False))
    return configs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--past", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--peak-gbs", type=float, default=None,
                   help="memory bandwidth in GB/s for the share column (default: by the GPU's name, else 3350)")
    args = p.parse_args(argv)
    peak = args.peak_gbs or gpu_peak_gbs() or 3350.0
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}, bound {peak:.0f} GB/s")
    for path in args.bundles:
        bundle = load_bundle(path / "server" if (path / "server").is_dir() else path, "server")
        spec = bundle.manifest
        label = (f"{spec.model.id} layers [{spec.tail.layers[0]}, {spec.tail.layers[1]}) {spec.tail.dtype} "
                 f"{spec.tail.weights}")
        for name, providers, graphs in configurations(spec.tail.dtype):
            tail = TailRunner(bundle, providers, cuda_graphs=graphs)
            if graphs and tail.graphs is None:
                print(f"{label}: onnxruntime refused CUDA graphs for this graph (see the log)")
                continue
            for past in args.past:
                past = min(past, spec.model.max_position_embeddings - args.steps - 2)
                for batch in args.batch:
                    declined = tail.graphs.plain_steps if tail.graphs else 0
                    try:
                        times = sorted(step_times(tail, past, batch, args.steps))
                    except Exception as e:  # noqa: BLE001 - report the configuration that failed, go on
                        print(f"{label:56s} {name:10s} past {past:5d} batch {batch:3d}: failed: {e}", flush=True)
                        continue
                    median, p90 = statistics.median(times), times[int(0.9 * (len(times) - 1))]
                    if tail.graphs and tail.graphs.plain_steps > declined:
                        print(f"{label}: {tail.graphs.plain_steps - declined} of these steps ran without a CUDA graph")
                    touched = weight_bytes(bundle) + batch * past * spec.kv_bytes_per_token(spec.tail)
                    share = touched / median / (peak * 1e9)
                    print(f"{label:56s} {name:10s} past {past:5d} batch {batch:3d}: step median "
                          f"{median * 1e3:7.2f} ms, p90 {p90 * 1e3:7.2f} ms, {touched / median / 1e9:7.1f} GB/s = "
                          f"{share:5.1%} of {peak:.0f} GB/s ({len(times)} steps, {tail.providers[0]})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
