"""Decode steps on CUDA replayed as captured CUDA graphs: one graph per (KV pool, batch size), launched as one unit.

A decode step of a tail is ~10 kernels per layer, each too short to hide its launch: on an H100 the TinyLlama-shaped
fp16 step was launch-bound at 8% of the HBM bound. onnxruntime's CUDA provider can capture a run into a CUDA graph
(``enable_cuda_graph``) and replay it with one launch, if every input and output sits at the same device address
with the same shape on every run and no node copies between host and device. A decode step fits: rows are always
the first ``rows`` slots of a pool (rows rounded up to a bucket; a slot without a token this time runs on zeros and
writes only its scratch position, see splitcore/kvpool.py; a step that would run many more rows that way than
plainly runs plainly), its KV is bound in place at fixed addresses, and the
step's hidden states, per-row lengths and outputs live in device buffers of the graph's own, refilled before each
replay. ``total_sequence_length`` (a host input of GroupQueryAttention, which would be frozen into the capture) is
the pool's maximum length on every run: the kernels read each row's real length from ``seqlens_k`` on the device.

Prompt chunks and everything else run as plain runs (graph id -1). Captured graphs live in the session's CUDA
provider, per thread: the service captures every bucket on its one worker thread at start and runs every step of a
GPU tail there. A capture that fails turns graphs off for the session (steps then run plainly), and a pool's graphs'
buffers go with the pool.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from splitcore import names
from splitcore.kvpool import KVPool

log = logging.getLogger(__name__)

# Graphs one session captures at most (onnxruntime keeps each until the session ends; little memory apiece); beyond
# it, decode steps of further pools or sizes run as plain runs.
MAX_GRAPHS = 32
PLAIN_RUN = "-1"  # onnxruntime's graph annotation id for "do not capture this run"
# Rows a captured step may run beyond those a plain run of the same step covers (the slots from its lowest to its
# highest row): on an H200 a captured TinyLlama-shaped step saves ~0.4 ms of launches and each extra row costs
# ~0.04 ms, so with many more padding rows the plain run is faster.
MAX_PADDING_ROWS = 8


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
                 present: Sequence[tuple[str, str]], positions: int, device_id: int, device: str = "cuda") -> None:
        """``device``: where the graph's buffers live; "cpu" runs this very code on the CPU provider, which ignores
        graph ids, so every "replay" is a plain run (the tests check the bookkeeping that way)."""
        self.session = session
        self.first_input, self.output_name = first_input, output_name
        self.dtype, self.output_dtype, self.output_width = dtype, output_dtype, output_width
        self.past, self.present = past, present
        self.positions = positions
        self.device, self.device_id = device, device_id
        self.plain = ort.RunOptions()
        self.plain.add_run_config_entry("gpu_graph_id", PLAIN_RUN)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._watched: set[int] = set()  # pools whose graphs are dropped when the pool goes
        self._ids = itertools.count(1)
        self.issued = 0  # graph ids handed to onnxruntime, captured or not
        self.disabled = False  # a capture failed: every decode step runs plainly from then on
        self.plain_steps = 0  # decode steps this object declined (for benchmarks: were they really captured?)
        self._warned = False

    def usable(self, pool: KVPool) -> bool:
        # GroupQueryAttention reads a decode step with total_sequence_length 1 as a first prompt; and the rotary
        # table must cover the total it is given.
        return not self.disabled and pool.device == self.device and 2 <= self._total(pool)

    def capture(self, pool: KVPool, width: int) -> int:
        """Capture the decode step of every batch-size bucket of ``pool`` now, on the calling thread (a service does
        this before it reports ready). Needs every slot free: each run writes position 0 of every slot, scratch
        until a slot's first real step. Returns the number of graphs captured (0 where the pool cannot have any)."""
        if not self.usable(pool):
            return 0
        if pool.in_use.any():
            raise ValueError("capturing decode graphs needs a pool with no slot in use")
        captured = 0
        for rows in buckets(pool.slots):
            if self.decode(np.zeros((rows, 1, width), dtype=self.dtype), pool, np.arange(rows)) is None:
                break
            captured += 1
        return captured

    def decode(self, first: np.ndarray, pool: KVPool, index: np.ndarray) -> np.ndarray | None:
        """Outputs [n, 1, width] for rows ``first`` [n, 1, hidden] of slots ``index``; None when no graph can be used
        (the caller then runs the step plainly). Lengths are the caller's to update."""
        lo, hi = int(index.min()), int(index.max()) + 1
        rows = bucket(pool.slots, hi)
        key = (pool.serial, rows)
        graph = self._graphs.get(key)
        new = graph is None
        if new and rows - (hi - lo) <= MAX_PADDING_ROWS:
            graph = self._new_graph(pool, rows, first.shape[-1])
        if graph is None or rows - (hi - lo) > MAX_PADDING_ROWS:
            self.plain_steps += 1
            return None
        batch = np.zeros((rows, *first.shape[1:]), dtype=self.dtype)
        batch[index] = first
        graph.hidden.update_inplace(batch)
        graph.seqlens.update_inplace(pool.lengths[:rows].astype(np.int32))
        try:
            self.session.run_with_iobinding(graph.binding, graph.run_options)
        except Exception:
            if not new:
                raise
            log.exception("capturing the decode step of %d rows as a CUDA graph failed; decode steps run without "
                          "CUDA graphs from now on", rows)
            self.disabled = True
            self.plain_steps += 1
            return None
        if new:
            self._graphs[key] = graph
            if pool.serial not in self._watched:
                self._watched.add(pool.serial)
                weakref.finalize(pool, self._forget, pool.serial)
        return graph.output.numpy()[index]

    def _forget(self, serial: int) -> None:
        """A pool is gone: drop its graphs' buffers and bindings (the bindings point into its freed KV memory; their
        graph ids are never run again)."""
        for key in list(self._graphs):
            if key[0] == serial:
                self._graphs.pop(key, None)
        self._watched.discard(serial)

    def _total(self, pool: KVPool) -> int:
        return min(pool.max_length, self.positions)

    def _new_graph(self, pool: KVPool, rows: int, width: int) -> _Graph | None:
        """The device buffers and binding of a decode step not captured yet (captured by its first run)."""
        if not self.usable(pool):
            return None
        if self.issued >= MAX_GRAPHS:
            if not self._warned:
                log.warning("%d CUDA graphs captured already; further decode shapes run without one", MAX_GRAPHS)
                self._warned = True
            return None
        self.issued += 1
        graph_id = next(self._ids)
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
        binding = self.session.io_binding()
        pool.bind(binding, self.past, self.present, 0, rows)
        device = (self.device, self.device_id)
        hidden = ort.OrtValue.ortvalue_from_shape_and_type([rows, 1, width], self.dtype, *device)
        seqlens = ort.OrtValue.ortvalue_from_shape_and_type([rows], np.int32, *device)
        output = ort.OrtValue.ortvalue_from_shape_and_type([rows, 1, self.output_width], self.output_dtype, *device)
        total = ort.OrtValue.ortvalue_from_numpy(np.array(self._total(pool), dtype=np.int32))
        binding.bind_ortvalue_input(self.first_input, hidden)
        binding.bind_ortvalue_input(names.SEQLENS_K, seqlens)
        binding.bind_ortvalue_input(names.TOTAL_SEQUENCE_LENGTH, total)
        binding.bind_ortvalue_output(self.output_name, output)
        log.info("capturing the decode step of %d rows as CUDA graph %d", rows, graph_id)
        return _Graph(options, binding, hidden, seqlens, output, [total])
