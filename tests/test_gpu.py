"""On a CUDA GPU: the fp16 tail against the fp32 CPU tail, batched decode in the KV slots, and the service. ``pytest -m
gpu``. The batching tests of tests/test_batching.py also run here, on the CUDA provider, through the same code.

scripts/gpu_check.sh runs these with SPLIT_GPU_BUNDLES pointing at the bundles it exported (export skips bundles that
are up to date, so nothing is exported twice).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import TINY, bundles, requires_smollm2
from drafts import FreePositions
from servers import free_port, start

from client.remote import RemoteTail
from client.settings import ClientSettings
from export import parity
from export.__main__ import main as export_main
from splitcore.drafting import PromptLookup
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="needs onnxruntime-gpu with the CUDA execution provider"),
]
ROOT = Path(__file__).resolve().parents[1]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]
STEPS = 64
MODELS = [(TINY, 2), pytest.param("smollm2", 4, marks=requires_smollm2)]


@pytest.fixture(scope="session")
def split(export_bundle):
    """split(model, k, weights) -> (client, server) bundles, under SPLIT_GPU_BUNDLES when the check script set it."""

    def get(model: str, k: int, weights: str):
        root = os.environ.get("SPLIT_GPU_BUNDLES")
        if not root:
            return bundles(export_bundle(model, k, weights))
        out = Path(root) / f"{model.replace(':', '-')}-k{k}-{weights}"
        assert export_main(["--model", model, "--split-layer", str(k), "--weights", weights, "--draft-tokens", "0",
                            "--out", str(out)]) == 0
        return bundles(out)

    return get


def greedy(head: HeadRunner, tail: TailRunner, prompt: list[int], steps: int, forced: list[int] | None = None):
    """Greedy decode; with ``forced`` the fed tokens are given (teacher forcing), so positions line up."""
    head_cache, tail_cache = head.new_cache(), tail.new_cache(len(prompt) + steps)
    ids, tokens, rows = np.asarray([prompt], np.int64), [], []
    for i in range(steps):
        hidden = head.forward(ids, head_cache)
        logits = tail.forward(hidden, tail_cache, logits_to_keep=1)[0, -1].astype(np.float32)
        rows.append(logits)
        tokens.append(int(logits.argmax()))
        ids = np.asarray([[forced[i] if forced else tokens[-1]]], np.int64)
    return tokens, np.stack(rows), tail_cache


@pytest.mark.parametrize("model,k", MODELS)
def test_fp16_tail_on_cuda_agrees_with_fp32_on_cpu(split, model, k):
    client, server32 = split(model, k, "fp32")
    _, server16 = split(model, k, "fp16")
    head = HeadRunner(client, CPU)
    prompt = list(range(20, 36))
    expected, reference, _ = greedy(head, TailRunner(server32, CPU), prompt, STEPS)
    cuda_tail = TailRunner(server16, CUDA)
    assert cuda_tail.providers[0] == "CUDAExecutionProvider", f"CUDA did not start: {cuda_tail.providers}"
    got, logits, cache = greedy(head, cuda_tail, prompt, STEPS, forced=expected)
    assert cache.device == "cuda", cache.device
    agreement = parity.argmax_agreement(logits, reference)
    drift = parity.diff("logits", logits, reference)
    bound = parity.FP16_RELATIVE_DRIFT * drift.scale
    print(f"\n{model} K={k}: fp16 CUDA vs fp32 CPU over {STEPS} greedy steps: argmax agreement {agreement:.1%}, "
          f"max |logit diff| {drift.max_abs:.3e} (bound {bound:.3e}, logit scale {drift.scale:.3g})")
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    assert agreement >= parity.FP16_MIN_ARGMAX_AGREEMENT, f"first disagreement at step {first}: {got} vs {expected}"
    assert drift.max_abs <= bound, drift.report(bound, 0.0)


@pytest.mark.parametrize("graphs", [False, True], ids=["plain", "cuda-graph"])
@pytest.mark.parametrize("model,k", MODELS)
def test_batched_decode_on_cuda_equals_each_slot_alone_and_its_step_times(split, model, k, graphs):
    """decode_rows over 16 slots of the GPU pool equals each slot run alone; prints batch 1/4/16 step times."""
    _, server16 = split(model, k, "fp16")
    tail = TailRunner(server16, CUDA, cuda_graphs=graphs)
    assert (tail.graphs is not None) == graphs, "onnxruntime refused CUDA graphs for this tail (see the log)"
    size = server16.manifest.model.hidden_size
    rng = np.random.default_rng(0)
    pool = tail.new_pool(16, 256)
    slots = [pool.acquire() for _ in range(16)]
    alone = []
    for slot in slots:
        prefix = rng.standard_normal((1, 8 + slot, size)).astype(np.float16)
        tail.forward(prefix, pool, slot)
        cache = tail.new_cache(256)
        tail.forward(prefix, cache)
        alone.append(cache)
    hidden = rng.standard_normal((16, 1, size)).astype(np.float16)
    together = tail.decode_rows(hidden, pool, slots)
    for i, cache in enumerate(alone):
        one = tail.forward(hidden[i : i + 1], cache)
        parity.assert_close(f"slot {i}", together[i].astype(np.float32), one[0].astype(np.float32), atol=5e-2,
                            rtol=5e-2)
        assert int(together[i].argmax()) == int(one[0].argmax())
    timings = {}
    for rows in (1, 4, 16):
        for slot in slots:
            pool.truncate(slot, 8 + slot)
        run = slots[:rows]
        tail.decode_rows(hidden[:rows], pool, run)  # warm-up
        started = time.perf_counter()
        for _ in range(20):
            for slot in run:
                pool.truncate(slot, 8 + slot)
            tail.decode_rows(hidden[:rows], pool, run)
        timings[rows] = (time.perf_counter() - started) / 20 * 1e3
    assert not graphs or tail.graphs.plain_steps == 0, "some decode steps did not run as CUDA graphs"
    print(f"\n{model} K={k} fp16 on {tail.providers[0]}{' with CUDA graphs' if graphs else ''}: decode step of "
          "batch 1/4/16: "
          + " / ".join(f"{timings[r]:.2f} ms" for r in (1, 4, 16)))


def test_cuda_graph_decode_follows_rows_joining_leaving_and_prompts_between(split):
    """Captured decode steps read each row's length from the device at every replay: rows join, leave, sit idle and
    roll back, sessions end and new ones take their slots, prompt chunks run (uncaptured) in between, and every output
    and every cached position equals the plain run's."""
    _, server16 = split(TINY, 2, "fp16")
    plain, graph = TailRunner(server16, CUDA), TailRunner(server16, CUDA, cuda_graphs=True)
    assert graph.graphs is not None, "onnxruntime refused CUDA graphs for this tail (see the log)"
    size = server16.manifest.model.hidden_size
    rng = np.random.default_rng(1)
    pools = [plain.new_pool(8, 128), graph.new_pool(8, 128)]
    for pool in pools:
        for _ in range(8):
            pool.acquire()

    def both(step, *args):
        want, got = step(plain, pools[0], *args), step(graph, pools[1], *args)
        parity.assert_close("outputs", got.astype(np.float32), want.astype(np.float32), atol=5e-2, rtol=5e-2)
        return want, got

    for slot in range(8):
        prefix = rng.standard_normal((1, 3 + 2 * slot, size)).astype(np.float16)
        both(lambda runner, pool, x, s: runner.forward(x, pool, s), prefix, slot)
    agree = total = 0
    for step in range(30):
        rows = sorted(rng.choice(8, size=int(rng.integers(1, 9)), replace=False).tolist())
        hidden = rng.standard_normal((len(rows), 1, size)).astype(np.float16)
        want, got = both(lambda runner, pool, x, r: runner.decode_rows(x, pool, r), hidden, rows)
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(rows)
        if step % 7 == 3:  # a new chat turn on one slot: a 3-position chunk, a plain run in the graph's session
            chunk = rng.standard_normal((1, 3, size)).astype(np.float16)
            both(lambda runner, pool, x, s: runner.forward(x, pool, s), chunk, rows[0])
        if step % 5 == 2:  # speculation rolled back: the slot keeps two positions fewer
            for pool in pools:
                pool.truncate(rows[-1], max(1, pool.length(rows[-1]) - 2))
        if step % 6 == 5:  # a session leaves and a new one takes its slot with its own prompt
            for pool in pools:
                pool.release(rows[0])
                assert pool.acquire() == rows[0]
            prompt = rng.standard_normal((1, 4, size)).astype(np.float16)
            both(lambda runner, pool, x, s: runner.forward(x, pool, s), prompt, rows[0])
    assert graph.graphs.plain_steps == 0 and graph.graphs.issued >= 1, "the decode steps did not run as CUDA graphs"
    np.testing.assert_array_equal(pools[0].lengths, pools[1].lengths)
    for slot in range(8):
        for layer in range(graph.num_layers):
            for kind in (0, 1):
                parity.assert_close(f"slot {slot} layer {layer} kind {kind}",
                                    pools[1].host_view(layer, kind, slot).astype(np.float32),
                                    pools[0].host_view(layer, kind, slot).astype(np.float32), atol=5e-2, rtol=5e-2)
    assert agree / total >= 0.95, f"argmax agreement {agree}/{total}"


