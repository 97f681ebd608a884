"""Run the head or the tail graph of a bundle with onnxruntime, carrying the KV cache between calls."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnxruntime as ort

from splitcore import names
from splitcore.errors import ManifestError, ShapeError
from splitcore.kvcache import KVCache
from splitcore.manifest import Bundle, GraphSpec
from splitcore.providers import active_providers, choose_providers, session_options

log = logging.getLogger(__name__)

NUMPY_DTYPES = {"int64": np.dtype(np.int64), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


class GraphRunner:
    """One onnxruntime session over one graph of a bundle; the names it feeds come from the manifest."""

    def __init__(
        self,
        bundle: Bundle,
        which: Literal["head", "tail", "full"],
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
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
        log.info("loading %s graph %s on %s", which, path, chosen[0])
        self.session = ort.InferenceSession(str(path), session_options(intra_op_threads), providers=chosen)
        self.providers = active_providers(providers, chosen, self.session.get_providers())
        self.first_input = self.spec.inputs[0].name
        self.output_names = [self.spec.outputs[0].name] + [n for pair in self.spec.present for n in pair]

    @property
    def num_layers(self) -> int:
        start, end = self.spec.layers
        return end - start

    def new_cache(self, batch: int = 1) -> KVCache:
        model = self.bundle.manifest.model
        return KVCache.empty(self.num_layers, batch, model.num_key_value_heads, model.head_dim, self.dtype)

    def run(
        self,
        first: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: KVCache,
        extra: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Run one chunk of ``seq`` positions after ``cache.length`` cached ones; the cache grows in place."""
        self.check_inputs(first, attention_mask, position_ids, cache.length)
        feeds = {self.first_input: first, names.ATTENTION_MASK: attention_mask, names.POSITION_IDS: position_ids}
        if extra:
            feeds.update(extra)
        for (key_name, value_name), key, value in zip(self.spec.past, cache.keys, cache.values):
            feeds[key_name] = key
            feeds[value_name] = value
        outputs = self.session.run(self.output_names, feeds)
        cache.replace(outputs[1::2], outputs[2::2])
        return outputs[0]

    def check_inputs(self, first: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: int) -> None:
        batch, seq = first.shape[0], first.shape[1]
        if attention_mask.shape != (batch, past + seq):
            raise ShapeError(
                f"{self.which}: attention_mask has shape {attention_mask.shape}, expected "
                f"({batch}, past {past} + new {seq})"
            )
        if position_ids.shape != (batch, seq):
            raise ShapeError(f"{self.which}: position_ids has shape {position_ids.shape}, expected ({batch}, {seq})")


class HeadRunner(GraphRunner):
    def __init__(self, bundle: Bundle, providers: Sequence[str] | None = None, intra_op_threads: int = 0) -> None:
        super().__init__(bundle, "head", providers, intra_op_threads)

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: KVCache
    ) -> np.ndarray:
        """Token ids [batch, seq] -> hidden states [batch, seq, hidden] at the split."""
        return self.run(input_ids, attention_mask, position_ids, cache)


class TailRunner(GraphRunner):
    def __init__(self, bundle: Bundle, providers: Sequence[str] | None = None, intra_op_threads: int = 0) -> None:
        super().__init__(bundle, "tail", providers, intra_op_threads)

    def forward(
        self,
        hidden_states: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: KVCache,
        logits_to_keep: int = 1,
    ) -> np.ndarray:
        """Hidden states at the split -> the tail's output for the last ``logits_to_keep`` positions (0: all).

        That output is ``logits`` [batch, kept, vocab] in output mode "logits" and ``final_hidden_states``
        [batch, kept, hidden] in output mode "hidden" (see ``LmHeadRunner``).
        """
        keep = {names.LOGITS_TO_KEEP: np.array(logits_to_keep, dtype=np.int64)}
        return self.run(hidden_states.astype(self.dtype, copy=False), attention_mask, position_ids, cache, keep)


class FullRunner(GraphRunner):
    """The unsplit graph of a ``full`` bundle: token ids in, logits out, every layer's KV in one cache."""

    def __init__(self, bundle: Bundle, providers: Sequence[str] | None = None, intra_op_threads: int = 0) -> None:
        super().__init__(bundle, "full", providers, intra_op_threads)

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: KVCache,
        logits_to_keep: int = 1,
    ) -> np.ndarray:
        """Token ids [batch, seq] -> logits [batch, kept, vocab]; 0 keeps every position, n the last n."""
        keep = {names.LOGITS_TO_KEEP: np.array(logits_to_keep, dtype=np.int64)}
        return self.run(input_ids, attention_mask, position_ids, cache, keep)


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


def continuation(past: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Attention mask and position ids of ``seq`` new positions after ``past`` cached ones, for one unpadded row."""
    return np.ones((1, past + seq), dtype=np.int64), np.arange(past, past + seq, dtype=np.int64)[None, :]


def positions_for(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """Position ids of the last ``seq`` columns of a (possibly left-padded) mask, as transformers computes them."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    positions = np.where(attention_mask > 0, positions, 0)
    return positions[:, -seq:].astype(np.int64)
