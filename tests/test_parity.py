"""ONNX split vs the transformers model: hidden states, logits, chunked decode and greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, bundles

from export import parity
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner, positions_for
from splitcore.sampling import SamplingParams

# A prefill from an empty past, single-token steps, and a multi-token chunk after a cached prefix.
CHUNKS = ((0, 6), (6, 7), (7, 8), (8, 12))
PADDING = 3


def left_padded_batch(vocab: int, length: int, padding: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (2, length), dtype=np.int64)
    mask = np.ones_like(ids)
    ids[1, :padding], mask[1, :padding] = 0, 0
    return ids, mask


@pytest.mark.parametrize("k", [1, 2, 3])
def test_chunked_split_equals_one_full_forward(export_bundle, torch_model, k):
    client, server = bundles(export_bundle(TINY, k))
    model = torch_model(TINY).model
    ids, mask = left_padded_batch(client.manifest.model.vocab_size, CHUNKS[-1][1], PADDING)
    positions = positions_for(mask, ids.shape[1])
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions), output_hidden_states=True)
    head, tail = HeadRunner(client), TailRunner(server)
    head_cache, tail_cache = head.new_cache(2), tail.new_cache(2)
    hidden, logits = [], []
    for start, end in CHUNKS:
        h = head.forward(ids[:, start:end], mask[:, :end], positions[:, start:end], head_cache)
        logits.append(tail.forward(h, mask[:, :end], positions[:, start:end], tail_cache, logits_to_keep=0))
        hidden.append(h)
    real = mask.astype(bool)
    ref_hidden = ref.hidden_states[k].numpy()[real]
    parity.assert_close("hidden_states", np.concatenate(hidden, 1)[real], ref_hidden, parity.hidden_atol(ref_hidden))
    parity.assert_close("logits", np.concatenate(logits, 1)[real], ref.logits.numpy()[real])
    assert head_cache.length == tail_cache.length == ids.shape[1]


def test_logits_to_keep_selects_the_last_positions(export_bundle):
    client, server = bundles(export_bundle(TINY, 2))
    head, tail = HeadRunner(client), TailRunner(server)
    ids = np.arange(10, 17, dtype=np.int64)[None, :]
    mask, positions = np.ones_like(ids), np.arange(7, dtype=np.int64)[None, :]
    hidden = head.forward(ids, mask, positions, head.new_cache())
    full = tail.forward(hidden, mask, positions, tail.new_cache(), logits_to_keep=0)
    assert full.shape == (1, 7, client.manifest.model.vocab_size)
    for keep in (1, 3):
        kept = tail.forward(hidden, mask, positions, tail.new_cache(), logits_to_keep=keep)
        np.testing.assert_array_equal(kept.shape, (1, keep, full.shape[-1]))
        parity.assert_close(f"logits_to_keep={keep}", kept, full[:, -keep:], atol=1e-5, rtol=0)


def test_tail_without_logits_to_keep_returns_every_position(export_bundle):
    """Callers that feed only the documented inputs get logits for every position (the input defaults to 0)."""
    client, server = bundles(export_bundle(TINY, 2))
    tail = TailRunner(server)
    assert "logits_to_keep" not in [i.name for i in tail.session.get_inputs()]
    hidden = np.random.default_rng(0).standard_normal((1, 4, client.manifest.model.hidden_size)).astype(np.float32)
    mask, positions = np.ones((1, 4), np.int64), np.arange(4, dtype=np.int64)[None, :]
    cache = tail.new_cache()
    feeds = {"hidden_states": hidden, "attention_mask": mask, "position_ids": positions}
    for (key_name, value_name), key, value in zip(tail.spec.past, cache.keys, cache.values):
        feeds[key_name], feeds[value_name] = key, value
    logits = tail.session.run(["logits"], feeds)[0]
    assert logits.shape == (1, 4, client.manifest.model.vocab_size)


def hf_greedy(model, ids: np.ndarray, mask: np.ndarray, new_tokens: int, eos: list[int]) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=new_tokens,
            do_sample=False, eos_token_id=eos, pad_token_id=0,
        )
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_tokens_equal_transformers_generate(export_bundle, torch_model, k):
    client, server = bundles(export_bundle(TINY, k))
    loaded = torch_model(TINY)
    eos = client.manifest.tokenizer.eos_token_ids
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Split inference keeps text local."}], add_generation_prompt=True
    )["input_ids"]
    ids = np.asarray([prompt], dtype=np.int64)
    expected = hf_greedy(loaded.model, ids, np.ones_like(ids), 32, eos)[0]
    generator = SplitGenerator(HeadRunner(client), LocalTail(TailRunner(server), SamplingParams()), prefill_chunk=7)
    got = [c.token for c in generator.generate(prompt, 32, eos)]
    assert got == expected
    assert len(got) >= 16 and len(set(got)) >= 8, f"degenerate reference generation proves little: {got}"


def test_left_padded_batch_greedy_equals_transformers(export_bundle, torch_model):
    client, server = bundles(export_bundle(TINY, 2))
    model = torch_model(TINY).model
    ids, mask = left_padded_batch(client.manifest.model.vocab_size, 9, PADDING, seed=7)
    eos = client.manifest.tokenizer.eos_token_ids
    expected = hf_greedy(model, ids, mask, 16, eos)

    head, tail = HeadRunner(client), TailRunner(server)
    head_cache, tail_cache = head.new_cache(2), tail.new_cache(2)
    step_ids, generated = ids, [[], []]
    finished = [False, False]
    for _ in range(16):
        positions = positions_for(mask, step_ids.shape[1])
        hidden = head.forward(step_ids, mask, positions, head_cache)
        logits = tail.forward(hidden, mask, positions, tail_cache, logits_to_keep=1)
        next_ids = logits[:, -1].argmax(-1)
        for row, token in enumerate(next_ids.tolist()):
            finished[row] = finished[row] or token in eos
            if not finished[row]:
                generated[row].append(token)
        step_ids = next_ids[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    assert generated == expected


def test_fp16_tail_drift_is_bounded(export_bundle):
    """fp16 tail (for GPUs) against the fp32 split: same greedy tokens almost everywhere, logit drift stated."""
    client32, server32 = bundles(export_bundle(TINY, 2))
    client16, server16 = bundles(export_bundle(TINY, 2, "fp16"))
    assert client16.manifest.head.dtype == "float32" and server16.manifest.tail.dtype == "float16"
    record = server16.manifest.validation
    assert record["status"] == "passed"
    assert record["argmax_agreement"] >= parity.FP16_MIN_ARGMAX_AGREEMENT
    assert record["logits_max_abs_diff"] <= record["atol"]

    prompt = list(range(20, 40))
    runs = []
    for client, server in ((client32, server32), (client16, server16)):
        generator = SplitGenerator(HeadRunner(client), LocalTail(TailRunner(server), SamplingParams()))
        runs.append([c.token for c in generator.generate(prompt, 32, stop_ids=())])
    agreement = np.mean(np.array(runs[0]) == np.array(runs[1]))
    assert agreement >= 0.9, f"fp16 greedy run agrees with fp32 on {agreement:.0%} of 32 tokens: {runs}"
