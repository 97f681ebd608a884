"""Export the head, the tail (and optionally the unsplit model) as ONNX graphs with dynamic batch, sequence and past
axes."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
from pathlib import Path

import onnx
import torch
from onnx import helper, numpy_helper

from export.modules import Full, Head, LmHead, Tail
from splitcore import names
from splitcore.manifest import GraphSpec, TensorSpec

log = logging.getLogger(__name__)

# Example sizes for tracing: all > 1 and distinct, so no axis is specialised to a constant by accident.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5
OPSET = 18
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16"}


def export_head(model: torch.nn.Module, split_layer: int, dtype: torch.dtype, path: Path) -> GraphSpec:
    module = Head(model, split_layer)
    first = torch.randint(0, model.config.vocab_size, (EXAMPLE_BATCH, EXAMPLE_SEQ))
    first_name, first_dims = names.INPUT_IDS, {0: names.BATCH, 1: names.SEQUENCE}
    layers = range(0, split_layer)
    return _export(module, model, layers, first, first_name, first_dims, names.HIDDEN_STATES, dtype, path, False)


def export_tail(
    model: torch.nn.Module, split_layer: int, dtype: torch.dtype, path: Path, private_output: bool = False
) -> GraphSpec:
    module = Tail(model, split_layer, private_output)
    first = torch.randn(EXAMPLE_BATCH, EXAMPLE_SEQ, model.config.hidden_size, dtype=dtype)
    first_name, first_dims = names.HIDDEN_STATES, {0: names.BATCH, 1: names.SEQUENCE}
    layers = range(split_layer, model.config.num_hidden_layers)
    output = names.FINAL_HIDDEN_STATES if private_output else names.LOGITS
    return _export(module, model, layers, first, first_name, first_dims, output, dtype, path, True)


def export_full(model: torch.nn.Module, dtype: torch.dtype, path: Path) -> GraphSpec:
    """All layers in one graph, head-style input and tail-style output: the single-process ONNX baseline."""
    module = Full(model)
    first = torch.randint(0, model.config.vocab_size, (EXAMPLE_BATCH, EXAMPLE_SEQ))
    first_name, first_dims = names.INPUT_IDS, {0: names.BATCH, 1: names.SEQUENCE}
    layers = range(0, model.config.num_hidden_layers)
    return _export(module, model, layers, first, first_name, first_dims, names.LOGITS, dtype, path, True)


def export_lm_head(model: torch.nn.Module, dtype: torch.dtype, path: Path) -> GraphSpec:
    """Final norm + LM head as its own graph for the client (private-output mode); it holds no decoder layer."""
    module = LmHead(model).eval()
    first = torch.randn(EXAMPLE_BATCH, EXAMPLE_SEQ, model.config.hidden_size, dtype=dtype)
    dims = {0: names.BATCH, 1: names.SEQUENCE}
    save_onnx(module, (first,), [names.FINAL_HIDDEN_STATES], [names.LOGITS], (dims,), path)
    n = model.config.num_hidden_layers
    return graph_spec(path, range(n, n), DTYPE_NAMES[dtype])


def _export(
    module: torch.nn.Module,
    model: torch.nn.Module,
    layers: range,
    first: torch.Tensor,
    first_name: str,
    first_dims: dict,
    first_output: str,
    dtype: torch.dtype,
    path: Path,
    keeps_logits: bool,
) -> GraphSpec:
    module.eval()
    config = model.config
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past = [torch.randn(EXAMPLE_BATCH, kv_heads, EXAMPLE_PAST, head_dim, dtype=dtype) for _ in range(2 * len(layers))]
    mask = torch.ones(EXAMPLE_BATCH, EXAMPLE_PAST + EXAMPLE_SEQ, dtype=torch.int64)
    positions = torch.arange(EXAMPLE_PAST, EXAMPLE_PAST + EXAMPLE_SEQ).repeat(EXAMPLE_BATCH, 1)
    kv_dims = {0: names.BATCH, 2: names.PAST_SEQUENCE}

    past_pairs = [names.past_names(i) for i in layers]
    present_pairs = [names.present_names(i) for i in layers]
    input_names = [first_name, names.ATTENTION_MASK, names.POSITION_IDS]
    args: tuple = (first, mask, positions)
    dynamic: tuple = (first_dims, {0: names.BATCH, 1: names.TOTAL_SEQUENCE}, {0: names.BATCH, 1: names.SEQUENCE})
    if keeps_logits:
        input_names.append(names.LOGITS_TO_KEEP)
        args += (torch.tensor(1, dtype=torch.int64),)
        dynamic += (None,)
    input_names += [n for pair in past_pairs for n in pair]
    output_names = [first_output] + [n for pair in present_pairs for n in pair]
    # The modules take the KV tensors as *past: torch.export wants their shapes as one tuple for that varargs.
    args += tuple(past)
    dynamic += (tuple(kv_dims for _ in past),)
    save_onnx(module, args, input_names, output_names, dynamic, path)
    _tidy(path, keeps_logits)
    return graph_spec(path, layers, DTYPE_NAMES[dtype])


def save_onnx(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
              dynamic: tuple, path: Path) -> None:
    """torch.onnx's dynamo exporter, weights in one external data file beside the graph; its chatter to stderr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(
            module,
            args,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
        program.save(str(path), external_data=True)
    del program
    gc.collect()


def _tidy(path: Path, keeps_logits: bool) -> None:
    """Give the output axes readable names and make ``logits_to_keep`` optional (default 0: every position)."""
    model = onnx.load(str(path), load_external_data=False)
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        for i, dim in enumerate(dims):
            if not dim.dim_param:
                continue
            if output.name.startswith("present."):
                dim.dim_param = names.TOTAL_SEQUENCE if i == 2 else dim.dim_param
            elif output.name in (names.LOGITS, names.FINAL_HIDDEN_STATES) and i == 1:
                dim.dim_param = names.KEPT_SEQUENCE
    if keeps_logits:
        # An initializer with the name of a graph input is a default that callers may override.
        default = numpy_helper.from_array(torch.tensor(0, dtype=torch.int64).numpy(), names.LOGITS_TO_KEEP)
        model.graph.initializer.append(default)
    onnx.save(model, str(path))


def graph_spec(path: Path, layers: range, dtype: str) -> GraphSpec:
    """The manifest entry of a saved graph, read back from the file itself."""
    model = onnx.load(str(path), load_external_data=False)
    data_files = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    if len(data_files) > 1:
        raise RuntimeError(f"{path} refers to several external data files: {sorted(data_files)}")
    return GraphSpec(
        file=path.name,
        data_file=data_files.pop() if data_files else None,
        layers=(layers.start, layers.stop),
        dtype=dtype,
        inputs=[_tensor_spec(v) for v in model.graph.input],
        outputs=[_tensor_spec(v) for v in model.graph.output],
        past=[names.past_names(i) for i in layers],
        present=[names.present_names(i) for i in layers],
    )


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim]
    return TensorSpec(name=value.name, dtype=dtype, shape=shape)
