"""Run the head, the tail or the unsplit graph of a bundle with onnxruntime, on KV memory written in place.

Every graph takes its KV cache as fixed-size buffers (see ``splitcore.kvpool``): a step binds the slots it runs as
both past and present through IO binding, so the new positions are written where they belong and no step copies
the cache, on the CPU or on CUDA alike. Only the step's input goes in and its (kept) output comes back through host
memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from splitcore import names
from splitcore.cudagraphs import DecodeGraphs
from splitcore.errors import ManifestError, ShapeError, SplitError
from splitcore.kvpool import KVPool, SlotShape
from splitcore.lookahead import Lookahead
from splitcore.manifest import Bundle, GraphSpec
from splitcore.providers import active_providers, choose_providers, session_options

log = logging.getLogger(__name__)

NUMPY_DTYPES = {"int64": np.dtype(np.int64), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
# onnxruntime's device names for the providers whose memory we know how to bind.
DEVICES = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}
KEEP_ALL = np.array(0, dtype=np.int64)  # logits_to_keep: every position
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
             "tensor(int32)": "int32"}


class GraphRunner:
    """One onnxruntime session over one graph of a bundle; the names it feeds come from the manifest."""

    def __init__(
        self,
        bundle: Bundle,
        which: Literal["head", "tail", "full"],
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        device_id: int = 0,
        cuda_graphs: bool = False,
    ) -> None:
        self.bundle = bundle
        spec = getattr(bundle.manifest, which)
        if spec is None:
            raise ManifestError(f"the bundle in {bundle.root} has no {which} graph; export it with --{which}")
        self.spec: GraphSpec = spec
        self.which = which
        self.dtype = NUMPY_DTYPES[self.spec.dtype]
        chosen = choose_providers(providers)
        path = bundle.path(self.spec.file)
        log.info("loading %s graph %s (%s weights) on %s", which, path, self.spec.weights, chosen[0])
        capture = cuda_graphs and chosen[0] == "CUDAExecutionProvider"
        options = session_options(intra_op_threads, spinning=chosen[0] == "CPUExecutionProvider")
        self.session, capture = _session(path, options, chosen, capture, device_id)
        self.providers = active_providers(providers, chosen, self.session.get_providers())
        self.device = DEVICES.get(self.providers[0])
        if self.device is None:
            raise SplitError(f"KV buffers can be bound on {list(DEVICES)}, but the {which} runs on {self.providers[0]}")
        self.device_id = device_id
        self.first_input = self.spec.inputs[0].name
        self.output_name = self.spec.outputs[0].name
        keeps_logits = any(i.name == names.LOGITS_TO_KEEP for i in self.spec.inputs)
        self._keep_all = ort.OrtValue.ortvalue_from_numpy(KEEP_ALL) if keeps_logits else None
        check_graph(self.session, self.spec, which, str(path))
        output = self.spec.outputs[0]
        self.output_dtype = NUMPY_DTYPES[output.dtype]
        self.output_width = output.shape[-1]
        if not isinstance(self.output_width, int):
            raise ManifestError(f"{path}: output {output.name!r} must have a fixed last axis, the manifest says "
                                f"{output.shape}; re-run the export")
        model = bundle.manifest.model
        start, end = self.spec.layers
        self.slot_shape = SlotShape(end - start, model.num_key_value_heads, model.head_dim, self.dtype)
        # Decode steps replayed as CUDA graphs (splitcore/cudagraphs.py); every other run says it is not one.
        self.graphs: DecodeGraphs | None = None
        self._run_options: ort.RunOptions | None = None
        if capture and self.device == "cuda":
            self.graphs = DecodeGraphs(self.session, self.first_input, self.output_name, self.dtype,
                                       self.output_dtype, self.output_width, self.spec.past, self.spec.present,
                                       model.max_position_embeddings, device_id)
            self._run_options = self.graphs.plain

    @property
    def num_layers(self) -> int:
        start, end = self.spec.layers
        return end - start

    def new_pool(self, slots: int, max_length: int) -> KVPool:
        return KVPool(self.slot_shape, slots, max_length, self.device, self.device_id)

    def new_cache(self, max_length: int | None = None) -> KVPool:
        """A one-slot pool for one sequence (slot 0, acquired); ``max_length`` defaults to the model's positions."""
        pool = self.new_pool(1, max_length or self.bundle.manifest.model.max_position_embeddings)
        pool.acquire()
        return pool

    def run(self, first: np.ndarray, pool: KVPool, lo: int, totals: np.ndarray,
            extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """One run over slots [lo, lo + batch): row r ends up holding ``totals[r]`` positions. Lengths are the
        caller's to update."""
        rows, seq = first.shape[0], first.shape[1]
        binding = pool.binding(self.session, self.spec.past, self.spec.present, lo, rows)
        first = np.ascontiguousarray(first)
        seqlens = (totals - 1).astype(np.int32)
        total = np.array(int(totals.max()), dtype=np.int32)
        binding.bind_cpu_input(self.first_input, first)
        binding.bind_cpu_input(names.SEQLENS_K, seqlens)
        binding.bind_cpu_input(names.TOTAL_SEQUENCE_LENGTH, total)
        kept = seq
        extra_values = []
        extra = extra or {}
        if self._keep_all is not None and names.LOGITS_TO_KEEP not in extra:
            # The binding is reused (KVPool.binding): every input is bound anew on every run, or it would still point
            # at an earlier run's (freed) value. 0 keeps every position, the graph's default.
            binding.bind_ortvalue_input(names.LOGITS_TO_KEEP, self._keep_all)
        for name, array in extra.items():
            # An OrtValue input, since bind_cpu_input cannot override an initializer (logits_to_keep).
            extra_values.append(ort.OrtValue.ortvalue_from_numpy(array))
            binding.bind_ortvalue_input(name, extra_values[-1])
            if name == names.LOGITS_TO_KEEP and 0 < int(array) < seq:
                kept = int(array)
        # The output straight into a numpy array of its known shape: no wrapping of every bound output afterwards.
        output = np.empty((rows, kept, self.output_width), dtype=self.output_dtype)
        binding.bind_output(self.output_name, "cpu", 0, self.output_dtype, list(output.shape), output.ctypes.data)
        self.session.run_with_iobinding(binding, self._run_options)
        return output

    def extend(self, first: np.ndarray, pool: KVPool, slot: int = 0, extra: dict[str, np.ndarray] | None = None
               ) -> np.ndarray:
        """``seq`` new positions [1, seq, ...] after what ``slot`` holds (a prompt, a chunk of one, or drafts)."""
        if first.ndim < 2 or first.shape[0] != 1 or first.shape[1] < 1:
            raise ShapeError(f"{self.which}: a step of one sequence needs shape [1, seq >= 1, ...], got {first.shape}")
        seq = first.shape[1]
        pool.check_room(slot, seq)
        totals = np.array([pool.lengths[slot] + seq], dtype=np.int64)
        output = self.run(first, pool, slot, totals, extra)
        pool.lengths[slot] += seq
        return output

    def decode(self, first: np.ndarray, pool: KVPool, slots: Sequence[int],
               extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """One new position for each of ``slots`` (rows of ``first`` [n, 1, ...] in the same order), in one run.

        The run covers the slot range from the lowest to the highest; slots in between without a token run on
        zeros and write only their scratch position. Returns the outputs in the order of ``slots``.
        """
        if first.shape[0] != len(slots) or first.shape[1] != 1:
            raise ShapeError(f"{self.which}: decode needs [{len(slots)}, 1, ...], got {first.shape}")
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one decode run: {list(slots)}")
        for slot in slots:
            pool.check_room(slot, 1)
        index = np.asarray(slots, dtype=np.int64)
        if self.graphs is not None and not extra and self.graphs.usable(pool):
            output = self.graphs.decode(first, pool, index)
            if output is not None:
                pool.lengths[index] += 1
                return output
        lo, hi = int(index.min()), int(index.max()) + 1
        if hi - lo == len(slots):
            batch = np.empty((hi - lo, *first.shape[1:]), dtype=first.dtype)
        else:
            batch = np.zeros((hi - lo, *first.shape[1:]), dtype=first.dtype)
        batch[index - lo] = first
        totals = pool.lengths[lo:hi] + 1
        output = self.run(batch, pool, lo, totals, extra)
        pool.lengths[index] += 1
        return output[index - lo]


def _session(path: Path, options: ort.SessionOptions, providers: list[str], capture: bool, device_id: int
             ) -> tuple[ort.InferenceSession, bool]:
    """An onnxruntime session over ``path`` and whether it may capture CUDA graphs: with ``capture`` its CUDA
    provider is asked to, and where onnxruntime refuses that for this graph (a node it cannot place on the GPU) the
    session is made without."""
    if capture:
        configured = [("CUDAExecutionProvider", {"enable_cuda_graph": "1", "device_id": str(device_id)}),
                      *providers[1:]]
        try:
            return ort.InferenceSession(str(path), options, providers=configured), True
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            log.warning("CUDA graphs are off for %s: %s", path, _gist(str(e)))
    try:
        return ort.InferenceSession(str(path), options, providers=providers), False
    except Exception as e:  # onnxruntime raises its own exception types for unreadable or invalid graphs
        raise ManifestError(f"onnxruntime cannot load {path}: {_gist(str(e))}") from None


def _gist(message: str, limit: int = 300) -> str:
    """The first line of onnxruntime's error, its middle cut when long: the reason is usually at the end, after the
    source file and function it came from."""
    line = message.splitlines()[0] if message else "unknown error"
    return line if len(line) <= limit else f"{line[:80]} ... {line[-(limit - 85):]}"


def check_graph(session: ort.InferenceSession, spec: GraphSpec, which: str, path: str) -> None:
    """The graph onnxruntime loaded must have the IO the manifest promises: a bundle whose graph and manifest
    disagree is refused when it is loaded, not on the first request."""
    inputs = {i.name: i for i in [*session.get_inputs(), *session.get_overridable_initializers()]}
    outputs = {o.name: o for o in session.get_outputs()}
    for tensor, found, kind in [(t, inputs, "input") for t in spec.inputs] + [(t, outputs, "output")
                                                                               for t in spec.outputs]:
        got = found.get(tensor.name)
        if got is None:
            raise ManifestError(f"{path}: the manifest lists {kind} {tensor.name!r}, the graph has "
                                f"{sorted(found)}; re-run the export")
        dtype = ORT_TYPES.get(got.type, got.type)
        if dtype != tensor.dtype:
            raise ManifestError(f"{path}: {kind} {tensor.name!r} is {got.type} in the graph, the manifest says "
                                f"{tensor.dtype}; re-run the export")
        for axis, (want, have) in enumerate(zip(tensor.shape, got.shape)):
            if isinstance(want, int) and isinstance(have, int) and want != have:
                raise ManifestError(f"{path}: {kind} {tensor.name!r} has {have} on axis {axis}, the manifest says "
                                    f"{want}; re-run the export")


class HeadRunner(GraphRunner):
    def __init__(self, bundle: Bundle, providers: Sequence[str] | None = None, intra_op_threads: int = 0) -> None:
        super().__init__(bundle, "head", providers, intra_op_threads)

    def forward(self, input_ids: np.ndarray, cache: KVPool, slot: int = 0) -> np.ndarray:
        """Token ids [1, seq] after what the slot holds -> hidden states [1, seq, hidden] at the split."""
        return self.extend(token_ids(input_ids, self.bundle.manifest.model.vocab_size), cache, slot)


class TailRunner(GraphRunner):
    def __init__(self, bundle: Bundle, providers: Sequence[str] | None = None, intra_op_threads: int = 0,
                 device_id: int = 0, cuda_graphs: bool = False) -> None:
        super().__init__(bundle, "tail", providers, intra_op_threads, device_id, cuda_graphs)
        spec = bundle.manifest.lookahead
        self.lookahead = None if spec is None else Lookahead(bundle.path(spec.file), bundle.manifest.model.vocab_size,
                                                             spec.confidence_edges, spec.chances)

    def forward(self, hidden_states: np.ndarray, cache: KVPool, slot: int = 0, logits_to_keep: int = 1) -> np.ndarray:
        """Hidden states [1, seq, hidden] -> the tail's output for the last ``logits_to_keep`` positions (0: all).

        That output is ``logits`` [1, kept, vocab] in output mode "logits" and ``final_hidden_states``
        [1, kept, hidden] in output mode "hidden" (see ``LmHeadRunner``).
        """
        keep = {names.LOGITS_TO_KEEP: np.array(logits_to_keep, dtype=np.int64)}
        return self.extend(hidden_states.astype(self.dtype, copy=False), cache, slot, keep)

    def decode_rows(self, hidden_states: np.ndarray, pool: KVPool, slots: Sequence[int]) -> np.ndarray:
        """One position for each slot: hidden [n, 1, hidden] -> output [n, 1, ...]."""
        return self.decode(hidden_states.astype(self.dtype, copy=False), pool, slots)


class FullRunner(GraphRunner):
    """The unsplit graph of a ``full`` bundle: token ids in, logits out, every layer's KV in one pool."""

    def __init__(self, bundle: Bundle, providers: Sequence[str] | None = None, intra_op_threads: int = 0) -> None:
        super().__init__(bundle, "full", providers, intra_op_threads)

    def forward(self, input_ids: np.ndarray, cache: KVPool, slot: int = 0, logits_to_keep: int = 1) -> np.ndarray:
        """Token ids [1, seq] -> logits [1, kept, vocab]; 0 keeps every position, n the last n."""
        keep = {names.LOGITS_TO_KEEP: np.array(logits_to_keep, dtype=np.int64)}
        return self.extend(token_ids(input_ids, self.bundle.manifest.model.vocab_size), cache, slot, keep)


def token_ids(input_ids: np.ndarray, vocab: int) -> np.ndarray:
    """``input_ids`` as int64, each checked to be a token of the vocabulary: a quantized embedding
    (``GatherBlockQuantized``) does not bounds-check its indices, so an id past the table would read other memory."""
    try:
        ids = np.asarray(input_ids, dtype=np.int64)
    except OverflowError:
        raise ShapeError(f"a token id is beyond int64, outside this model's vocabulary 0..{vocab - 1}") from None
    if ids.size and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ShapeError(f"token id {bad} is outside this model's vocabulary 0..{vocab - 1}")
    return ids


class LmHeadRunner:
    """The final norm + LM head of a private-output client bundle: final hidden states -> logits, on this machine."""

    def __init__(self, bundle: Bundle, providers: Sequence[str] | None = None, intra_op_threads: int = 0) -> None:
        spec = bundle.manifest.lm_head
        if spec is None:
            raise ManifestError(
                f"the bundle in {bundle.root} has output_mode {bundle.manifest.output_mode!r} and no lm_head graph; "
                "export with --private-output to run the LM head on the client"
            )
        self.spec = spec
        self.dtype = NUMPY_DTYPES[spec.dtype]
        self.providers = choose_providers(providers)
        path = bundle.path(spec.file)
        log.info("loading lm_head graph %s on %s", path, self.providers[0])
        self.session = ort.InferenceSession(str(path), session_options(intra_op_threads), providers=self.providers)
        self.input_name = spec.inputs[0].name
        self.output_name = spec.outputs[0].name
        self.hidden_size = bundle.manifest.model.hidden_size

    def forward(self, final_hidden_states: np.ndarray) -> np.ndarray:
        """[batch, seq, hidden] -> logits [batch, seq, vocab]."""
        if final_hidden_states.ndim != 3 or final_hidden_states.shape[-1] != self.hidden_size:
            raise ShapeError(
                f"lm_head: {self.input_name} has shape {final_hidden_states.shape}, expected "
                f"(batch, sequence, {self.hidden_size})"
            )
        feeds = {self.input_name: final_hidden_states.astype(self.dtype, copy=False)}
        return self.session.run([self.output_name], feeds)[0]
