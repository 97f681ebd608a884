"""Torch modules that cut a Hugging Face Llama model into a head and a tail with flat KV tensors.

The decoder layers are driven through their submodules (norms, projections, MLP, rotary) rather than through
``LlamaDecoderLayer.forward``: that keeps the graph free of ``Cache`` objects and of the attention-implementation
dispatch, so the exported graphs take and return one plain tensor per key and per value.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# Bumped whenever the graphs these modules export change, so `make export` re-exports bundles made by older code.
GRAPH_REVISION = 2


def causal_mask(attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [batch, 1, query, total] mask: a query sees keys that are not padding and not in its future."""
    total = attention_mask.shape[1]
    past = total - query_length
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = torch.arange(query_length, device=attention_mask.device) + past
    allowed = (key_pos[None, :] <= query_pos[:, None])[None, None, :, :]
    allowed = allowed & (attention_mask[:, None, None, :] > 0)
    # finfo.min instead of -inf: a fully padded query row then softmaxes to uniform instead of NaN.
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    zero = torch.tensor(0.0, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, blocked)


def decoder_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Llama decoder layer; returns the new hidden states and the full (past + new) key and value."""
    attn = layer.self_attn
    batch, seq, _ = hidden.shape
    head_dim = attn.head_dim
    residual = hidden
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(batch, seq, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, seq, -1, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(batch, seq, -1, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    key = torch.cat([past_key, k], dim=2)
    value = torch.cat([past_value, v], dim=2)

    # Grouped-query attention without repeating the KV heads: the query heads that share a KV head are stacked
    # along the query axis, so every step reads each cached key and value once instead of copying them n_rep times.
    kv_heads = key.shape[1]
    n_rep = q.shape[1] // kv_heads
    grouped = q.reshape(batch, kv_heads, n_rep * seq, head_dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)) * attn.scaling
    scores = scores.reshape(batch, kv_heads, n_rep, seq, -1) + mask[:, :, None]
    # Softmax in fp32 so an fp16 graph does not overflow on long contexts.
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).reshape(batch, kv_heads, n_rep * seq, -1)
    out = torch.matmul(probs, value).reshape(batch, -1, seq, head_dim).transpose(1, 2).reshape(batch, seq, -1)
    hidden = residual + attn.o_proj(out)
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, key, value


class LayerSpan(nn.Module):
    """Decoder layers [start, end) with flat KV inputs; shared by the head and the tail."""

    def __init__(self, model: nn.Module, start: int, end: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(model.model.layers[start:end])
        self.rotary_emb = model.model.rotary_emb

    def run_layers(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, past: tuple
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cos, sin = self.rotary_emb(hidden, position_ids)
        mask = causal_mask(attention_mask, hidden.shape[1], hidden.dtype)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            hidden, key, value = decoder_layer(layer, hidden, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [key, value]
        return hidden, presents


class Head(LayerSpan):
    """Token embedding + layers [0, K): runs on the user's machine."""

    def __init__(self, model: nn.Module, split_layer: int) -> None:
        super().__init__(model, 0, split_layer)
        self.embed_tokens = model.model.embed_tokens

    def forward(self, input_ids, attention_mask, position_ids, *past):
        hidden, presents = self.run_layers(self.embed_tokens(input_ids), attention_mask, position_ids, past)
        return (hidden, *presents)


def last_positions(hidden: torch.Tensor, logits_to_keep: torch.Tensor) -> torch.Tensor:
    """The last ``logits_to_keep`` positions (0: all of them), as transformers counts them."""
    seq = hidden.shape[1]
    keep = torch.where(logits_to_keep > 0, logits_to_keep, seq)
    start = seq - keep
    index = torch.arange(seq, device=hidden.device)
    return hidden[:, index >= start, :]


def last_logits(
    norm: nn.Module, lm_head: nn.Module, hidden: torch.Tensor, logits_to_keep: torch.Tensor
) -> torch.Tensor:
    """Norm + LM head over the last ``logits_to_keep`` positions only: prefill pays for one vocab matmul."""
    return lm_head(norm(last_positions(hidden, logits_to_keep)))


class Tail(LayerSpan):
    """Layers [K, N) + final norm + LM head: runs on the server.

    ``logits_to_keep`` follows the transformers convention: 0 keeps every position, n keeps the last n. Prefill
    asks for 1, so the vocab-sized matmul runs once instead of once per prompt token.

    With ``private_output`` the tail stops after layer N-1, before the final norm, and returns the kept positions'
    residual stream; ``LmHead`` then runs on the client. Stopping before the norm keeps the tail a plain layer span
    like the head and puts every output-side weight (norm and LM head) in the client's graph.
    """

    def __init__(self, model: nn.Module, split_layer: int, private_output: bool = False) -> None:
        super().__init__(model, split_layer, len(model.model.layers))
        self.private_output = private_output
        if not private_output:
            self.norm = model.model.norm
            self.lm_head = model.lm_head

    def forward(self, hidden_states, attention_mask, position_ids, logits_to_keep, *past):
        hidden, presents = self.run_layers(hidden_states, attention_mask, position_ids, past)
        if self.private_output:
            return (last_positions(hidden, logits_to_keep), *presents)
        return (last_logits(self.norm, self.lm_head, hidden, logits_to_keep), *presents)


class Full(LayerSpan):
    """Embedding + every layer + norm + LM head in one graph: the unsplit baseline the split is measured against.

    Same IO conventions as the head (``input_ids`` in) and the tail (``logits_to_keep``, ``logits`` out), so one
    runner drives all three.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, 0, len(model.model.layers))
        self.embed_tokens = model.model.embed_tokens
        self.norm = model.model.norm
        self.lm_head = model.lm_head

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, *past):
        hidden, presents = self.run_layers(self.embed_tokens(input_ids), attention_mask, position_ids, past)
        return (last_logits(self.norm, self.lm_head, hidden, logits_to_keep), *presents)


class LmHead(nn.Module):
    """Final norm + LM head: final hidden states -> logits. The client's graph in private-output mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.norm = model.model.norm
        self.lm_head = model.lm_head

    def forward(self, final_hidden_states):
        return self.lm_head(self.norm(final_hidden_states))