def test_service_on_cuda_reports_it_and_serves_the_same_tokens(split, tmp_path):
    client, server16 = split(TINY, 2, "fp16")
    port = free_port()
    env = {**os.environ, "SPLIT_SERVER_BUNDLE": str(server16.root), "SPLIT_SERVER_PORT": str(port),
           "SPLIT_SERVER_PROVIDERS": '["CUDAExecutionProvider"]', "SPLIT_SERVER_DRAIN_S": "0"}
    running = start([sys.executable, "-m", "services"], env, ROOT, port, tmp_path / "service.log")
    try:
        import httpx

        deadline = time.monotonic() + 60  # the service captures its decode CUDA graphs before it says ready
        while (ready := httpx.get(f"{running.url}/readyz").json())["status"] == "warming":
            assert time.monotonic() < deadline, ready
            time.sleep(0.2)
        assert ready["status"] == "ready", ready
        assert ready["provider"] == "CUDAExecutionProvider" and ready["io_binding"] is True, ready
        assert ready["cuda_graphs"] is True, ready
        head = HeadRunner(client, CPU)
        prompt = list(range(60, 70))
        remote = RemoteTail.open(client, ClientSettings(server_url=running.url), SamplingParams())
        got = [c.token for c in SplitGenerator(head, remote).generate(prompt, 16, stop_ids=())]
        local = LocalTail(TailRunner(server16, CUDA), SamplingParams())
        expected = [c.token for c in SplitGenerator(head, local).generate(prompt, 16, stop_ids=())]
        assert got == expected
        # The tail's own drafts, made on the GPU (the head copy beside the tail, its decode runs captured or not).
        remote.close()
        drafter = PromptLookup(costs=FreePositions(), tail_drafts=True)
        remote = RemoteTail.open(client, ClientSettings(server_url=running.url), SamplingParams())
        generator = SplitGenerator(head, remote, drafter=drafter)
        assert [c.token for c in generator.generate(prompt, 16, stop_ids=())] == expected
        assert generator.drafted > 0
        remote.close()
    finally:
        assert running.terminate() == 0, running.output()[-2000:]
