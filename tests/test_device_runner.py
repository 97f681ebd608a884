"""IO binding (KV caches stay on the device) gives the same logits and tokens as the numpy tail, here on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import TINY, bundles
from servers import free_port, start

from client.remote import RemoteTail
from client.settings import ClientSettings
from services.app import load_tail
from services.settings import ServerSettings
from splitcore.device_runner import DeviceKVCache, DeviceTailRunner
from splitcore.errors import SplitError
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.providers import active_providers
from splitcore.sampling import SamplingParams

# An empty past, a multi-token chunk, single steps, and a chunk after a cached prefix; logits_to_keep varies.
CHUNKS = ((0, 6, 0), (6, 1, 1), (7, 1, 1), (8, 4, 2))


@pytest.fixture(scope="module")
def tiny(export_bundle):
    return bundles(export_bundle(TINY, 2))


def test_bound_cache_gives_the_same_logits_and_cache(tiny):
    _, server = tiny
    plain, bound = TailRunner(server), DeviceTailRunner(server)
    plain_cache, bound_cache = plain.new_cache(), bound.new_cache()
    assert isinstance(bound_cache, DeviceKVCache) and bound_cache.device == "cpu" and bound_cache.length == 0
    rng = np.random.default_rng(3)
    for past, seq, keep in CHUNKS:
        hidden = rng.standard_normal((1, seq, server.manifest.model.hidden_size)).astype(np.float32)
        mask = np.ones((1, past + seq), np.int64)
        positions = np.arange(past, past + seq, dtype=np.int64)[None, :]
        expected = plain.forward(hidden, mask, positions, plain_cache, keep)
        got = bound.forward(hidden, mask, positions, bound_cache, keep)
        worst = np.abs(got - expected).max()
        assert got.shape == expected.shape and worst <= 1e-6, (
            f"chunk {past}+{seq}: max abs diff {worst:.2e}; first values {got.ravel()[:4]} vs {expected.ravel()[:4]}"
        )
        assert bound_cache.length == plain_cache.length == past + seq
        assert bound_cache.nbytes == plain_cache.nbytes
    host = bound_cache.to_host()
    for a, b in zip(host.keys + host.values, plain_cache.keys + plain_cache.values):
        np.testing.assert_array_equal(a, b)


def test_bound_cache_greedy_tokens_equal_the_numpy_tail(tiny):
    client, server = tiny
    head = HeadRunner(client)
    runs = []
    for runner in (TailRunner(server), DeviceTailRunner(server)):
        generator = SplitGenerator(head, LocalTail(runner, SamplingParams()), prefill_chunk=5)
        runs.append([c.token for c in generator.generate(list(range(20, 32)), 16, stop_ids=())])
    assert runs[0] == runs[1]


def test_setting_selects_the_runner(tiny):
    _, server = tiny
    cpu = ["CPUExecutionProvider"]
    assert type(load_tail(ServerSettings(io_binding="on", providers=cpu), server)) is DeviceTailRunner
    assert type(load_tail(ServerSettings(io_binding="off", providers=cpu), server)) is TailRunner
    # auto binds only on CUDA: on CPU the numpy cache already lives where the graph runs.
    assert type(load_tail(ServerSettings(io_binding="auto", providers=cpu), server)) is TailRunner


def test_a_requested_provider_that_did_not_start_is_an_error():
    cuda_cpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(SplitError, match="could not enable.*CUDAExecutionProvider"):
        active_providers(cuda_cpu, cuda_cpu, ["CPUExecutionProvider"])
    # Best-available (nothing requested) may fall back, and says so in the log.
    assert active_providers(None, cuda_cpu, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_service_with_io_binding_serves_the_same_tokens(tiny, tmp_path):
    client, server = tiny
    port = free_port()
    env = {**os.environ, "SPLIT_SERVER_BUNDLE": str(server.root), "SPLIT_SERVER_PORT": str(port),
           "SPLIT_SERVER_IO_BINDING": "on", "SPLIT_SERVER_DRAIN_S": "0"}
    running = start([sys.executable, "-m", "services"], env, Path(__file__).resolve().parents[1], port,
                    tmp_path / "service.log")
    try:
        assert httpx.get(f"{running.url}/readyz").json()["io_binding"] is True
        head, prompt = HeadRunner(client), list(range(60, 70))
        remote = RemoteTail.open(client, ClientSettings(server_url=running.url), SamplingParams())
        got = [c.token for c in SplitGenerator(head, remote, prefill_chunk=4).generate(prompt, 12, stop_ids=())]
        local = LocalTail(TailRunner(server), SamplingParams())
        assert got == [c.token for c in SplitGenerator(head, local).generate(prompt, 12, stop_ids=())]
    finally:
        assert running.terminate() == 0, running.output()[-2000:]
