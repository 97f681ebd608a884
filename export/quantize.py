"""Dynamic int8 quantization of the head graph, for CPU clients: int8 weights, float activations, same IO.

Weights of MatMul (per output channel) and of the embedding Gather become int8; activations are quantized on the fly
per call. The graph's inputs and outputs keep their dtypes, so the runtime and the wire do not change.

``reduce_range`` (7-bit weights) because x86 CPUs without VNNI multiply u8 x s8 with a saturating instruction: full
8-bit weights drifted 3x more on random:tiny on an AVX2 machine.
"""

from __future__ import annotations

import logging
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic

from export.onnx_graphs import graph_spec
from splitcore.manifest import GraphSpec

log = logging.getLogger(__name__)

SCHEMES = {"int8": "int8-dynamic"}
OP_TYPES = ["MatMul", "Gather"]


def quantize_head(spec: GraphSpec, directory: Path, scheme: str = "int8") -> GraphSpec:
    """Write ``head.int8.onnx`` next to the float head, delete the float files, and return the new graph spec."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {sorted(SCHEMES)}")
    source = directory / spec.file
    target = directory / f"{source.stem}.{scheme}.onnx"
    quantize_dynamic(
        source, target, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True, op_types_to_quantize=OP_TYPES,
        use_external_data_format=True,
    )
    for name in filter(None, (spec.file, spec.data_file)):
        (directory / name).unlink()
    quantized = graph_spec(target, range(*spec.layers), spec.dtype)
    log.info("quantized head: %s (%s)", target.name, SCHEMES[scheme])
    return quantized.model_copy(update={"quantization": SCHEMES[scheme]})
