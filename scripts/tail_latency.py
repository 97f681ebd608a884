"""Tail step latency: one decode position after a cached prefix, per provider and with or without IO binding.

    python scripts/tail_latency.py BUNDLE_DIR [BUNDLE_DIR ...] [--past 128 1024] [--steps 32]

Each BUNDLE_DIR is an export output (holding server/) or a server bundle. Hidden states are random: the latency of
the graph does not depend on them. Prints one line per (bundle, provider, binding, past length) with the median and
p90 of the per-step times, measured after a warm-up step.
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

from splitcore.device_runner import DeviceTailRunner  # noqa: E402
from splitcore.graphs import TailRunner  # noqa: E402
from splitcore.manifest import load_bundle  # noqa: E402


def step_times(tail: TailRunner, past: int, steps: int) -> list[float]:
    hidden_size = tail.bundle.manifest.model.hidden_size
    rng = np.random.default_rng(0)
    cache = tail.new_cache(1)
    prefix = rng.standard_normal((1, past, hidden_size)).astype(np.float32)
    tail.forward(prefix, np.ones((1, past), np.int64), np.arange(past)[None, :], cache, logits_to_keep=1)
    times = []
    for i in range(steps + 1):
        n = past + i
        hidden = rng.standard_normal((1, 1, hidden_size)).astype(np.float32)
        started = time.perf_counter()
        tail.forward(hidden, np.ones((1, n + 1), np.int64), np.array([[n]]), cache, logits_to_keep=1)
        times.append(time.perf_counter() - started)
    return times[1:]


def weight_bytes(bundle) -> int:
    spec = bundle.manifest.tail
    return sum(bundle.manifest.files[name].bytes for name in (spec.file, spec.data_file) if name)


def kv_bytes_per_position(tail: TailRunner) -> int:
    model = tail.bundle.manifest.model
    return 2 * tail.num_layers * model.num_key_value_heads * model.head_dim * tail.dtype.itemsize


def configurations(bundle_dtype: str) -> list[tuple[str, list[str], type[TailRunner]]]:
    available = ort.get_available_providers()
    configs = []
    if "CUDAExecutionProvider" in available:
        cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        configs += [("CUDA", cuda, TailRunner), ("CUDA+iobinding", cuda, DeviceTailRunner)]
    if bundle_dtype == "float32" or not configs:
        configs.append(("CPU", ["CPUExecutionProvider"], TailRunner))
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
        label = f"{spec.model.id} layers [{spec.tail.layers[0]}, {spec.tail.layers[1]}) {spec.tail.dtype}"
        for name, providers, runner in configurations(spec.tail.dtype):
            tail = runner(bundle, providers)
            for past in args.past:
                past = min(past, spec.model.max_position_embeddings - args.steps - 2)
                times = sorted(step_times(tail, past, args.steps))
                median, p90 = statistics.median(times), times[int(0.9 * (len(times) - 1))]
                # Bytes one decode step must read: every tail weight once, plus the cached keys and values.
                touched = weight_bytes(bundle) + past * kv_bytes_per_position(tail)
                share = touched / median / (args.peak_gbs * 1e9)
                print(f"{label:48s} {name:15s} past {past:5d}: step median {median * 1e3:7.2f} ms, "
                      f"p90 {p90 * 1e3:7.2f} ms, {touched / median / 1e9:7.1f} GB/s = {share:5.1%} of "
                      f"{args.peak_gbs:.0f} GB/s ({len(times)} steps, active {tail.providers[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
