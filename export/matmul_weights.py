"""How a graph stores the weights of its matrix multiplications: plain floats, or 8-/4-bit blocks.

Quantized weights use onnxruntime's ``MatMulNBits``: blocks of 32 input rows per output column, each with a float
scale and an integer zero point (asymmetric, like llama.cpp's Q4_1), so the CPU kernel runs its fast path:
``accuracy_level`` 4 quantizes activations to int8 on the fly and uses integer dot products (AVX2/AVX512-VNNI, ARM
dot-product). Float zero points would carry a GGUF Q4_1 block over exactly, but onnxruntime 1.32 runs them on a
reference kernel 65x slower than the integer path (measured on one 576x1536 matmul): not an option.

Schemes (``--weights``):
- ``int8``: every matmul 8-bit.
- ``int4``: every decoder matmul 4-bit, the LM head 8-bit.
- ``int4-mlp``: the MLP's gate and up projections (half of a Llama layer's weights) 4-bit, the rest 8-bit. For
  checkpoints that are themselves 4-bit already (the SmolLM2 GGUF is Q4_1), re-quantizing every matrix onto another
  4-bit grid compounds two roundings (held-out perplexity 1.21x fp32's); this keeps it at 1.03x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from onnxruntime.quantization.matmul_nbits_quantizer import quantize_matmul_8bits

if TYPE_CHECKING:
    from export.graph_builder import GraphBuilder

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4
FLOAT_SCHEMES = ("fp32", "fp16")
QUANTIZED_SCHEMES = ("int8", "int4-mlp", "int4")
MLP_4BIT = ("mlp.gate_up_proj",)  # the MLP's gate and up projections, stored as one matrix


@dataclass(frozen=True)
class MatMulWeights:
    scheme: str  # one of FLOAT_SCHEMES or QUANTIZED_SCHEMES

    def bits(self, name: str) -> int | None:
        """Bits of the matrix called ``name`` (None: stored as floats of the graph's dtype)."""
        if self.scheme in FLOAT_SCHEMES:
            return None
        if self.scheme == "int4" or (self.scheme == "int4-mlp" and name.endswith(MLP_4BIT)):
            return 4
        return 8

    def matmul(self, builder: GraphBuilder, x: str, weight: np.ndarray, name: str) -> str:
        """x @ weight, weight [in, out] float32; returns the output's name."""
        bits = self.bits(name)
        if bits is None:
            w = builder.constant(name + ".weight", weight.astype(builder.dtype))
            return builder.node("MatMul", [x, w], [name])[0]
        packed, scales, zero_points = quantize_blocks(weight, bits)
        k, n = weight.shape
        inputs = [
            builder.constant(name + f".weight_q{bits}", packed),
            builder.constant(name + ".scales", scales.astype(builder.dtype)),
            builder.constant(name + ".zero_points", zero_points),
        ]
        return builder.node("MatMulNBits", [x, *inputs], [name], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=BLOCK_SIZE, accuracy_level=ACCURACY_LEVEL)[0]

    def gather(self, builder: GraphBuilder, table: np.ndarray, ids: str, name: str) -> str:
        """Rows ``ids`` of an embedding ``table`` [vocab, hidden] stored as ``name``.

        Quantized schemes store the table as 8-bit blocks of 32 along each row (``GatherBlockQuantized``: only the
        gathered rows are dequantized), a quarter of the float table that dominates a head's file (TinyLlama: 262 of
        358 MB) at no measurable cost in quality; float schemes, float16 graphs and rows that do not split into whole
        blocks keep a plain ``Gather``."""
        vocab, hidden = table.shape
        if self.embedding(builder.dtype, hidden) != "int8":
            return builder.node("Gather", [builder.constant(name + ".weight", table.astype(builder.dtype)), ids],
                                [name + "/rows"])[0]
        packed, scales, zero_points = quantize_blocks(table.T, 8)
        inputs = [builder.constant(name + ".weight_q8", packed.reshape(vocab, hidden)), ids,
                  builder.constant(name + ".scales", scales.astype(np.float32)),
                  builder.constant(name + ".zero_points", zero_points)]
        return builder.node("GatherBlockQuantized", inputs, [name + "/rows"], domain="com.microsoft", gather_axis=0,
                            quantize_axis=1, block_size=BLOCK_SIZE, bits=8)[0]

    def embedding(self, dtype: np.dtype, hidden: int) -> str:
        """How ``gather`` stores a table of rows of ``hidden`` values in a graph of ``dtype``, for the manifest."""
        if self.scheme in FLOAT_SCHEMES or np.dtype(dtype) != np.float32 or hidden % BLOCK_SIZE:
            return "fp32" if np.dtype(dtype) == np.float32 else "fp16"
        return "int8"


def quantize_blocks(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [K, N] float32 -> (packed [N, blocks, blob], scales [N, blocks], zero points [N, packed blocks]) as
    onnxruntime's own quantizer lays them out; K is zero-padded to whole blocks."""
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    k, n = weight.shape
    blocks = -(-k // BLOCK_SIZE)
    if blocks * BLOCK_SIZE != k:
        weight = np.pad(weight, ((0, blocks * BLOCK_SIZE - k), (0, 0)))
    if bits == 4:
        return _quantize_4bit(weight, blocks)
    packed = np.zeros((n, blocks, BLOCK_SIZE), dtype=np.uint8)
    zero_points = np.zeros((n, blocks), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    quantize_matmul_8bits(packed, weight, scales, zero_points, BLOCK_SIZE, n, blocks * BLOCK_SIZE, False)
    return packed, scales, zero_points


def _quantize_4bit(weight: np.ndarray, blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block, the integer zero point next to the ideal one (floor or ceil of -min / scale) with the least-squares
    scale for its codes, whichever leaves the smaller squared error (plain min/max rounding: SmolLM2 perplexity
    1.28x fp32 with every matrix 4-bit; this: 1.21x)."""
    k, n = weight.shape
    w = weight.T.reshape(n, blocks, BLOCK_SIZE)
    low, high = w.min(axis=-1), w.max(axis=-1)
    start = np.maximum((high - low) / 15.0, np.float32(1e-12))
    ideal = -low / start
    best_error = np.full(low.shape, np.inf, dtype=np.float32)
    best_scale, best_zero = start, np.clip(np.rint(ideal), 0, 15)
    for zero in (np.clip(np.floor(ideal), 0, 15), np.clip(np.ceil(ideal), 0, 15)):
        scale = start
        for _ in range(2):
            centred = np.clip(np.rint(w / scale[..., None] + zero[..., None]), 0, 15) - zero[..., None]
            norm = np.square(centred).sum(axis=-1)
            fitted = (w * centred).sum(axis=-1) / np.maximum(norm, 1e-12)
            scale = np.where((norm > 0) & (fitted > 0), fitted, start).astype(np.float32)
        centred = np.clip(np.rint(w / scale[..., None] + zero[..., None]), 0, 15) - zero[..., None]
        error = np.square(w - scale[..., None] * centred).sum(axis=-1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale, best_zero = np.where(better, scale, best_scale), np.where(better, zero, best_zero)
    codes = np.clip(np.rint(w / best_scale[..., None] + best_zero[..., None]), 0, 15).astype(np.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    zeros = best_zero.astype(np.uint8)
    if blocks % 2:
        zeros = np.concatenate([zeros, np.zeros((n, 1), dtype=np.uint8)], axis=1)
    return packed, best_scale.astype(np.float32), (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, k: int
                      ) -> np.ndarray:
    """The float weight [K, N] that MatMulNBits computes with: for tests."""
    n, blocks, _ = packed.shape
    if bits == 4:
        values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, BLOCK_SIZE)
        zeros = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        values, zeros = packed.reshape(n, blocks, BLOCK_SIZE), zero_points
    dequantized = (values.astype(np.float32) - zeros[..., None]) * scales.reshape(n, blocks, 1)
    return dequantized.reshape(n, blocks * BLOCK_SIZE)[:, :k].T
