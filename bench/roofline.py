"""Bytes a decode step must read, from the manifest's model facts: the bandwidth bound of each configuration.

A decode step multiplies one token by every weight matrix once, so it reads every layer's weights and the LM head;
of the embedding table it reads one row. Norm weights are counted; biases (Llama has none) are not.
"""

from __future__ import annotations

from splitcore.manifest import ModelSpec


def layer_weights(model: ModelSpec) -> int:
    h, d = model.hidden_size, model.head_dim
    attention = h * model.num_attention_heads * d * 2 + h * model.num_key_value_heads * d * 2  # q, o + k, v
    mlp = 3 * h * model.intermediate_size
    return attention + mlp + 2 * h


def weight_bytes_per_token(model: ModelSpec, split_layer: int | None = None, head_bytes_per_weight: float = 4.0,
                           bytes_per_weight: float = 4.0) -> float:
    """Bytes read per decoded token; layers [0, split_layer) at ``head_bytes_per_weight`` (an int8 head)."""
    k = split_layer or 0
    head = (model.hidden_size + k * layer_weights(model)) * head_bytes_per_weight
    tail = ((model.num_layers - k) * layer_weights(model) + model.hidden_size * (1 + model.vocab_size))
    return head + tail * bytes_per_weight


def bandwidth_share(bytes_per_token: float, tokens_per_s: float, bandwidth_gb_s: float) -> float:
    """Achieved weight-read bandwidth over the measured machine bandwidth (1.0 = memory-bound ceiling)."""
    return bytes_per_token * tokens_per_s / (bandwidth_gb_s * 1e9)
