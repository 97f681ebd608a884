"""Decode steps of several sessions share one tail run over their KV slots and give what each session gets alone:
on the CPU provider here, and through the very same code on CUDA under the ``gpu`` marker."""

from __future__ import annotations

import asyncio
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import TINY, bundles
from servers import service_thread

from client.remote import RemoteTail
from client.settings import ClientSettings
from export import parity
from splitcore import protocol, wire
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.sampling import SamplingParams

CUDA_AVAILABLE = "CUDAExecutionProvider" in ort.get_available_providers()
PROVIDERS = [
    "CPUExecutionProvider",
    pytest.param("CUDAExecutionProvider", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not CUDA_AVAILABLE, reason="needs onnxruntime-gpu with the CUDA execution provider")]),
]
# CUDA runs the fp16 tail (onnxruntime's CUDA GroupQueryAttention is fp16); each is compared with itself alone.
TOLERANCE = {"CPUExecutionProvider": 1e-5, "CUDAExecutionProvider": 2e-2}
WEIGHTS = {"CPUExecutionProvider": "fp32", "CUDAExecutionProvider": "fp16"}


@pytest.fixture
def for_provider(export_bundle, request):
    """(out, client, server) of the tiny bundle the parametrized provider runs."""
    out = export_bundle(TINY, 2, weights=WEIGHTS[request.getfixturevalue("provider")])
    return (out, *bundles(out))


def test_decode_rows_over_a_slot_range_equal_each_slot_alone(tiny):
    _, _, server = tiny
    tail = TailRunner(server)
    size = server.manifest.model.hidden_size
    rng = np.random.default_rng(0)
    pool, caches = tail.new_pool(6, 32), {}
    lengths = {0: 3, 2: 0, 3: 9, 5: 1}  # an empty past among them, and free slots (1, 4) in between
    for _ in range(6):
        pool.acquire()
    for slot in (1, 4):
        pool.release(slot)
    for slot, length in lengths.items():
        caches[slot] = tail.new_cache(32)
        if length:
            prefix = rng.standard_normal((1, length, size)).astype(np.float32)
            tail.forward(prefix, pool, slot)
            tail.forward(prefix, caches[slot])
    for rows in ([0, 2, 3, 5], [5, 3], [2]):
        hidden = rng.standard_normal((len(rows), 1, size)).astype(np.float32)
        together = tail.decode_rows(hidden, pool, rows)
        for i, slot in enumerate(rows):
            alone = tail.forward(hidden[i : i + 1], caches[slot])
            parity.assert_close(f"slot {slot}", together[i], alone[0], atol=1e-5, rtol=1e-5)
            assert pool.length(slot) == caches[slot].length(0)
            for kind in (0, 1):  # written in the slot's own memory, as in a cache of its own
                parity.assert_close(f"slot {slot} KV", pool.host_view(0, kind, slot),
                                    caches[slot].host_view(0, kind, 0), atol=1e-5, rtol=1e-5)
    assert pool.length(1) == pool.length(4) == 0  # the free slots in between were not advanced


