"""What crosses the network: hidden states made by the client bundle's own head graph, through the runtime users run.

The victim's hidden states and the attacker's training and replay states all come from ``HeadRunner`` over the
bundle's ``head.onnx`` (the attacker can export the same public weights to the same graph), and the victim's
noise is ``splitcore.noise.BoundaryNoise``, the client's own code.
"""

from __future__ import annotations

import numpy as np

from splitcore.graphs import HeadRunner
from splitcore.noise import BoundaryNoise


def head_states(head: HeadRunner, ids: np.ndarray) -> np.ndarray:
    """Token ids [batch, seq] from position 0, unpadded -> hidden states [batch, seq, hidden] as float32.

    One run over a fresh pool of ``batch`` slots, every row a whole sequence (the graph's prefill path)."""
    batch, seq = ids.shape
    pool = head.new_pool(batch, seq)
    totals = np.full(batch, seq, dtype=np.int64)
    return head.run(np.ascontiguousarray(ids, dtype=np.int64), pool, 0, totals).astype(np.float32)


def sent_states(head: HeadRunner, prompts: list[list[int]], noise: BoundaryNoise | None) -> list[np.ndarray]:
    """What the tail operator receives for each prompt (one prefill, as the client sends it): [seq, hidden] each."""
    sent = []
    for ids in prompts:
        hidden = head_states(head, np.asarray([ids], dtype=np.int64))
        sent.append((noise(hidden) if noise is not None else hidden)[0])
    return sent


def batched_states(head: HeadRunner, ids: np.ndarray, batch: int = 32) -> np.ndarray:
    """head_states over many equal-length sequences, ``batch`` at a time, flattened to [sequences * seq, hidden]."""
    parts = [head_states(head, ids[i : i + batch]) for i in range(0, len(ids), batch)]
    return np.concatenate(parts, axis=0).reshape(-1, parts[0].shape[-1])
