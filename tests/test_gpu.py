"""On a CUDA GPU: the fp16 tail against the fp32 CPU tail, and the IO-binding path. ``pytest -m gpu``.

scripts/gpu_check.sh runs these with SPLIT_GPU_BUNDLES pointing at the bundles it exported (export skips bundles that
are up to date, so nothing is exported twice).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import TINY, bundles, requires_smollm2
from servers import free_port, start

from client.remote import RemoteTail
from client.settings import ClientSettings
from export import parity
from export.__main__ import main as export_main
from splitcore.device_runner import DeviceKVCache, DeviceTailRunner
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
    """split(model, k, dtype) -> (client, server) bundles, under SPLIT_GPU_BUNDLES when the check script set it."""

    def get(model: str, k: int, dtype: str):
        root = os.environ.get("SPLIT_GPU_BUNDLES")
        if not root:
            return bundles(export_bundle(model, k, dtype))
        out = Path(root) / f"{model.replace(':', '-')}-k{k}-{dtype}"
        assert export_main(["--model", model, "--split-layer", str(k), "--dtype", dtype, "--out", str(out)]) == 0
        return bundles(out)

    return get


def greedy(head: HeadRunner, tail: TailRunner, prompt: list[int], steps: int, forced: list[int] | None = None):
    """Greedy decode; with ``forced`` the fed tokens are given (teacher forcing), so positions line up."""
    head_cache, tail_cache = head.new_cache(), tail.new_cache()
    ids, past, tokens, rows = np.asarray([prompt], np.int64), 0, [], []
    for i in range(steps):
        seq = ids.shape[1]
        mask = np.ones((1, past + seq), np.int64)
        positions = np.arange(past, past + seq, dtype=np.int64)[None, :]
        hidden = head.forward(ids, mask, positions, head_cache)
        logits = tail.forward(hidden, mask, positions, tail_cache, logits_to_keep=1)[0, -1].astype(np.float32)
        rows.append(logits)
        tokens.append(int(logits.argmax()))
        past += seq
        ids = np.asarray([[forced[i] if forced else tokens[-1]]], np.int64)
    return tokens, np.stack(rows), tail_cache


@pytest.mark.parametrize("model,k", MODELS)
def test_fp16_tail_on_cuda_agrees_with_fp32_on_cpu(split, model, k):
    client, server32 = split(model, k, "fp32")
    _, server16 = split(model, k, "fp16")
    head = HeadRunner(client, CPU)
    prompt = list(range(20, 36))
    expected, reference, _ = greedy(head, TailRunner(server32, CPU), prompt, STEPS)
    cuda_tail = DeviceTailRunner(server16, CUDA)
    assert cuda_tail.providers[0] == "CUDAExecutionProvider", f"CUDA did not start: {cuda_tail.providers}"
    got, logits, cache = greedy(head, cuda_tail, prompt, STEPS, forced=expected)
    assert isinstance(cache, DeviceKVCache) and cache.device == "cuda", cache.device
    agreement = parity.argmax_agreement(logits, reference)
    drift = parity.diff("logits", logits, reference)
    bound = parity.FP16_RELATIVE_DRIFT * drift.scale
    print(f"\n{model} K={k}: fp16 CUDA vs fp32 CPU over {STEPS} greedy steps: argmax agreement {agreement:.1%}, "
          f"max |logit diff| {drift.max_abs:.3e} (bound {bound:.3e}, logit scale {drift.scale:.3g})")
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    assert agreement >= parity.FP16_MIN_ARGMAX_AGREEMENT, f"first disagreement at step {first}: {got} vs {expected}"
    assert drift.max_abs <= bound, drift.report(bound, 0.0)


def test_io_binding_on_cuda_equals_plain_cuda_and_keeps_the_cache_on_the_gpu(split):
    client, server16 = split(TINY, 2, "fp16")
    head = HeadRunner(client, CPU)
    prompt = list(range(40, 52))
    plain_tokens, plain, _ = greedy(head, TailRunner(server16, CUDA), prompt, 24)
    bound_tokens, bound, cache = greedy(head, DeviceTailRunner(server16, CUDA), prompt, 24)
    assert cache.device == "cuda" and cache.length == len(prompt) + 23
    assert bound_tokens == plain_tokens
    parity.assert_close("logits (IO binding vs plain, CUDA fp16)", bound, plain, atol=1e-3, rtol=1e-3)


def test_service_on_cuda_reports_it_and_serves_the_same_tokens(split, tmp_path):
    client, server16 = split(TINY, 2, "fp16")
    port = free_port()
    env = {**os.environ, "SPLIT_SERVER_BUNDLE": str(server16.root), "SPLIT_SERVER_PORT": str(port),
           "SPLIT_SERVER_PROVIDERS": '["CUDAExecutionProvider"]', "SPLIT_SERVER_DRAIN_S": "0"}
    running = start([sys.executable, "-m", "services"], env, ROOT, port, tmp_path / "service.log")
    try:
        import httpx

        ready = httpx.get(f"{running.url}/readyz").json()
        assert ready["provider"] == "CUDAExecutionProvider" and ready["io_binding"] is True, ready
        head = HeadRunner(client, CPU)
        prompt = list(range(60, 70))
        remote = RemoteTail.open(client, ClientSettings(server_url=running.url), SamplingParams())
        got = [c.token for c in SplitGenerator(head, remote).generate(prompt, 16, stop_ids=())]
        local = LocalTail(DeviceTailRunner(server16, CUDA), SamplingParams())
        expected = [c.token for c in SplitGenerator(head, local).generate(prompt, 16, stop_ids=())]
        assert got == expected
    finally:
        assert running.terminate() == 0, running.output()[-2000:]