def solo_logits(tail: TailRunner, steps: list[np.ndarray]) -> list[np.ndarray]:
    cache = tail.new_cache(64)
    return [tail.forward(h, cache)[0, -1] for h in steps]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_batch_crash_sequence_gives_each_session_its_solo_logits(for_provider, provider):
    """Sessions A, B, C decode together, C sends a multi-position step (a new chat turn) while A and B decode, then
    two other sessions decode together, then all five: the sequence that crashed the padded-batch design."""
    _, client, server = for_provider
    sha, size = client.manifest_sha256, client.manifest.model.hidden_size
    rng = np.random.default_rng(7)
    names = "ABCDE"
    sent: dict[str, list[np.ndarray]] = {n: [] for n in names}
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    rounds = [("ABCDE", {}), ("ABC", {}), ("ABC", {"C": 3}), ("DE", {}), ("ABCDE", {}), ("DE", {"D": 4}),
              ("ABCDE", {})]

    async def drive(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, headers={protocol.MANIFEST_HEADER: sha}, timeout=60) as http:
            opened = [await http.post(protocol.SESSIONS_PATH, json={"manifest_sha256": sha, "max_length": 64})
                      for _ in names]
            ids = dict(zip(names, (r.json()["session_id"] for r in opened)))
            for who, seqs in rounds:
                steps = {}
                for n in who:
                    seq = seqs.get(n, 1) if sent[n] else 2 + names.index(n)
                    steps[n] = rng.standard_normal((1, seq, size)).astype(np.float32)

                async def one(n: str, hidden: np.ndarray) -> None:
                    past = sum(h.shape[1] for h in sent[n])
                    answer = await http.post(protocol.steps_path(ids[n]), content=wire.encode(hidden), headers={
                        "Content-Type": wire.MEDIA_TYPE, protocol.PAST_LENGTH_HEADER: str(past),
                        protocol.RETURN_HEADER: "logits"})
                    assert answer.status_code == 200, answer.text
                    got[n].append(wire.decode(answer.content))

                await asyncio.gather(*(one(n, steps[n]) for n in who))
                for n in who:
                    sent[n].append(steps[n])

    with service_thread(server.root, providers=[provider], slot_length=64) as url:
        asyncio.run(drive(url))
    tail = TailRunner(server, [provider])
    tolerance = TOLERANCE[provider]
    for n in names:
        for i, (g, e) in enumerate(zip(got[n], solo_logits(tail, sent[n]), strict=True)):
            parity.assert_close(f"session {n} step {i}", g, e, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sessions_opened_and_closed_while_eight_decode_do_not_change_their_tokens(for_provider, provider):
    out, client, server = for_provider
    prompts = [list(range(start, start + 10 + start % 7)) for start in (20, 41, 77, 103, 150, 199, 230, 260)]
    head = HeadRunner(client)
    local = TailRunner(server, [provider])
    alone = [[c.token for c in SplitGenerator(head, LocalTail(local, SamplingParams()), prefill_chunk=5)
              .generate(p, 16, stop_ids=())] for p in prompts]
    stop = threading.Event()
    churned = []

    with service_thread(out / "server", providers=[provider], slot_length=64, batch_gather_ms=20) as url:
        def over_http(prompt):
            link = RemoteTail.open(client, ClientSettings(server_url=url), SamplingParams())
            generator = SplitGenerator(HeadRunner(client), link, prefill_chunk=5)
            try:
                return [c.token for c in generator.generate(prompt, 16, stop_ids=())]
            finally:
                link.close()

        def churn() -> None:
            """Other clients open a session, send a step or two, close it, again and again."""
            size = client.manifest.model.hidden_size
            with httpx.Client(base_url=url, headers={protocol.MANIFEST_HEADER: client.manifest_sha256}) as http:
                while not stop.is_set():
                    r = http.post(protocol.SESSIONS_PATH, json={"manifest_sha256": client.manifest_sha256})
                    assert r.status_code == 201, r.text
                    sid = r.json()["session_id"]
                    for past, seq in ((0, 3), (3, 1))[: 1 + len(churned) % 2]:
                        answer = http.post(protocol.steps_path(sid), content=wire.encode(
                            np.ones((1, seq, size), np.float16)), headers={
                            "Content-Type": wire.MEDIA_TYPE, protocol.PAST_LENGTH_HEADER: str(past)})
                        assert answer.status_code == 200, answer.text
                    assert http.delete(f"{protocol.SESSIONS_PATH}/{sid}").status_code == 204
                    churned.append(sid)

        with ThreadPoolExecutor(len(prompts) + 3) as pool:
            churners = [pool.submit(churn) for _ in range(3)]
            together = list(pool.map(over_http, prompts))
            stop.set()
            for c in churners:
                c.result()
        metrics = httpx.get(f"{url}/metrics").text
    assert together == alone
    assert len(churned) >= 3
    count = float(re.search(r"split_decode_batch_size_count (\S+)", metrics).group(1))
    total = float(re.search(r"split_decode_batch_size_sum (\S+)", metrics).group(1))
    assert count < total, "no two decode steps ever shared a run"
