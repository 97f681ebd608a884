"""The unsplit ONNX graph (the benchmark's baseline) and the int8 head option, against transformers."""

from __future__ import annotations

import numpy as np
import torch
from conftest import TINY
from test_parity import CHUNKS, PADDING, left_padded_batch

from export import parity
from export.validate import torch_greedy
from splitcore.graphs import FullRunner, positions_for
from splitcore.manifest import load_bundle


def test_full_graph_matches_transformers_logits(export_bundle, torch_model):
    full = load_bundle(export_bundle(TINY, 2, full=True) / "full", "full")
    model = torch_model(TINY).model
    ids, mask = left_padded_batch(full.manifest.model.vocab_size, CHUNKS[-1][1], PADDING)
    positions = positions_for(mask, ids.shape[1])
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions)).logits.numpy()
    runner = FullRunner(full)
    cache = runner.new_cache(2)
    logits = [runner.forward(ids[:, a:b], mask[:, :b], positions[:, a:b], cache, logits_to_keep=0) for a, b in CHUNKS]
    real = mask.astype(bool)
    parity.assert_close("full logits", np.concatenate(logits, 1)[real], ref[real], atol=1e-4, rtol=1e-4)
    assert cache.length == ids.shape[1]
    assert full.manifest.full.layers == (0, full.manifest.model.num_layers)


def test_full_graph_greedy_tokens_equal_transformers(export_bundle, torch_model):
    full = load_bundle(export_bundle(TINY, 2, full=True) / "full", "full")
    prompt = np.arange(20, 32, dtype=np.int64)[None, :]
    expected = torch_greedy(torch_model(TINY).model, prompt, 24).tolist()
    runner = FullRunner(full)
    cache, chunk, got = runner.new_cache(), prompt, []
    for _ in range(24):
        total = cache.length + chunk.shape[1]
        positions = np.arange(cache.length, total, dtype=np.int64)[None, :]
        logits = runner.forward(chunk, np.ones((1, total), np.int64), positions, cache, logits_to_keep=1)
        got.append(int(logits[0, -1].argmax()))
        chunk = np.asarray([[got[-1]]], dtype=np.int64)
    assert got == expected
    assert len(set(got)) >= 6, f"degenerate reference generation proves little: {got}"


def test_int8_head_export_validates_and_keeps_greedy_agreement(export_bundle):
    out = export_bundle(TINY, 2, quantize_head="int8")
    client = load_bundle(out / "client", "client")
    manifest = client.manifest
    assert manifest.head.quantization == "int8-dynamic" and manifest.tail.quantization is None
    validation = manifest.validation
    assert validation["status"] == "passed"
    assert validation["min_greedy_agreement"] == parity.INT8_MIN_GREEDY_AGREEMENT
    assert validation["greedy_agreement"] >= parity.INT8_MIN_GREEDY_AGREEMENT, validation
    assert validation["relative_drift"] == parity.INT8_RELATIVE_DRIFT
    # The whole point on a client: fewer bytes of weights (the graph IO stays float32).
    fp32 = load_bundle(export_bundle(TINY, 2, full=True) / "client", "client").manifest
    head_bytes = sum(manifest.files[f].bytes for f in filter(None, (manifest.head.file, manifest.head.data_file)))
    fp32_bytes = sum(fp32.files[f].bytes for f in filter(None, (fp32.head.file, fp32.head.data_file)))
    assert head_bytes < 0.5 * fp32_bytes
    assert [i.dtype for i in manifest.head.inputs] == [i.dtype for i in fp32.head.inputs]
