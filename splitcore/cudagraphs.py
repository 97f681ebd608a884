"""Decode steps on CUDA replayed as captured CUDA graphs: one graph per (KV pool, batch size), launched as one unit.

A decode step of a tail is ~10 kernels per layer, each too short to hide its launch: on an H100 the TinyLlama-shaped
fp16 step was launch-bound at 8% of the HBM bound. onnxruntime's CUDA provider can capture a run into a CUDA graph
(``enable_cuda_graph``) and replay it with one launch, if every input and output sits at the same device address
with the same shape on every run and no node copies between host and device. A decode step fits: rows are always
the first ``rows`` slots of a pool (rows rounded up to a bucket; a slot without a token this time runs on zeros and
writes only its scratch position, see splitcore/kvpool.py), its KV is bound in place at fixed addresses, and the
step's hidden states, per-row lengths and outputs live in device buffers of the graph's own, refilled before each
replay. ``total_sequence_length`` (a host input of GroupQueryAttention, which would be frozen into the capture) is
the pool's maximum length on every run: the kernels read each row's real length from ``seqlens_k`` on the device.

Prompt chunks and everything else run as plain runs (graph id -1). Captured graphs live in the session's CUDA
provider, per thread: the service captures every bucket on its one worker thread at start and runs every step of a
GPU tail there.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from splitcore import names
from splitcore.kvpool import KVPool

log = logging.getLogger(__name__)

# Graphs one session captures at most (each holds its kernels' launch parameters, little memory); beyond it, decode
# steps of further pools or sizes run as plain runs.
MAX_GRAPHS = 32
PLAIN_RUN = "-1"  # onnxruntime's graph annotation id for "do not capture this run"


def buckets(slots: int) -> list[int]:
    """Batch sizes graphs are captured for: powers of two below ``slots``, and ``slots``."""
    sizes = [1 << i for i in range(slots.bit_length()) if 1 << i < slots]
    return [*sizes, slots]


def bucket(slots: int, rows: int) -> int:
    """The smallest captured batch size that covers the first ``rows`` slots of a pool of ``slots``."""
    return next(size for size in buckets(slots) if size >= rows)


@dataclass
class _Graph:
    """The fixed device buffers and binding of one captured decode step."""

    run_options: ort.RunOptions
    binding: ort.IOBinding
    hidden: ort.OrtValue
    seqlens: ort.OrtValue
    output: ort.OrtValue
    keep: list[object] = field(default_factory=list)  # host values the binding refers to


class DecodeGraphs:
    """The captured decode steps of one onnxruntime session (a GraphRunner on CUDA with ``enable_cuda_graph``)."""

    def __init__(self, session: ort.InferenceSession, first_input: str, output_name: str, dtype: np.dtype,
                 output_dtype: np.dtype, output_width: int, past: Sequence[tuple[str, str]],
                 present: Sequence[tuple[str, str]], positions: int, device_id: int) -> None:
        self.session = session
        self.first_input, self.output_name = first_input, output_name
        self.dtype, self.output_dtype, self.output_width = dtype, output_dtype, output_width
        self.past, self.present = past, present
        self.positions = positions
        self.device_id = device_id
        self.plain = ort.RunOptions()
        self.plain.add_run_config_entry("gpu_graph_id", PLAIN_RUN)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._ids = itertools.count(1)
        self._warned = False

    def usable(self, pool: KVPool) -> bool:
        # GroupQueryAttention reads a decode step with total_sequence_length 1 as a first prompt; and the rotary
        # table must cover the total it is given.
        return pool.device == "cuda" and 2 <= self._total(pool)

    def capture(self, pool: KVPool, width: int) -> int:
        """Capture the decode step of every batch-size bucket of ``pool`` now, on the calling thread (a service does
        this before its first request, so no request waits for a capture). Needs every slot free: each run writes
        position 0 of every slot, scratch until a slot's first real step. Returns the number of graphs."""
        if pool.in_use.any():
            raise ValueError("capturing decode graphs needs a pool with no slot in use")
        sizes = buckets(pool.slots)
        for rows in sizes:
            self.decode(np.zeros((rows, 1, width), dtype=self.dtype), pool, np.arange(rows))
        return len(sizes)

    def decode(self, first: np.ndarray, pool: KVPool, index: np.ndarray) -> np.ndarray | None:
        """Outputs [n, 1, width] for rows ``first`` [n, 1, hidden] of slots ``index``; None when no graph can be used
        (the caller then runs the step plainly). Lengths are the caller's to update."""
        rows = bucket(pool.slots, int(index.max()) + 1)
        graph = self._graph(pool, rows, first.shape[-1])
        if graph is None:
            return None
        batch = np.zeros((rows, *first.shape[1:]), dtype=self.dtype)
        batch[index] = first
        graph.hidden.update_inplace(batch)
        graph.seqlens.update_inplace(pool.lengths[:rows].astype(np.int32))
        self.session.run_with_iobinding(graph.binding, graph.run_options)
        return graph.output.numpy()[index]

    def _total(self, pool: KVPool) -> int:
        return min(pool.max_length, self.positions)

    def _graph(self, pool: KVPool, rows: int, width: int) -> _Graph | None:
        key = (pool.serial, rows)
        graph = self._graphs.get(key)
        if graph is not None or not self.usable(pool):
            return graph
        if len(self._graphs) >= MAX_GRAPHS:
            if not self._warned:
                log.warning("%d CUDA graphs captured already; further decode shapes run without one", MAX_GRAPHS)
                self._warned = True
            return None
        graph_id = next(self._ids)
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
        binding = self.session.io_binding()
        pool.bind(binding, self.past, self.present, 0, rows)
        device = ("cuda", self.device_id)
        hidden = ort.OrtValue.ortvalue_from_shape_and_type([rows, 1, width], self.dtype, *device)
        seqlens = ort.OrtValue.ortvalue_from_shape_and_type([rows], np.int32, *device)
        output = ort.OrtValue.ortvalue_from_shape_and_type([rows, 1, self.output_width], self.output_dtype, *device)
        total = ort.OrtValue.ortvalue_from_numpy(np.array(self._total(pool), dtype=np.int32))
        binding.bind_ortvalue_input(self.first_input, hidden)
        binding.bind_ortvalue_input(names.SEQLENS_K, seqlens)
        binding.bind_ortvalue_input(names.TOTAL_SEQUENCE_LENGTH, total)
        binding.bind_ortvalue_output(self.output_name, output)
        graph = _Graph(options, binding, hidden, seqlens, output, [total])
        self._graphs[key] = graph
        log.info("capturing the decode step of %d rows as CUDA graph %d", rows, graph_id)
        return graph
