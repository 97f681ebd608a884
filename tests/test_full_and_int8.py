"""The unsplit ONNX graph (the benchmark's baseline) and the quantized weight schemes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY

from export import parity
from export.matmul_weights import BLOCK_SIZE, MatMulWeights, dequantize_blocks, quantize_blocks
from export.validate import perplexity, torch_greedy
from splitcore.graphs import FullRunner
from splitcore.manifest import load_bundle


def test_full_graph_matches_transformers_logits(export_bundle, torch_model):
    full = load_bundle(export_bundle(TINY, 2, full=True) / "full", "full")
    ids = np.random.default_rng(3).integers(5, full.manifest.model.vocab_size, 12, dtype=np.int64)
    with torch.no_grad():
        ref = torch_model(TINY).model(torch.from_numpy(ids[None, :])).logits[0].numpy()
    runner = FullRunner(full)
    cache = runner.new_cache()
    logits = [runner.forward(ids[None, a:b], cache, logits_to_keep=0)[0] for a, b in ((0, 6), (6, 7), (7, 12))]
    parity.assert_close("full logits", np.concatenate(logits), ref, atol=1e-4, rtol=1e-4)
    assert cache.length(0) == len(ids)
    assert full.manifest.full.layers == (0, full.manifest.model.num_layers)


def test_full_graph_greedy_tokens_equal_transformers(export_bundle, torch_model):
    full = load_bundle(export_bundle(TINY, 2, full=True) / "full", "full")
    prompt = np.arange(20, 32, dtype=np.int64)[None, :]
    expected = torch_greedy(torch_model(TINY).model, prompt, 24).tolist()
    runner = FullRunner(full)
    cache, chunk, got = runner.new_cache(), prompt, []
    for _ in range(24):
        got.append(int(runner.forward(chunk, cache)[0, -1].argmax()))
        chunk = np.asarray([[got[-1]]], dtype=np.int64)
    assert got == expected
    assert len(set(got)) >= 6, f"degenerate reference generation proves little: {got}"


@pytest.mark.parametrize("bits", [4, 8])
def test_block_quantization_round_trips_through_matmulnbits(bits):
    """The packed layout is what onnxruntime's kernel reads: its product equals x @ the dequantized weight."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n = 96, 40
    weight = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    packed, scales, zeros = quantize_blocks(weight, bits)
    dequantized = dequantize_blocks(packed, scales, zeros, bits, k)
    step = (weight.max() - weight.min()) / (2**bits - 1)
    assert np.abs(dequantized - weight).max() <= step, "every weight lands within one quantization step"
    node = helper.make_node("MatMulNBits", ["x", "w", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=BLOCK_SIZE, accuracy_level=0)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales, "s"),
         numpy_helper.from_array(zeros, "z")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dequantized, atol=1e-4, rtol=1e-4)


