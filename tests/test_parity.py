"""ONNX split vs the transformers model: hidden states, logits, chunked prefill, batched decode of rows of different
lengths in one KV pool, rollback, and greedy tokens identical to transformers.generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, bundles

from export import parity
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.sampling import SamplingParams

# A prefill from an empty past, single-token steps, and a multi-token chunk after a cached prefix.
CHUNKS = ((0, 6), (6, 7), (7, 8), (8, 12))


def random_ids(vocab: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, vocab, length, dtype=np.int64)


def torch_forward(model, ids: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(ids[None, :]), output_hidden_states=True)
    return out.hidden_states[layer][0].numpy(), out.logits[0].numpy()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_chunked_split_equals_one_full_forward(export_bundle, torch_model, k):
    client, server = bundles(export_bundle(TINY, k))
    ids = random_ids(client.manifest.model.vocab_size, CHUNKS[-1][1])
    ref_hidden, ref_logits = torch_forward(torch_model(TINY).model, ids, k)
    head, tail = HeadRunner(client), TailRunner(server)
    head_cache, tail_cache = head.new_cache(), tail.new_cache()
    hidden, logits = [], []
    for start, end in CHUNKS:
        h = head.forward(ids[None, start:end], head_cache)
        logits.append(tail.forward(h, tail_cache, logits_to_keep=0)[0])
        hidden.append(h[0])
    parity.assert_close("hidden_states", np.concatenate(hidden), ref_hidden, parity.hidden_atol(ref_hidden))
    parity.assert_close("logits", np.concatenate(logits), ref_logits)
    assert head_cache.length(0) == tail_cache.length(0) == len(ids)


def test_batched_decode_of_rows_with_different_lengths_in_one_pool(export_bundle, torch_model):
    """Rows in slots 0, 2 and 3 decode in one run; slot 1 holds a sequence that is not stepping and must come out
    unharmed (it runs on zeros inside the slot range and writes only its scratch position)."""
    client, server = bundles(export_bundle(TINY, 2))
    model = torch_model(TINY).model
    vocab = client.manifest.model.vocab_size
    rows = [random_ids(vocab, n + 4, seed) for n, seed in ((9, 1), (5, 2), (3, 3), (7, 4))]
    prompts = [9, 5, 3, 7]
    head, tail = HeadRunner(client), TailRunner(server)
    head_pool, tail_pool = head.new_pool(4, 16), tail.new_pool(4, 16)
    got = [[] for _ in rows]
    for slot, (row, n) in enumerate(zip(rows, prompts)):
        head_pool.acquire(), tail_pool.acquire()
        h = head.forward(row[None, :n], head_pool, slot)
        got[slot].append(tail.forward(h, tail_pool, slot, logits_to_keep=0)[0])
    stepping = [0, 2, 3]
    for step in range(3):
        ids = np.array([[rows[s][prompts[s] + step]] for s in stepping], dtype=np.int64)
        out = tail.decode_rows(head.decode(ids, head_pool, stepping), tail_pool, stepping)
        for row, slot in enumerate(stepping):
            got[slot].append(out[row])
    # Slot 1 now continues on its own, after three runs it sat out.
    h = head.forward(rows[1][None, prompts[1] : prompts[1] + 3], head_pool, 1)
    got[1].append(tail.forward(h, tail_pool, 1, logits_to_keep=0)[0])
    for slot, row in enumerate(rows):
        expected = torch_forward(model, row[: prompts[slot] + 3], 0)[1]
        parity.assert_close(f"row in slot {slot}", np.concatenate(got[slot]), expected)
    assert list(tail_pool.lengths) == [12, 8, 6, 10] == list(head_pool.lengths)


def test_rollback_then_continue_equals_the_straight_run(export_bundle, torch_model):
    """Speculation's rollback: positions past the kept length are simply overwritten by what comes next."""
    client, server = bundles(export_bundle(TINY, 2))
    ids = random_ids(client.manifest.model.vocab_size, 10)
    head, tail = HeadRunner(client), TailRunner(server)
    head_cache, tail_cache = head.new_cache(), tail.new_cache()
    tail.forward(head.forward(ids[None, :6], head_cache), tail_cache)
    wrong = np.array([[7, 8, 9]], dtype=np.int64)
    tail.forward(head.forward(wrong, head_cache), tail_cache, logits_to_keep=0)
    head_cache.truncate(0, 6), tail_cache.truncate(0, 6)
    logits = tail.forward(head.forward(ids[None, 6:], head_cache), tail_cache, logits_to_keep=0)[0]
    expected = torch_forward(torch_model(TINY).model, ids, 0)[1][6:]
    parity.assert_close("logits after rollback", logits, expected)


