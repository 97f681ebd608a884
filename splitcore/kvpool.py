"""KV memory reserved up front: a fixed number of slots of a fixed length, written in place by the graphs.

Per layer, one key and one value buffer [slots, kv_heads, max_length + 1, head_dim] on the runner's device (numpy
memory on CPU, an OrtValue on CUDA). A sequence owns one slot; a step binds the slot's rows of every buffer as the
graph's past *and* present, so the graph appends the new positions where they belong and nothing is copied, ever.
A batch is a range of slots plus a length per row.

The extra position per slot is scratch: a slot inside a batched run that has no token of its own this time still
runs (on zeros) and writes one position past its length, which its next real step overwrites.
"""

from __future__ import annotations

import itertools
import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from splitcore.errors import CapacityExceeded, LengthExceeded

MAX_BINDINGS = 64


@dataclass(frozen=True)
class SlotShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype


def _lazy_zeros(dims: list[int], dtype: np.dtype) -> np.ndarray:
    """A zeroed array in its own anonymous mapping, in plain 4 KiB pages.

    onnxruntime's CPU attention touches every position of a slot's buffer the first time the slot runs, so each
    slot's memory is faulted in once. np.zeros asks for transparent huge pages on large arrays (numpy's default on
    Linux), and with the common ``defrag = madvise`` setting each huge-page fault may compact memory first: a first
    step into a fresh 2,048-position SmolLM2 slot took 130-450 ms that way, 35-40 ms in plain pages.
    """
    count = int(np.prod(dims))
    buffer = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # also where the kernel gives huge pages to every mapping (``always``)
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(dims)


class KVPool:
    """``slots`` sequences of up to ``max_length`` positions each, for one graph's layers, on one device."""

    _serials = itertools.count(1)

    def __init__(self, shape: SlotShape, slots: int, max_length: int, device: str = "cpu", device_id: int = 0) -> None:
        if slots < 1 or max_length < 1:
            raise ValueError(f"a KV pool needs slots >= 1 and max_length >= 1, got {slots} and {max_length}")
        self.shape, self.slots, self.max_length = shape, slots, max_length
        # Unique for the life of the process (unlike id()): what a captured CUDA graph of this pool is filed under.
        self.serial = next(KVPool._serials)
        self.device, self.device_id = device, device_id
        self.buffer_length = max_length + 1
        dims = [slots, shape.kv_heads, self.buffer_length, shape.head_dim]
        # Zeroed memory: a row's attention may read positions past its own length (up to the batch's longest row),
        # masked out, but never NaN. On CPU the pages are mapped lazily, so unused slots cost no RAM.
        self._host: list[np.ndarray] = []
        self._values: list[ort.OrtValue] = []
        for _ in range(2 * shape.layers):
            if device == "cpu":
                array = _lazy_zeros(dims, shape.dtype)
                self._host.append(array)
                self._values.append(ort.OrtValue.ortvalue_from_numpy(array))
            else:
                self._values.append(ort.OrtValue.ortvalue_from_numpy(np.zeros(dims, shape.dtype), device, device_id))
        # IO bindings with a slot range's KV already bound, per (session, first slot, rows): a decode step then
        # rebinds only its small inputs (binding 2 x layers buffers cost ~0.25 ms per run). Bounded, oldest out.
        self._bindings: dict[tuple[int, int, int], ort.IOBinding] = {}
        self.lengths = np.zeros(slots, dtype=np.int64)
        self.in_use = np.zeros(slots, dtype=bool)
        self.slot_bytes = shape.kv_heads * self.buffer_length * shape.head_dim * shape.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes reserved by the whole pool (keys and values of every layer and slot)."""
        return 2 * self.shape.layers * self.slots * self.slot_bytes

    @property
    def bytes_per_slot(self) -> int:
        return 2 * self.shape.layers * self.slot_bytes

    @property
    def free(self) -> int:
        return int(self.slots - self.in_use.sum())

    def acquire(self) -> int:
        """The lowest free slot (so busy slots stay packed at the front and batches stay short), emptied."""
        free = np.flatnonzero(~self.in_use)
        if not free.size:
            raise CapacityExceeded(f"all {self.slots} KV slots are in use")
        slot = int(free[0])
        self.in_use[slot] = True
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self._check(slot)
        self.in_use[slot] = False
        self.lengths[slot] = 0

    def length(self, slot: int) -> int:
        return int(self.lengths[slot])

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first ``length`` positions (speculation rolled back); later ones are overwritten as they come."""
        self._check(slot)
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} positions, cannot keep {length}")
        self.lengths[slot] = length

    def restore(self, slot: int, length: int) -> None:
        """Set the slot back to the ``length`` positions it held before a ``truncate`` and the runs after it (the
        tail's drafts, splitcore/tail_drafts.py): what those runs wrote below ``length`` stays, for positions the
        client then rolls back."""
        self._check(slot)
        if not 0 <= length <= self.max_length:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} positions, cannot restore {length}")
        self.lengths[slot] = length

    def check_room(self, slot: int, new: int) -> None:
        held = int(self.lengths[slot])
        if held + new > self.max_length:
            raise LengthExceeded(f"maximum length exceeded: prefix {held} + current {new} > {self.max_length}")

    def binding(self, session: ort.InferenceSession, past: Sequence[tuple[str, str]],
                present: Sequence[tuple[str, str]], lo: int, rows: int) -> ort.IOBinding:
        """An IO binding of ``session`` with slots [lo, lo + rows) bound as past and present (kept for reuse; the
        binding holds the session, so its id stays unique while the entry lives)."""
        key = (id(session), lo, rows)
        binding = self._bindings.get(key)
        if binding is None:
            if len(self._bindings) >= MAX_BINDINGS:
                self._bindings.pop(next(iter(self._bindings)))
            binding = session.io_binding()
            self.bind(binding, past, present, lo, rows)
            self._bindings[key] = binding
        return binding

    def bind(self, binding: ort.IOBinding, past: Sequence[tuple[str, str]], present: Sequence[tuple[str, str]],
             lo: int, rows: int) -> None:
        """Bind slots [lo, lo + rows) of every layer as both the past inputs and the present outputs."""
        dims = [rows, self.shape.kv_heads, self.buffer_length, self.shape.head_dim]
        offset = lo * self.slot_bytes
        names = [n for pair in past for n in pair]
        outputs = [n for pair in present for n in pair]
        for value, name, out in zip(self._values, names, outputs):
            pointer = value.data_ptr() + offset
            binding.bind_input(name, self.device, self.device_id, self.shape.dtype, dims, pointer)
            binding.bind_output(out, self.device, self.device_id, self.shape.dtype, dims, pointer)

    def buffer_addresses(self) -> list[tuple[int, int]]:
        """(start, end) device addresses of every key and value buffer, in layer order: a step that allocated or
        copied KV would leave its output outside them. For tests and the load benchmark's copy counter."""
        size = self.slots * self.slot_bytes
        return [(value.data_ptr(), value.data_ptr() + size) for value in self._values]

    def host_view(self, layer: int, kind: int, slot: int) -> np.ndarray:
        """Keys (kind 0) or values (kind 1) of one layer (0-based within the graph) of one slot, [kv_heads, length,
        head_dim]: a view on CPU, a copy elsewhere. For tests and debugging."""
        length = int(self.lengths[slot])
        if self._host:
            return self._host[2 * layer + kind][slot, :, :length]
        return self._values[2 * layer + kind].numpy()[slot, :, :length]

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"no slot {slot} in a pool of {self.slots}")
