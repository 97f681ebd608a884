"""The KV cache of one span of layers for one batch of sequences, as plain numpy arrays in layer order."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class KVCache:
    """Keys and values of layers [start, end), each [batch, kv_heads, length, head_dim]."""

    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def empty(cls, layers: int, batch: int, kv_heads: int, head_dim: int, dtype: np.dtype) -> KVCache:
        shape = (batch, kv_heads, 0, head_dim)
        return cls([np.zeros(shape, dtype) for _ in range(layers)], [np.zeros(shape, dtype) for _ in range(layers)])

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def replace(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        self.keys, self.values = keys, values
