"""onnxruntime session settings: which execution providers to use and how many threads, chosen once."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from splitcore.errors import SplitError

log = logging.getLogger(__name__)

PREFERENCE = ("CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Requested providers, all of which must be available; by default the best available one plus CPU.

    A requested provider that is missing is an error rather than a silent CPU fallback: a server asked to run on
    CUDA must not quietly run on CPU.
    """
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise SplitError(f"execution providers {missing} are not available; this onnxruntime has {available}")
        return list(requested)
    return [p for p in PREFERENCE if p in available]


def active_providers(requested: Sequence[str] | None, chosen: Sequence[str], active: Sequence[str]) -> list[str]:
    """The providers a session really runs on, checked against what was asked for.

    ``get_available_providers`` lists what this onnxruntime build contains, not what can start: without a usable
    driver or CUDA/cuDNN libraries onnxruntime-gpu enables only the CPU provider (or retries on CPU after an error).
    Requested providers must all be active; a best-available choice that fell back is only logged.
    """
    missing = [p for p in chosen if p not in active]
    if missing and requested:
        raise SplitError(
            f"onnxruntime could not enable {missing} (active: {list(active)}); check that the GPU is visible "
            "(nvidia-smi), the driver is new enough for this image's CUDA, and the CUDA/cuDNN libraries match "
            "this onnxruntime-gpu build"
        )
    if missing:
        log.warning("onnxruntime could not enable %s; running on %s", missing, list(active))
    return list(active)


def cpu_threads() -> int:
    """Threads for a CPU graph by default: the physical cores this process may run on (one per core: a second
    hardware thread of a core adds little to these kernels), and no more than a cgroup CPU quota grants (a pod's
    CPU limit), at least 1.

    Why not onnxruntime's own default (0): it counts the machine's physical cores, ignoring quotas, and *pins* its
    threads to them, so two processes on one machine (a client and a local service, or a service and its neighbour)
    pile their threads onto the same cores. SmolLM2 int4-mlp split over HTTP on a 2-core box, alternating rounds:
    91 tok/s with onnxruntime's pinned default, 104 with the same two threads unpinned.
    """
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(tuple((topology / name).read_text().strip() for name in ("physical_package_id", "core_id")))
        except OSError:
            cores.add(("", str(cpu)))
    threads = len(cores)
    quota = cgroup_cpus()
    if quota is not None:
        threads = min(threads, max(1, math.ceil(quota)))
    return max(1, threads)


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs a cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us``) quota grants this process, if one is set: its
    own cgroup's (as /proc/self/cgroup names it, for a host process under systemd's ``CPUQuota``), else the root's
    (what a container sees)."""
    candidates: list[tuple[str, str | None]] = []
    try:
        candidates += [(f"{line[4:]}/cpu.max", None) for line in membership.read_text().splitlines()
                       if line.startswith("0::/") and len(line) > 4]
    except OSError:
        pass
    candidates += [("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")]
    for quota_file, period_file in candidates:
        try:
            fields = (root / quota_file).read_text().split()
            quota = fields[0]
            period = fields[1] if period_file is None else (root / period_file).read_text().strip()
            if quota in ("max", "-1"):
                return None
            return int(quota) / int(period)
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return None


def session_options(intra_op_threads: int = 0, spinning: bool = True) -> ort.SessionOptions:
    """Session options for latency-bound decoding.

    On CPU (``spinning``), intra-op threads spin while a run is in progress (a decode step is hundreds of small
    kernels; waking sleeping threads for each costs more than the kernel) and stop spinning the moment the run
    returns (``session.force_spinning_stop``), so a head and a tail in one process, or a client and a service on one
    machine, do not steal each other's cores between runs. On a 2-core box, SmolLM2 int4-mlp split in process:
    90 tok/s with spinning off, 65 with spinning left on after runs, 115 with spinning stopped after each run. A
    graph on a GPU leaves the CPU pool idle through its runs: spinning there would only burn the host's cores
    (every one of them, by default) beside the service's event loop.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or cpu_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    return options
