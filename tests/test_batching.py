"""Decode steps of several sessions in one tail run give what each session gets alone."""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
from conftest import TINY, bundles
from servers import service_thread

from export import parity
from services.batching import DecodeBatches, run_one
from splitcore import protocol, wire
from splitcore.graphs import TailRunner


def test_batched_steps_equal_single_steps(export_bundle):
    _, server = bundles(export_bundle(TINY, 2))
    tail = TailRunner(server)
    rng = np.random.default_rng(0)
    size = server.manifest.model.hidden_size
    lengths = [0, 3, 9, 1]  # an empty past among them
    alone, together = [], []
    for length in lengths:
        prefix = rng.standard_normal((1, length, size)).astype(np.float32) if length else None
        pair = []
        for _ in range(2):
            cache = tail.new_cache()
            if prefix is not None:
                run_one(tail, cache, prefix)
            pair.append(cache)
        alone.append(pair[0])
        together.append(pair[1])
    batches = DecodeBatches(tail)

    def check(rows: list[int], seq: int = 1) -> None:
        steps = [rng.standard_normal((1, seq, size)).astype(np.float32) for _ in rows]
        expected = [run_one(tail, alone[i], h) for i, h in zip(rows, steps)]
        if seq == 1:
            got = batches.run([together[i] for i in rows], steps)
        else:
            got = [batches.run_one(together[i], h) for i, h in zip(rows, steps)]
        for i, g, e in zip(rows, got, expected):
            parity.assert_close(f"logits of row {i}", g, e, atol=1e-5, rtol=1e-5)
        for i in range(len(lengths)):
            assert together[i].length == alone[i].length
            for a, b in zip(together[i].keys + together[i].values, alone[i].keys + alone[i].values):
                parity.assert_close(f"cache of row {i}", a, b, atol=1e-5, rtol=1e-5)

    check([0, 1, 2, 3])
    check([0, 1, 2, 3])  # the same sessions again: the padded batch is reused
    check([3, 1, 0, 2])  # arriving in another order
    check([0, 2])  # two leave: they must own their caches again, not views of the batch
    assert all(k.base is None for i in (1, 3) for k in together[i].keys + together[i].values)
    check([2], seq=3)  # a multi-position chunk for a member of the current batch
    check([0, 1, 2, 3])
    batches.release()
    assert all(k.base is None for cache in together for k in cache.keys + cache.values)
    check([0, 1, 2, 3])
    for cache in together:  # every session of the batch ended: nothing may keep the padded arrays alive
        batches.drop(cache)
    assert batches.current is None


def test_concurrent_decode_steps_share_runs(export_bundle):
    client, _ = bundles(export_bundle(TINY, 2))
    sha, size = client.manifest_sha256, client.manifest.model.hidden_size
    frame = wire.encode(np.random.default_rng(1).standard_normal((1, 1, size)).astype(np.float16))
    sessions, rounds = 8, 6

    async def drive(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, headers={protocol.MANIFEST_HEADER: sha}) as http:
            opened = await asyncio.gather(*(http.post(protocol.SESSIONS_PATH, json={"manifest_sha256": sha})
                                            for _ in range(sessions)))
            ids = [r.json()["session_id"] for r in opened]
            for position in range(rounds):
                headers = {"Content-Type": wire.MEDIA_TYPE, protocol.PAST_LENGTH_HEADER: str(position)}
                answers = await asyncio.gather(*(http.post(protocol.steps_path(i), content=frame, headers=headers)
                                                 for i in ids))
                assert [a.status_code for a in answers] == [200] * sessions
                assert len({a.json()["token"] for a in answers}) == 1  # same input, same greedy token

    with service_thread(export_bundle(TINY, 2) / "server") as url:
        asyncio.run(drive(url))
        metrics = httpx.get(f"{url}/metrics").text
    count = float(re.search(r"split_decode_batch_size_count (\S+)", metrics).group(1))
    total = float(re.search(r"split_decode_batch_size_sum (\S+)", metrics).group(1))
    assert total == sessions * rounds
    assert count < total, "no two decode steps ever shared a run"
