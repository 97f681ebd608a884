"""The service's tail loop: decode steps go first, prompts run in chunks between them, results as if run alone."""

from __future__ import annotations

import asyncio

import numpy as np
from conftest import TINY, bundles

from export import parity
from services.batching import DecodeBatches, run_one
from services.scheduler import TailScheduler
from splitcore.graphs import TailRunner


class Recorded(DecodeBatches):
    """Notes every run: ("decode", rows) or ("prompt", positions)."""

    def __init__(self, tail: TailRunner) -> None:
        super().__init__(tail)
        self.trace: list[tuple[str, int]] = []
        self.inside = False

    def run(self, caches, hidden):
        self.trace.append(("decode", len(caches)))
        self.inside = True  # a batch of one goes through run_one
        try:
            return super().run(caches, hidden)
        finally:
            self.inside = False

    def run_one(self, cache, hidden):
        if not self.inside:
            self.trace.append(("prompt", hidden.shape[1]))
        return super().run_one(cache, hidden)


def test_prompts_are_chunked_between_decode_steps_and_give_the_same_logits(export_bundle):
    _, server = bundles(export_bundle(TINY, 2))
    tail = TailRunner(server)
    size = server.manifest.model.hidden_size
    rng = np.random.default_rng(3)
    decoder_prompt = rng.standard_normal((1, 4, size)).astype(np.float32)
    decoder_steps = [rng.standard_normal((1, 1, size)).astype(np.float32) for _ in range(8)]
    newcomer_prompt = rng.standard_normal((1, 9, size)).astype(np.float32)

    reference = tail.new_cache()
    expected_decoder = [run_one(tail, reference, decoder_prompt)] + [run_one(tail, reference, h) for h in decoder_steps]
    expected_newcomer = run_one(tail, tail.new_cache(), newcomer_prompt)

    async def scenario() -> tuple[list[np.ndarray], np.ndarray, Recorded]:
        scheduler = TailScheduler(tail, max_batch=8, prefill_chunk=2, gather_s=0.0)
        scheduler.batches = recorded = Recorded(tail)
        loop = asyncio.create_task(scheduler.run())
        decoder, newcomer = tail.new_cache(), tail.new_cache()
        got = [await scheduler.step(decoder, decoder_prompt)]
        got.append(await scheduler.step(decoder, decoder_steps[0]))
        joining = asyncio.create_task(scheduler.step(newcomer, newcomer_prompt))
        for h in decoder_steps[1:]:
            got.append(await scheduler.step(decoder, h))
        newcomer_logits = await joining
        loop.cancel()
        return got, newcomer_logits, recorded

    got, newcomer_logits, recorded = asyncio.run(scenario())
    for i, (g, e) in enumerate(zip(got, expected_decoder)):
        parity.assert_close(f"decoder step {i}", g, e, atol=1e-5, rtol=1e-5)
    parity.assert_close("newcomer's prompt", newcomer_logits, expected_newcomer, atol=1e-5, rtol=1e-5)

    assert recorded.trace[0] == ("prompt", 4), "a prompt runs in one piece while nobody decodes"
    chunks = [i for i, (kind, _) in enumerate(recorded.trace) if kind == "prompt"][1:]
    assert [recorded.trace[i][1] for i in chunks] == [2, 2, 2, 2, 1], recorded.trace
    for before, after in zip(chunks, chunks[1:]):
        assert ("decode", 1) in recorded.trace[before + 1 : after], f"no decode step between chunks: {recorded.trace}"


def test_a_failed_run_fails_its_step_and_the_loop_goes_on(export_bundle):
    _, server = bundles(export_bundle(TINY, 2))
    tail = TailRunner(server)
    size = server.manifest.model.hidden_size

    async def scenario() -> tuple[BaseException | None, np.ndarray]:
        scheduler = TailScheduler(tail, max_batch=4, prefill_chunk=8, gather_s=0.0)
        loop = asyncio.create_task(scheduler.run())
        # The service validates shapes before this point; the loop must not rely on it.
        wrong = np.zeros((1, 1, size + 1), dtype=np.float32)
        try:
            await scheduler.step(tail.new_cache(), wrong)
            error = None
        except Exception as e:  # noqa: BLE001 - whatever onnxruntime raises
            error = e
        fine = await scheduler.step(tail.new_cache(), np.ones((1, 2, size), dtype=np.float32))
        loop.cancel()
        return error, fine

    error, fine = asyncio.run(scenario())
    assert error is not None
    assert fine.shape == (server.manifest.model.vocab_size,)


def test_prompts_run_whole_when_no_other_open_session_decodes(export_bundle):
    _, server = bundles(export_bundle(TINY, 2))
    tail = TailRunner(server)
    size = server.manifest.model.hidden_size
    rng = np.random.default_rng(4)

    def hidden(n: int) -> np.ndarray:
        return rng.standard_normal((1, n, size)).astype(np.float32)

    async def scenario() -> Recorded:
        scheduler = TailScheduler(tail, max_batch=8, prefill_chunk=2, gather_s=0.0)
        scheduler.batches = recorded = Recorded(tail)
        loop = asyncio.create_task(scheduler.run())
        first = tail.new_cache()
        await scheduler.step(first, hidden(4))
        await scheduler.step(first, hidden(1))
        await scheduler.step(first, hidden(5))  # its own next turn, e.g. a chat's new user message
        scheduler.forget(first)  # the session closed
        await scheduler.step(tail.new_cache(), hidden(7))
        loop.cancel()
        return recorded

    assert asyncio.run(scenario()).trace == [("prompt", 4), ("decode", 1), ("prompt", 5), ("prompt", 7)]
