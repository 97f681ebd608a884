"""The tail with its KV cache kept on the execution device between steps, through onnxruntime IO binding.

``TailRunner`` feeds every past key/value as numpy and gets every present back as numpy: on CUDA that copies the
whole cache host -> device and back on every token, and the copies grow with the sequence. Here the present outputs
are bound to device memory and become the next step's past inputs as they are; only the hidden states go in and the
kept logits come out through host memory. The same class runs on the CPU provider (device "cpu"), which is how the
default test run checks it against ``TailRunner``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from splitcore import names
from splitcore.errors import SplitError
from splitcore.graphs import TailRunner
from splitcore.kvcache import KVCache
from splitcore.manifest import Bundle

log = logging.getLogger(__name__)

# onnxruntime's device names for the providers whose memory we know how to bind.
DEVICES = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}


@dataclass
class DeviceKVCache:
    """Keys and values of layers [start, end) as OrtValues on one device, each [batch, kv_heads, length, head_dim]."""

    keys: list[ort.OrtValue] = field(default_factory=list)
    values: list[ort.OrtValue] = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.keys[0].shape()[2]) if self.keys else 0

    @property
    def nbytes(self) -> int:
        return sum(k.tensor_size_in_bytes() + v.tensor_size_in_bytes() for k, v in zip(self.keys, self.values))

    @property
    def device(self) -> str:
        return self.keys[0].device_name().lower() if self.keys else "none"

    def replace(self, keys: list[ort.OrtValue], values: list[ort.OrtValue]) -> None:
        self.keys, self.values = keys, values

    def to_host(self) -> KVCache:
        """A numpy copy (for tests and debugging; the serving path never copies the cache back)."""
        return KVCache([k.numpy() for k in self.keys], [v.numpy() for v in self.values])


class DeviceTailRunner(TailRunner):
    """A ``TailRunner`` whose caches are ``DeviceKVCache`` objects on the device of the first active provider."""

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        device_id: int = 0,
    ) -> None:
        super().__init__(bundle, providers, intra_op_threads)
        device = DEVICES.get(self.providers[0])
        if device is None:
            raise SplitError(
                f"IO binding knows the devices of {list(DEVICES)}, but the tail runs on {self.providers[0]}; "
                "turn IO binding off (SPLIT_SERVER_IO_BINDING=off)"
            )
        self.device, self.device_id = device, device_id
        log.info("tail KV caches stay on %s:%d between steps (IO binding)", device, device_id)

    def new_cache(self, batch: int = 1) -> DeviceKVCache:  # type: ignore[override]
        model = self.bundle.manifest.model
        shape = [batch, model.num_key_value_heads, 0, model.head_dim]

        def empty() -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype.type, self.device, self.device_id)

        return DeviceKVCache([empty() for _ in range(self.num_layers)], [empty() for _ in range(self.num_layers)])

    def run(  # type: ignore[override]
        self,
        first: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: DeviceKVCache,
        extra: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """One chunk after ``cache.length`` cached positions; the cache's OrtValues are replaced by the presents."""
        if not isinstance(cache, DeviceKVCache):
            raise TypeError(f"DeviceTailRunner needs a cache from its own new_cache(), got {type(cache).__name__}")
        self.check_inputs(first, attention_mask, position_ids, cache.length)
        binding = self.session.io_binding()
        host_inputs = {self.first_input: first, names.ATTENTION_MASK: attention_mask, names.POSITION_IDS: position_ids}
        for name, array in {**host_inputs, **(extra or {})}.items():
            # Host OrtValues (onnxruntime copies them to the device); bind_cpu_input cannot bind logits_to_keep,
            # an initializer the caller may override, while bind_ortvalue_input can.
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)))
        for (key_name, value_name), key, value in zip(self.spec.past, cache.keys, cache.values):
            binding.bind_ortvalue_input(key_name, key)
            binding.bind_ortvalue_input(value_name, value)
        binding.bind_output(self.output_names[0], "cpu")
        for name in self.output_names[1:]:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        cache.replace(outputs[1::2], outputs[2::2])
        return np.array(outputs[0].numpy(), copy=True)