def test_kv_is_written_in_place(export_bundle):
    """A decode step writes its position into the pool's own memory and touches nothing else of the slot."""
    client, _ = bundles(export_bundle(TINY, 2))
    head = HeadRunner(client)
    pool = head.new_pool(2, 8)
    pool.acquire(), pool.acquire()
    head.forward(np.array([[5, 6, 7]]), pool, 0)
    head.forward(np.array([[9, 10]]), pool, 1)
    before = [pool.host_view(0, 0, slot).copy() for slot in (0, 1)]
    keys = pool.host_view(0, 0, 0)
    head.decode(np.array([[8]]), pool, [0])
    after = pool.host_view(0, 0, 0)
    assert np.shares_memory(after, keys), "the slot's keys must be a view of the pool, not a copy"
    np.testing.assert_array_equal(after[:, :3], before[0])
    assert np.abs(after[:, 3]).sum() > 0
    np.testing.assert_array_equal(pool.host_view(0, 0, 1), before[1])


def test_logits_to_keep_selects_the_last_positions(export_bundle):
    client, server = bundles(export_bundle(TINY, 2))
    head, tail = HeadRunner(client), TailRunner(server)
    hidden = head.forward(np.arange(10, 17, dtype=np.int64)[None, :], head.new_cache())
    full = tail.forward(hidden, tail.new_cache(), logits_to_keep=0)
    assert full.shape == (1, 7, client.manifest.model.vocab_size)
    for keep in (1, 3, 7, 8, 20):  # as transformers counts: more than the sequence keeps all of it
        kept = tail.forward(hidden, tail.new_cache(), logits_to_keep=keep)
        assert kept.shape == (1, min(keep, 7), full.shape[-1])
        parity.assert_close(f"logits_to_keep={keep}", kept, full[:, -keep:], atol=1e-5, rtol=0)
    # extend without logits_to_keep keeps every position, as the graph's default does, even on a slot whose reused
    # binding last ran with logits_to_keep=1.
    cache = tail.new_cache()
    tail.forward(hidden[:, :3], cache, logits_to_keep=1)
    rest = tail.extend(hidden[:, 3:], cache, 0)
    parity.assert_close("extend after logits_to_keep=1", rest, full[:, 3:], atol=1e-5, rtol=0)


def hf_greedy(model, ids: np.ndarray, new_tokens: int, eos: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids[None, :]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    row = out[0, len(ids):].tolist()
    return row[: next((i for i, t in enumerate(row) if t in eos), len(row))]


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_tokens_equal_transformers_generate(export_bundle, torch_model, k):
    client, server = bundles(export_bundle(TINY, k))
    loaded = torch_model(TINY)
    eos = client.manifest.tokenizer.eos_token_ids
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Split inference keeps text local."}], add_generation_prompt=True
    )["input_ids"]
    expected = hf_greedy(loaded.model, np.asarray(prompt, dtype=np.int64), 32, eos)
    generator = SplitGenerator(HeadRunner(client), LocalTail(TailRunner(server), SamplingParams()), prefill_chunk=7)
    got = [c.token for c in generator.generate(prompt, 32, eos)]
    assert got == expected
    assert len(got) >= 16 and len(set(got)) >= 8, f"degenerate reference generation proves little: {got}"


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


@pytest.mark.parametrize(("scheme", "advice"), [
    ("int8", "export with --weights fp32"),
    ("int4-mlp", "export with --weights int8 or fp32"),
    ("int4", "export with --weights int4-mlp, int8 or fp32"),
])
def test_a_failed_quality_floor_suggests_only_finer_schemes(scheme, advice):
    quality = {"perplexity": 2.0, "reference_perplexity": 1.0, "greedy_agreement": 1.0}
    with pytest.raises(parity.ParityError, match=f"; {advice}$"):
        parity.check_quality(quality, scheme, "smollm2")
