"""Bytes a decode step must read, from the manifest's model facts: the bandwidth bound of each configuration.

A decode step multiplies one token by every weight matrix once, so it reads every layer's weights and the LM head;
of the embedding table it reads one row. Norm weights are counted; biases (Llama has none) are not. Quantized
matrices (``MatMulNBits``, blocks of 32) carry a float32 scale and a zero point per block besides their bits.
"""

from __future__ import annotations

from pathlib import Path

from splitcore.manifest import ModelSpec

BLOCK = 32
# Bytes per weight: the bits, plus per block of 32 a float32 scale and a zero point of the same width.
INT8 = 1 + (4 + 1) / BLOCK
INT4 = 0.5 + (4 + 0.5) / BLOCK
FLOAT = {"fp32": 4.0, "fp16": 2.0}


def layer_matrices(model: ModelSpec) -> dict[str, int]:
    h, d = model.hidden_size, model.head_dim
    return {"attention": h * model.num_attention_heads * d * 2 + h * model.num_key_value_heads * d * 2,  # q, o, k, v
            "gate_up": 2 * h * model.intermediate_size, "down": h * model.intermediate_size}


def per_weight(scheme: str) -> dict[str, float]:
    """Bytes per weight of each matrix class under a ``--weights`` scheme (see export/matmul_weights.py)."""
    if scheme in FLOAT:
        return dict.fromkeys(("attention", "gate_up", "down", "lm_head"), FLOAT[scheme])
    if scheme == "int8":
        return dict.fromkeys(("attention", "gate_up", "down", "lm_head"), INT8)
    if scheme == "int4-mlp":
        return {"attention": INT8, "gate_up": INT4, "down": INT8, "lm_head": INT8}
    if scheme == "int4":
        return {"attention": INT4, "gate_up": INT4, "down": INT4, "lm_head": INT8}
    raise ValueError(f"unknown weight scheme {scheme!r}")


def weight_bytes_per_token(model: ModelSpec, scheme: str = "fp32") -> float:
    """Bytes read per decoded token by the whole model (head + tail, or the one graph) with ``scheme`` weights."""
    sizes, width = layer_matrices(model), per_weight(scheme)
    layer = sum(n * width[kind] for kind, n in sizes.items()) + 2 * model.hidden_size * 4
    embedding_row = model.hidden_size * 4
    lm_head = model.hidden_size * model.vocab_size * width["lm_head"] + model.hidden_size * 4
    return model.num_layers * layer + embedding_row + lm_head


def file_bytes(*paths: Path) -> float:
    """An outside engine's bytes per token, approximated by its weight files (tied embeddings are read in full as
    the LM head, so the table is not counted twice)."""
    return float(sum(p.stat().st_size for p in paths if p.is_file()))


def bandwidth_share(bytes_per_token: float, tokens_per_s: float, bandwidth_gb_s: float) -> float:
    """Achieved weight-read bandwidth over the measured machine bandwidth (1.0 = memory-bound ceiling)."""
    return bytes_per_token * tokens_per_s / (bandwidth_gb_s * 1e9)