def test_int4_mlp_scheme_quantizes_gate_and_up_only():
    scheme = MatMulWeights("int4-mlp")
    assert scheme.bits("layers.3.mlp.gate_up_proj") == 4
    assert scheme.bits("layers.3.mlp.down_proj") == scheme.bits("layers.3.attn.qkv_proj") == 8
    assert MatMulWeights("int4").bits("layers.0.attn.o_proj") == 4 and MatMulWeights("fp32").bits("lm_head") is None


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_export_records_quality_and_shrinks_the_bundle(export_bundle, weights):
    out = export_bundle(TINY, 2, weights)
    client = load_bundle(out / "client", "client")
    manifest = client.manifest
    assert manifest.head.weights == manifest.tail.weights == weights
    assert manifest.tail.lm_head_weights == ("int8" if weights == "int4" else None)
    quality = manifest.validation["quality"]
    assert quality["tokens"] > 100 and quality["perplexity"] > 1
    assert manifest.validation["quality_floors"]["gated"] is False  # random weights: recorded, not gated
    head = onnx.load(str(out / "client" / manifest.head.file), load_external_data=False)
    ops = {node.op_type for node in head.graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops
    assert "GatherBlockQuantized" in ops and "Gather" not in ops
    assert manifest.head.embedding_weights == "int8" and manifest.tail.embedding_weights is None
    fp32 = load_bundle(export_bundle(TINY, 2) / "client", "client").manifest
    assert fp32.head.embedding_weights == "fp32"
    size = sum(manifest.files[f].bytes for f in (manifest.head.file, manifest.head.data_file))
    fp32_size = sum(fp32.files[f].bytes for f in (fp32.head.file, fp32.head.data_file))
    assert size < 0.5 * fp32_size


def test_an_8bit_embedding_gathers_the_dequantized_rows():
    """GatherBlockQuantized reads the table as MatMulWeights.gather lays it out: the rows it returns are exactly the
    dequantized table's, each within one quantization step of the float row."""
    from export.graph_builder import GraphBuilder

    rng = np.random.default_rng(5)
    vocab, hidden = 300, 2 * BLOCK_SIZE
    table = (rng.standard_normal((vocab, hidden)) * rng.uniform(0.01, 3, (vocab, 1))).astype(np.float32)
    builder = GraphBuilder.__new__(GraphBuilder)  # only the node/constant primitives are used here
    builder.dtype, builder.nodes, builder.initializers, builder._names = np.dtype(np.float32), [], [], set()
    out = MatMulWeights("int4").gather(builder, table, "ids", "embed_tokens")
    graph = onnx.helper.make_graph(
        builder.nodes, "g", [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, None])],
        [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [1, None, hidden])], builder.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 7, 299, 7, 150]], dtype=np.int64)
    rows = session.run(None, {"ids": ids})[0][0]
    packed, scales, zeros = quantize_blocks(table.T, 8)
    dequantized = dequantize_blocks(packed, scales, zeros, 8, hidden).T
    np.testing.assert_array_equal(rows, dequantized[ids[0]])
    step = np.repeat(scales, BLOCK_SIZE, axis=1)[ids[0]]
    assert (np.abs(rows - table[ids[0]]) <= step * 0.5 + 1e-6).all()
    assert MatMulWeights("int4").embedding(np.float32, hidden) == "int8"
    assert MatMulWeights("int4").embedding(np.float32, hidden + 1) == "fp32"  # rows not in whole blocks: plain
    assert MatMulWeights("fp32").embedding(np.float32, hidden) == "fp32"


@pytest.mark.parametrize("bad", [-1, "vocab", 2**40, 2**64])
def test_ids_outside_the_vocabulary_are_refused_before_the_quantized_embedding_reads(export_bundle, bad):
    """GatherBlockQuantized does not bounds-check (it returned another row's values for id = vocab when tried):
    the runners refuse such ids instead, and the cache is left as it was."""
    from splitcore.errors import ShapeError
    from splitcore.graphs import HeadRunner

    client = load_bundle(export_bundle(TINY, 2, "int4") / "client", "client")
    vocab = client.manifest.model.vocab_size
    head = HeadRunner(client)
    cache = head.new_cache(16)
    head.forward(np.array([[1, 2, 3]]), cache)
    bad = vocab if bad == "vocab" else bad
    with pytest.raises(ShapeError, match="outside this model's vocabulary"):
        head.forward([[4, bad]], cache)
    assert cache.length(0) == 3
    full = FullRunner(load_bundle(export_bundle(TINY, 2, "int4", full=True) / "full", "full"))
    with pytest.raises(ShapeError, match="outside this model's vocabulary"):
        full.forward([[bad]], full.new_cache(4))


def test_perplexity_of_a_perfect_and_a_uniform_model():
    ids = np.array([1, 2, 3, 0])
    certain = np.full((4, 4), -1e9)
    certain[np.arange(3), ids[1:]] = 0.0
    assert perplexity(certain, ids) == pytest.approx(1.0)
    assert perplexity(np.zeros((4, 4)), ids) == pytest.approx(4.0)


def test_graphs_are_written_at_an_ir_version_the_tail_image_reads(export_bundle):
    """onnx 1.23 defaults to IR 14; onnxruntime-gpu up to 1.31 (the tail image) reads at most IR 13."""
    out = export_bundle(TINY, 2)
    for role, name in (("client", "head.onnx"), ("server", "tail.onnx")):
        assert onnx.load(str(out / role / name), load_external_data=False).ir_version <= 10
