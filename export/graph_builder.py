"""Write the split's ONNX graphs straight from a transformers model's weights, the way onnxruntime-genai's model
builder lays out a Llama graph: fused RMSNorm, one packed QKV projection, ``GroupQueryAttention`` with rotary
embedding inside and a KV buffer shared by past and present, optionally 4- or 8-bit ``MatMulNBits`` weights.

Why not torch.onnx: its graphs grow the KV cache with ``Concat`` (a copy of the whole cache per layer per token), and
neither the in-place buffer nor the quantized matmuls come out of a trace. Why not optimum-onnx: it pins
transformers < 4.58 and breaks the SmolLM2 GGUF tokenizer. Why not onnxruntime-genai's builder itself: it cannot
start a graph at layer K. The graphs are checked against the transformers model on every export (export/validate.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from export.matmul_weights import MatMulWeights
from splitcore import names
from splitcore.errors import SplitError
from splitcore.manifest import GraphSpec, TensorSpec

log = logging.getLogger(__name__)

# Bumped whenever the graphs this module writes change, so `make export` re-exports bundles made by older code.
GRAPH_REVISION = 9
OPSET = 17
# onnx 1.23 writes IR 14 by default, which onnxruntime-gpu up to 1.31 (the tail image) refuses; every onnxruntime
# since 1.20 reads IR 10.
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
TORCH_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
# Rope types whose frequencies do not depend on the sequence length, so one precomputed cos/sin table is exact; and
# dynamic NTK, which within the model's positions (all a conversation may hold) is the default rope: it only grows
# its frequencies past them.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ROPE_TYPES = (*STATIC_ROPE_TYPES, "dynamic")
# onnxruntime's GroupQueryAttention with the rotary inside refuses other head sizes (1.32, CPU: "head_size shall be
# a multiple of 16"); checked with the config, before any weights load (export/sources.py).
HEAD_DIM_MULTIPLE = 16
# The MLP activations (config.hidden_act) the graphs build, as transformers computes them: SiLU, exact GELU, and
# GELU's tanh approximation (transformers' "gelu_pytorch_tanh" and "gelu_new" are the same formula). Written out in
# plain operators: onnxruntime fuses SiLU and exact GELU into one kernel each; the tanh form stays ten elementwise
# operators (its FastGelu fusion did not match any arrangement tried, onnxruntime 1.32).
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new")


@dataclass(frozen=True)
class Attention:
    """What the attention of every layer needs, read once from the model."""

    num_heads: int
    kv_heads: int
    head_dim: int
    scale: float
    windows: tuple[int | None, ...]  # per layer: attend to this many most recent positions (None: all)


def attention_facts(model: torch.nn.Module) -> Attention:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    scale = float(getattr(model.model.layers[0].self_attn, "scaling", head_dim**-0.5))
    return Attention(c.num_attention_heads, c.num_key_value_heads, head_dim, scale, sliding_windows(c))


def sliding_windows(config) -> tuple[int | None, ...]:
    """Per layer, the sliding window of the attention (transformers' rule: a query sees the ``window`` most recent
    positions, itself included), or None where a layer attends to everything."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if not window:
        return (None,) * n
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    if getattr(config, "use_sliding_window", True) is False:
        return (None,) * n
    return (int(window),) * n


