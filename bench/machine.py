"""What the numbers were measured on: CPU, cores, memory, measured memory bandwidth, and per-process peak RSS."""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BANDWIDTH_ARRAY_BYTES = 256 * 2**20  # well past any last-level cache


def describe() -> dict:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(_meminfo("MemTotal") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def memory_bandwidth(array_bytes: int = BANDWIDTH_ARRAY_BYTES, repeats: int = 5) -> dict:
    """STREAM-style copy and triad in numpy, best of ``repeats``, on one thread and on every core.

    Copy counts 2 bytes moved per byte copied (read + write). numpy's triad ``a = b + s * c`` runs as two passes
    (``a = s * c``; ``a += b``), so it moves 5 arrays' worth of bytes, and that is what is counted.
    """
    threads = os.cpu_count() or 1
    n = array_bytes // 8
    a, b, c = np.ones(n), np.full(n, 2.0), np.full(n, 3.0)
    slices = [slice(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def copy(part: slice) -> None:
        np.copyto(a[part], b[part])

    def triad(part: slice) -> None:
        np.multiply(c[part], 3.0, out=a[part])
        np.add(a[part], b[part], out=a[part])

    result = {}
    with ThreadPoolExecutor(threads) as pool:
        for name, kernel, moved in (("copy", copy, 2 * array_bytes), ("triad", triad, 5 * array_bytes)):
            for label, parts in (("1_thread", [slice(None)]), (f"{threads}_threads", slices)):
                best = min(_timed(lambda p=parts, k=kernel: list(pool.map(k, p))) for _ in range(repeats))
                result[f"{name}_{label}_gb_s"] = moved / best / 1e9
    result["best_gb_s"] = max(result.values())
    result["array_mib"] = array_bytes / 2**20
    return result


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM (peak resident set) of a live process; None where /proc is not there (not Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: on a shared machine, how busy it was around the measurement."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def available_memory_bytes() -> int:
    return _meminfo("MemAvailable")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _meminfo(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