def rotary_tables(model: torch.nn.Module, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [positions, head_dim / 2] from the model's own rotary module, so any static rope scaling
    (llama3, linear, yarn, with its attention factor folded in) is exactly what transformers computes."""
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise SplitError(f"rope type {kind!r} depends on the sequence length; the exporter supports "
                         f"{', '.join(ROPE_TYPES)}")
    rotary = model.model.rotary_emb
    position_ids = torch.arange(positions, dtype=torch.int64)[None, :]
    with torch.no_grad():
        if kind == "dynamic":
            # The module's own frequencies before any growth, as its forward uses them for sequences within the
            # model's positions (called on the whole table, which has one row more, it would grow them).
            freqs = position_ids[0, :, None].float() * rotary.original_inv_freq.float()
            return (freqs.cos() * rotary.attention_scaling).numpy(), (freqs.sin() * rotary.attention_scaling).numpy()
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), position_ids)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


class GraphBuilder:
    """Builds one graph (a span of layers, with or without the embedding and the output side) node by node."""

    def __init__(self, model: torch.nn.Module, dtype: np.dtype, weights: MatMulWeights,
                 lm_head_weights: MatMulWeights, progress: Callable[[str], None] = lambda message: None) -> None:
        self.model, self.dtype = model, np.dtype(dtype)
        self.weights, self.lm_head_weights = weights, lm_head_weights
        self.attention = attention_facts(model)
        self.eps = float(model.config.rms_norm_eps)
        self.progress = progress
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()

    # -- primitives --------------------------------------------------------------------------------------------
    def constant(self, name: str, array: np.ndarray) -> str:
        assert name not in self._names, name
        self._names.add(name)
        array = array if array.flags.c_contiguous else np.ascontiguousarray(array)  # keeps 0-d arrays 0-d
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0] + "/" + op, domain=domain, **attrs))
        return outputs

    def tensor(self, value: torch.Tensor) -> np.ndarray:
        return value.detach().to(torch.float32).numpy().astype(self.dtype)

    def linear(self, x: str, weight: torch.Tensor, bias: torch.Tensor | None, name: str,
               scheme: MatMulWeights | None = None) -> str:
        """x @ weight.T (+ bias): weight [out, in] as transformers stores it."""
        out = (scheme or self.weights).matmul(self, x, weight.detach().to(torch.float32).numpy().T, name)
        if bias is not None:
            out = self.node("Add", [out, self.constant(name + ".bias", self.tensor(bias))], [name + "/biased"])[0]
        return out

    def rms_norm(self, x: str, weight: torch.Tensor, name: str) -> str:
        w = self.constant(name + ".weight", self.tensor(weight))
        return self.node("SimplifiedLayerNormalization", [x, w], [name], axis=-1, epsilon=self.eps, stash_type=1)[0]

    def activation(self, x: str, prefix: str) -> str:
        """The model's ``hidden_act`` of x (one of ACTIVATIONS; sources.check_config refuses the rest)."""
        kind = getattr(self.model.config, "hidden_act", "silu")
        if kind not in ACTIVATIONS:
            raise SplitError(f"hidden_act {kind!r}: the graphs build {', '.join(ACTIVATIONS)}")

        def scalar(name: str, value: float) -> str:
            return self.constant(f"{prefix}.{name}", np.array(value, dtype=self.dtype))

        if kind in ("silu", "swish"):
            return self.node("Mul", [x, self.node("Sigmoid", [x], [f"{prefix}.sigmoid"])[0]], [f"{prefix}.silu"])[0]
        if kind == "gelu":  # 0.5 x (1 + erf(x / sqrt 2))
            curve = self.node("Erf", [self.node("Div", [x, scalar("sqrt2", np.sqrt(2.0))], [f"{prefix}.scaled"])[0]],
                              [f"{prefix}.erf"])[0]
        else:  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            cube = self.node("Mul", [x, self.node("Mul", [x, x], [f"{prefix}.square"])[0]], [f"{prefix}.cube"])[0]
            inner = self.node("Add", [x, self.node("Mul", [cube, scalar("coefficient", 0.044715)],
                                                   [f"{prefix}.cubic"])[0]], [f"{prefix}.inner"])[0]
            curve = self.node("Tanh", [self.node("Mul", [inner, scalar("sqrt2_pi", np.sqrt(2.0 / np.pi))],
                                                 [f"{prefix}.scaled"])[0]], [f"{prefix}.tanh"])[0]
        one_plus = self.node("Add", [curve, scalar("one", 1.0)], [f"{prefix}.one_plus"])[0]
        half_x = self.node("Mul", [x, scalar("half", 0.5)], [f"{prefix}.half_x"])[0]
        return self.node("Mul", [half_x, one_plus], [f"{prefix}.gelu"])[0]

    def skip_rms_norm(self, x: str, residual: str, weight: torch.Tensor, name: str) -> tuple[str, str]:
        """(norm(x + residual), x + residual) in one fused node."""
        w = self.constant(name + ".weight", self.tensor(weight))
        normed, _, _, summed = self.node("SkipSimplifiedLayerNormalization", [x, residual, w],
                                         [name, "", "", name + "/residual"], domain=MS_DOMAIN, epsilon=self.eps)
        return normed, summed

    # -- the model's pieces ------------------------------------------------------------------------------------
    def decoder_layer(self, i: int, normed: str, residual: str, next_norm: torch.Tensor | None) -> tuple[str, str]:
        """Layer i from its normed input; returns (the next layer's normed input or the residual sum, residual)."""
        layer = self.model.model.layers[i]
        attn, mlp, a = layer.self_attn, layer.mlp, self.attention
        prefix = f"layers.{i}"
        qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dim=0)
        qkv_bias = None
        if attn.q_proj.bias is not None:
            qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], dim=0)
        qkv = self.linear(normed, qkv_weight, qkv_bias, f"{prefix}.attn.qkv_proj")
        past_key, past_value = names.past_names(i)
        present_key, present_value = names.present_names(i)
        window = a.windows[i]
        # Both count the query itself: a window of W sees the W most recent positions (measured against
        # transformers on a 16-token sequence with W = 8).
        context = self.node(
            "GroupQueryAttention",
            [qkv, "", "", past_key, past_value, names.SEQLENS_K, names.TOTAL_SEQUENCE_LENGTH, "cos_cache", "sin_cache"],
            [f"{prefix}.attn.context", present_key, present_value],
            domain=MS_DOMAIN, num_heads=a.num_heads, kv_num_heads=a.kv_heads, scale=a.scale, do_rotary=1,
            rotary_interleaved=0, local_window_size=window if window else -1,
        )[0]
        attended = self.linear(context, attn.o_proj.weight, attn.o_proj.bias, f"{prefix}.attn.o_proj")
        normed, residual = self.skip_rms_norm(attended, residual, layer.post_attention_layernorm.weight,
                                              f"{prefix}.post_attention_layernorm")
        # Gate and up as one matmul, split after: one kernel launch instead of two per layer (each output column is
        # quantized on its own, so the stored weights and the results are the same as two separate matmuls).
        gate_up_bias = None
        if mlp.gate_proj.bias is not None:
            gate_up_bias = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias], dim=0)
        gate_up = self.linear(normed, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0), gate_up_bias,
                              f"{prefix}.mlp.gate_up_proj")
        width = mlp.gate_proj.weight.shape[0]
        halves = self.constant(f"{prefix}.mlp.halves", np.array([width, width], dtype=np.int64))
        gate, up = self.node("Split", [gate_up, halves], [f"{prefix}.mlp.gate", f"{prefix}.mlp.up"], axis=-1)
        product = self.node("Mul", [self.activation(gate, f"{prefix}.mlp"), up], [f"{prefix}.mlp.product"])[0]
        down = self.linear(product, mlp.down_proj.weight, mlp.down_proj.bias, f"{prefix}.mlp.down_proj")
        if next_norm is None:
            return self.node("Add", [down, residual], [f"{prefix}/output"])[0], residual
        return self.skip_rms_norm(down, residual, next_norm, f"layers.{i + 1}.input_layernorm")

    def span(self, x: str, start: int, end: int) -> str:
        """Layers [start, end) on x; returns the residual stream after the last one."""
        layers = self.model.model.layers
        normed, residual = self.rms_norm(x, layers[start].input_layernorm.weight, f"layers.{start}.input_layernorm"), x
        for i in range(start, end):
            next_norm = layers[i + 1].input_layernorm.weight if i + 1 < end else None
            normed, residual = self.decoder_layer(i, normed, residual, next_norm)
            self.progress(f"layer {i + 1 - start}/{end - start}")
        return normed

    def last_positions(self, x: str) -> str:
        """The last ``logits_to_keep`` positions of x (0: all of them), as transformers counts them.

        The arithmetic reads only the sequence length (``Shape``, whose output lives in host memory on every
        provider) and ``logits_to_keep`` itself, so onnxruntime runs it on the CPU beside a GPU graph and hands the
        start to ``Slice`` in host memory: no copy between host and device, which would rule out CUDA graphs.
        """
        seq = self.node("Shape", [x], ["kept/sequence"], start=1, end=2)[0]
        # seq - keep is the start when keep > 0, floored at 0 (keep > seq keeps everything: Slice would read a
        # negative start from the end); keep = 0 makes it seq itself, and then the start is 0.
        zero = self.constant("kept/zero", np.array([0]))
        tail_start = self.node("Sub", [seq, names.LOGITS_TO_KEEP], ["kept/tail_start"])[0]
        positive = self.node("Less", [tail_start, seq], ["kept/positive"])[0]
        floored = self.node("Max", [tail_start, zero], ["kept/floored"])[0]
        start = self.node("Where", [positive, floored, zero], ["kept/start"])[0]
        end = self.constant("kept/end", np.array([np.iinfo(np.int64).max]))
        return self.node("Slice", [x, start, end, self.constant("kept/axis", np.array([1]))], ["kept/hidden"])[0]

    def logits(self, x: str) -> str:
        normed = self.rms_norm(x, self.model.model.norm.weight, "norm")
        out = self.linear(normed, self.model.lm_head.weight, getattr(self.model.lm_head, "bias", None), "lm_head",
                          self.lm_head_weights)
        if self.dtype != np.float32:  # samplers want float32 logits; the cast is one [batch, kept, vocab] pass
            return self.node("Cast", [out], [names.LOGITS], to=TensorProto.FLOAT)[0]
        return self.node("Identity", [out], [names.LOGITS])[0]

    # -- whole graphs ------------------------------------------------------------------------------------------
    def build(self, start: int, end: int, embed: bool, output: str, positions: int) -> onnx.ModelProto:
        """Layers [start, end); ``embed``: token ids in (else hidden states); ``output``: hidden_states,
        final_hidden_states or logits."""
        a, hidden = self.attention, self.model.config.hidden_size
        elem = TORCH_TO_ONNX[self.dtype]
        # One row past the model's positions: a full slot that sits in a batched decode run without a token of its
        # own writes its scratch position (splitcore/kvpool.py), which is rotated like any other.
        cos, sin = rotary_tables(self.model, positions + 1)
        self.constant("cos_cache", cos.astype(self.dtype))
        self.constant("sin_cache", sin.astype(self.dtype))
        inputs = []
        if embed:
            inputs.append(helper.make_tensor_value_info(names.INPUT_IDS, TensorProto.INT64,
                                                        [names.BATCH, names.SEQUENCE]))
            table = self.model.model.embed_tokens.weight.detach().to(torch.float32).numpy()
            x = self.weights.gather(self, table, names.INPUT_IDS, "embed_tokens")
        else:
            inputs.append(helper.make_tensor_value_info(names.HIDDEN_STATES, elem,
                                                        [names.BATCH, names.SEQUENCE, hidden]))
            x = names.HIDDEN_STATES
        inputs.append(helper.make_tensor_value_info(names.SEQLENS_K, TensorProto.INT32, [names.BATCH]))
        inputs.append(helper.make_tensor_value_info(names.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []))
        kv_shape = [names.BATCH, a.kv_heads, names.KV_BUFFER, a.head_dim]
        outputs = []
        residual = self.span(x, start, end)
        if output == names.HIDDEN_STATES:
            self.node("Identity", [residual], [names.HIDDEN_STATES])
            outputs.append(helper.make_tensor_value_info(names.HIDDEN_STATES, elem,
                                                         [names.BATCH, names.SEQUENCE, hidden]))
        else:
            # An initializer named like an input is a default the caller may override: 0 keeps every position.
            inputs.append(helper.make_tensor_value_info(names.LOGITS_TO_KEEP, TensorProto.INT64, []))
            self.constant(names.LOGITS_TO_KEEP, np.array(0, dtype=np.int64))
            kept = self.last_positions(residual)
            if output == names.LOGITS:
                self.logits(kept)
                width, out_elem = self.model.config.vocab_size, TensorProto.FLOAT
            else:
                self.node("Identity", [kept], [names.FINAL_HIDDEN_STATES])
                width, out_elem = hidden, elem
            outputs.append(helper.make_tensor_value_info(output, out_elem, [names.BATCH, names.KEPT_SEQUENCE, width]))
        for i in range(start, end):
            for name in names.past_names(i):
                inputs.append(helper.make_tensor_value_info(name, elem, kv_shape))
            for name in names.present_names(i):
                outputs.append(helper.make_tensor_value_info(name, elem, kv_shape))
        graph = helper.make_graph(self.nodes, "split", inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        return helper.make_model(graph, opset_imports=opsets, producer_name="splitllm", ir_version=IR_VERSION)

    def build_lm_head(self) -> onnx.ModelProto:
        """Final norm + LM head alone: the client's graph in private-output mode."""
        hidden = self.model.config.hidden_size
        elem = TORCH_TO_ONNX[self.dtype]
        self.logits(names.FINAL_HIDDEN_STATES)
        inputs = [helper.make_tensor_value_info(names.FINAL_HIDDEN_STATES, elem, [names.BATCH, names.SEQUENCE, hidden])]
        outputs = [helper.make_tensor_value_info(names.LOGITS, TensorProto.FLOAT,
                                                 [names.BATCH, names.SEQUENCE, self.model.config.vocab_size])]
        graph = helper.make_graph(self.nodes, "lm_head", inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        return helper.make_model(graph, opset_imports=opsets, producer_name="splitllm", ir_version=IR_VERSION)


def save(model: onnx.ModelProto, path: Path) -> None:
    """The graph and one external data file beside it (graphs of a 1B model pass protobuf's 2 GB limit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def graph_spec(path: Path, layers: range, dtype: np.dtype, weights: str, lm_head_weights: str | None,
               embedding_weights: str | None = None) -> GraphSpec:
    """The manifest entry of a saved graph, read back from the file itself."""
    model = onnx.load(str(path), load_external_data=False)
    data_files = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                  if entry.key == "location"}
    if len(data_files) > 1:
        raise RuntimeError(f"{path} refers to several external data files: {sorted(data_files)}")
    return GraphSpec(
        file=path.name,
        data_file=data_files.pop() if data_files else None,
        layers=(layers.start, layers.stop),
        dtype=DTYPE_NAMES[np.dtype(dtype)],
        inputs=[_tensor_spec(v) for v in model.graph.input],
        outputs=[_tensor_spec(v) for v in model.graph.output],
        past=[names.past_names(i) for i in layers],
        present=[names.present_names(i) for i in layers],
        weights=weights,
        lm_head_weights=lm_head_weights,
        embedding_weights=embedding_weights,
    )


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim]
    return TensorSpec(name=value.name, dtype=dtype, shape=shape)
