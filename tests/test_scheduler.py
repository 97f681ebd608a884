"""The scheduler's decisions, and the engine that owns sessions: decode rows first, prompts in chunks between them,
closed sessions' steps refused, a failed run failing its own step only; results as if each session ran alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import TINY, bundles

from export import parity
from services.engine import Engine, OpenRequest, StepRequest
from services.metrics import Metrics
from services.scheduler import Scheduler, Work, chunk_size
from services.sessions import Session
from services.settings import ServerSettings
from splitcore.errors import InvalidRequest, PositionMismatch, SessionNotFound
from splitcore.graphs import TailRunner
from splitcore.sampling import History, Sampler, SamplingParams


def session(slot: int) -> Session:
    return Session(f"s{slot}", slot, 64, Sampler(SamplingParams()), History(8), 0, 0.0)


def work(owner: Session, seq: int, keep: int = 1) -> Work:
    return Work(owner, np.zeros((1, seq, 4), np.float32), keep, keep, 0, None)


def run(scheduler: Scheduler):
    """Plan, and pretend the runner ran the plan."""
    plan = scheduler.plan()
    for w in plan.decode:
        w.offset = 1
    for c in plan.chunks:
        c.work.offset += c.size
    scheduler.finish(plan)
    return plan


def test_plan_runs_every_decode_row_first_then_prompt_chunks_within_the_budget():
    scheduler = Scheduler(max_batch=3, token_budget=8, clock=lambda: 0.0)
    decoders = [session(i) for i in range(4)]
    newcomers = [session(10 + i) for i in range(3)]
    for s in decoders:
        scheduler.add(work(s, 1))
    for s, seq in zip(newcomers, (3, 20, 4)):
        scheduler.add(work(s, seq))
    plan = run(scheduler)
    assert [w.session for w in plan.decode] == decoders[:3]  # max_batch rows, in arrival order
    # Budget 8 - 3 decode rows = 5 positions: all of the first newcomer's 3, then 2 of the second's.
    assert [(c.work.session, c.size) for c in plan.chunks] == [(newcomers[0], 3), (newcomers[1], 2)]
    plan = run(scheduler)
    assert [w.session for w in plan.decode] == decoders[3:]
    # 8 - 1 = 7: the second newcomer's next 7 (several newcomers share a step when the budget allows).
    assert [(c.work.session, c.size) for c in plan.chunks] == [(newcomers[1], 7)]
    plan = run(scheduler)  # the decoders decoded a moment ago: still chunked, now with the whole budget
    assert [(c.work.session, c.size) for c in plan.chunks] == [(newcomers[1], 8)]


def test_a_prompt_runs_whole_when_no_other_session_decodes():
    clock = [0.0]
    scheduler = Scheduler(max_batch=8, token_budget=4, clock=lambda: clock[0])
    alone = session(0)
    scheduler.add(work(alone, 50))
    assert [c.size for c in run(scheduler).chunks] == [50]
    other = session(1)
    scheduler.add(work(other, 1))
    scheduler.add(work(alone, 50))
    assert [c.size for c in run(scheduler).chunks] == [3]  # beside ``other``'s decode row
    assert [c.size for c in run(scheduler).chunks] == [4]  # ``other`` decoded a moment ago
    clock[0] += 5  # ``other`` has not decoded for a while: the rest runs whole
    assert [c.size for c in run(scheduler).chunks] == [43]


def test_a_session_that_just_finished_its_prompt_is_not_kept_waiting_behind_whole_prompts():
    scheduler = Scheduler(max_batch=8, token_budget=4, clock=lambda: 0.0)
    first, second = session(0), session(1)
    scheduler.add(work(first, 20))
    assert [c.size for c in run(scheduler).chunks] == [20]  # nobody else: whole
    scheduler.add(work(second, 20))  # arrived while the first prompt ran; the first session's decode is on its way
    assert [c.size for c in run(scheduler).chunks] == [4]


@pytest.mark.parametrize(("seq", "offset", "keep", "budget", "size"),
                         [(10, 0, 4, 8, 6), (10, 0, 1, 8, 8), (10, 6, 4, 2, 4), (5, 0, 5, 2, 5), (10, 0, 3, None, 10)])
def test_the_kept_positions_run_in_one_chunk(seq, offset, keep, budget, size):
    w = work(session(0), seq, keep)
    w.offset = offset
    assert chunk_size(w, budget) == size


@pytest.fixture(scope="module")
def tail(export_bundle):
    _, server = bundles(export_bundle(TINY, 2))
    return TailRunner(server)


def engine_for(tail: TailRunner, **settings) -> Engine:
    defaults = {"prefill_chunk": 2, "batch_gather_ms": 0.0}
    return Engine(tail, ServerSettings(**{**defaults, **settings}), Metrics(), slots=4, slot_length=64)


def request(sid: str, hidden: np.ndarray, past: int, keep_length: int | None = None) -> StepRequest:
    return StepRequest(sid, hidden, past, keep_length, keep=1, samples=1)


async def refusal(engine: Engine, step: StepRequest, kind: type[Exception]) -> Exception | None:
    """The ``kind`` error ``step`` is refused with, or None when it is answered."""
    try:
        await engine.step(step)
    except kind as e:
        return e
    return None


def solo(tail: TailRunner, chunks: list[np.ndarray]) -> list[np.ndarray]:
    cache = tail.new_cache(64)
    return [tail.forward(h, cache)[0, -1] for h in chunks]


def test_prompts_are_chunked_between_decode_steps_and_give_the_same_logits(tail):
    size = tail.bundle.manifest.model.hidden_size
    rng = np.random.default_rng(3)
    decoder_steps = [rng.standard_normal((1, 4 if i == 0 else 1, size)).astype(np.float32) for i in range(9)]
    newcomer_prompt = rng.standard_normal((1, 9, size)).astype(np.float32)

    async def scenario():
        engine = engine_for(tail)
        runs = []
        execute = engine.runner.execute
        engine.runner.execute = lambda plan: (runs.append(([w.seq for w in plan.decode],
                                                           [c.size for c in plan.chunks])), execute(plan))
        engine.start()
        params = OpenRequest(None, SamplingParams(), 0, [])
        decoder, newcomer = await engine.open(params), await engine.open(params)
        got, past = [], 0
        for i, h in enumerate(decoder_steps):
            if i == 2:
                joining = asyncio.create_task(engine.step(request(newcomer.id, newcomer_prompt, 0)))
                await asyncio.sleep(0)
            got.append(await engine.step(request(decoder.id, h, past)))
            past += h.shape[1]
        joined = await joining
        await engine.stop()
        return got, joined, runs

    got, joined, runs = asyncio.run(scenario())
    for i, (g, e) in enumerate(zip(got, solo(tail, decoder_steps))):
        parity.assert_close(f"decoder step {i}", g.output[-1], e, atol=1e-5, rtol=1e-5)
    parity.assert_close("newcomer's prompt", joined.output[-1], solo(tail, [newcomer_prompt])[0], atol=1e-5, rtol=1e-5)
    assert runs[0] == ([], [4]), "a prompt runs in one piece while nobody decodes"
    chunks = [c for _, cs in runs[1:] for c in cs]
    # While the decoder decodes the newcomer's prompt runs in chunks of at most the budget (2, or 1 beside a decode
    # row), so a decode step never waits for more than that.
    assert sum(chunks) == 9 and max(chunks) <= 2, runs
    assert any(decode and cs == [1] for decode, cs in runs), f"no chunk shared a step with a decode row: {runs}"


def test_a_step_of_a_session_closed_meanwhile_is_refused_and_its_slot_freed(tail):
    size = tail.bundle.manifest.model.hidden_size

    async def scenario():
        engine = engine_for(tail)
        engine.start()
        opened = await engine.open(OpenRequest(None, SamplingParams(), 0, []))
        hidden = np.zeros((1, 1, size), np.float32)
        outcome = await asyncio.gather(engine.step(request(opened.id, hidden, 0)), engine.close(opened.id),
                                       return_exceptions=True)
        free = engine.pool.free
        await engine.stop()
        return outcome, free

    (stepped, closed), free = asyncio.run(scenario())
    assert isinstance(stepped, SessionNotFound) and "closed while this step waited" in str(stepped)
    assert closed is None and free == 4


def test_one_step_at_a_time_per_session(tail):
    size = tail.bundle.manifest.model.hidden_size

    async def scenario():
        engine = engine_for(tail)
        engine.start()
        opened = await engine.open(OpenRequest(None, SamplingParams(), 0, []))
        hidden = np.zeros((1, 1, size), np.float32)
        outcome = await asyncio.gather(engine.step(request(opened.id, hidden, 0)),
                                       engine.step(request(opened.id, hidden, 0)), return_exceptions=True)
        await engine.stop()
        return outcome

    first, second = asyncio.run(scenario())
    assert first.length == 1
    assert isinstance(second, PositionMismatch) and "already has a step queued or running" in str(second)


def test_a_failed_run_fails_its_step_rolls_it_back_and_the_loop_goes_on(tail):
    size = tail.bundle.manifest.model.hidden_size
    rng = np.random.default_rng(4)
    prompt, nxt = rng.standard_normal((1, 6, size)).astype(np.float32), rng.standard_normal((1, 1, size))

    async def scenario():
        engine = engine_for(tail, prefill_chunk=64)
        engine.start()
        opened = await engine.open(OpenRequest(None, SamplingParams(), 0, []))
        forward = tail.forward
        calls = []

        def failing(*args, **kwargs):  # the first run of the prompt fails
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("onnxruntime said no")
            return forward(*args, **kwargs)

        engine.runner.tail = type("Failing", (), {"forward": staticmethod(failing), "decode_rows": tail.decode_rows})()
        error = await refusal(engine, request(opened.id, prompt, 0), RuntimeError)
        length = engine.pool.length(opened.slot)
        again = await engine.step(request(opened.id, prompt, 0))
        after = await engine.step(request(opened.id, nxt.astype(np.float32), 6))
        await engine.stop()
        return error, length, again, after

    error, length, again, after = asyncio.run(scenario())
    assert isinstance(error, RuntimeError) and length == 0
    expected = solo(tail, [prompt, nxt.astype(np.float32)])
    parity.assert_close("retried prompt", again.output[-1], expected[0], atol=1e-5, rtol=1e-5)
    parity.assert_close("step after", after.output[-1], expected[1], atol=1e-5, rtol=1e-5)


def test_a_non_finite_output_is_refused_and_the_step_rolled_back(tail):
    size = tail.bundle.manifest.model.hidden_size
    prompt = np.random.default_rng(5).standard_normal((1, 3, size)).astype(np.float32)

    async def scenario():
        engine = engine_for(tail)
        engine.start()
        opened = await engine.open(OpenRequest(None, SamplingParams(), 0, []))
        forward = tail.forward
        poisoned = type("Poisoned", (), {"forward": staticmethod(lambda *a, **k: forward(*a, **k) * np.nan),
                                         "decode_rows": tail.decode_rows})()
        engine.runner.tail = poisoned
        error = await refusal(engine, request(opened.id, prompt, 0), InvalidRequest)
        length = engine.pool.length(opened.slot)
        engine.runner.tail = tail
        fine = await engine.step(request(opened.id, prompt, 0))
        await engine.stop()
        return error, length, fine

    error, length, fine = asyncio.run(scenario())
    assert error is not None and "not finite" in str(error) and length == 0
    parity.assert_close("after the refusal", fine.output[-1], solo(tail, [prompt])[0], atol=1e-5, rtol=1e-5)


def test_a_step_waits_only_for_sessions_due_back_within_the_window():
    """gather_until: a session that comes back within the window is waited for (until it is due), one far away or
    overdue is not, and one with no history yet is waited for the whole window, as before."""
    from services.scheduler import RETURN_MARGIN_S, RETURN_SLACK

    scheduler = Scheduler(max_batch=8, token_budget=32, clock=lambda: 0.0)
    near, far, gone, new = session(0), session(1), session(2), session(3)
    now, window = 100.0, 0.020
    near.answered_at, near.return_gap = now - 0.001, 0.004  # its client answers in ~4 ms: due in a few ms
    far.answered_at, far.return_gap = now - 0.001, 0.060  # a client 60 ms away: not worth holding a step for
    gone.answered_at, gone.return_gap = now - 0.500, 0.004  # overdue by far: it stopped
    scheduler.expecting = [far, gone]
    assert scheduler.gather_until(now, window) is None
    scheduler.expecting = [near, far, gone]
    due = near.answered_at + 0.004 * RETURN_SLACK + RETURN_MARGIN_S
    assert scheduler.gather_until(now, window) == pytest.approx(due)
    near.busy = True  # its step arrived
    assert scheduler.gather_until(now, window) is None
    scheduler.expecting = [far, new]
    assert scheduler.gather_until(now, window) == pytest.approx(now + window)


def test_a_session_that_steps_learns_how_long_its_client_takes(tail):
    """The engine records each session's return gap when its next step arrives after an answer."""
    size = tail.bundle.manifest.model.hidden_size

    async def scenario():
        engine = engine_for(tail)
        engine.start()
        try:
            opened = await engine.open(OpenRequest(None, SamplingParams(), 0, []))
            hidden = np.zeros((1, 3, size), np.float32)
            await engine.step(request(opened.id, hidden, 0))
            assert opened.answered_at is not None and opened.return_gap is None
            await asyncio.sleep(0.03)
            await engine.step(request(opened.id, hidden[:, :1], 3))
            assert opened.return_gap is not None and opened.return_gap >= 0.03
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_prompts_run_whole_beside_a_session_whose_client_went_quiet():
    """A newcomer's prompt is chunked while another session is generating, not once that session's next step is
    overdue (its client finished its answer): then the prompt runs in one piece."""
    from services.scheduler import generating

    clock = [100.0]
    scheduler = Scheduler(max_batch=8, token_budget=4, clock=lambda: clock[0])
    decoder, newcomer = session(0), session(1)
    scheduler.add(work(decoder, 1))
    run(scheduler)  # the decoder stepped at t = 100
    decoder.answered_at, decoder.return_gap = 100.0, 0.005
    assert generating(decoder, 100.05)
    scheduler.add(work(newcomer, 10))
    assert [c.size for c in scheduler.plan().chunks] == [4]  # chunked: the decoder is still generating
    clock[0] = 100.5  # its next step is overdue (0.5 s > max(1.5 x 5 ms, 0.1 s))
    assert not generating(decoder, clock[0])
    assert [c.size for c in scheduler.plan().chunks] == [10]  # the same prompt, now in one piece


def test_a_burst_of_prompts_gets_one_budget_per_prompt_waiting_per_generating_session():
    """One decoder and six newcomers: the step runs 6 budgets of prompt positions (the newcomers start decoding
    together instead of trickling in behind the decoder); with two decoders, 3 budgets; one newcomer beside a
    decoder gets one budget less the decode row, as before; never more than max_prompt_share budgets."""
    scheduler = Scheduler(max_batch=8, token_budget=4, clock=lambda: 0.0)
    decoders = [session(i) for i in range(2)]
    scheduler.add(work(decoders[0], 1))
    run(scheduler)  # decoders[0] is generating now
    newcomers = [session(10 + i) for i in range(6)]
    for s in newcomers:
        scheduler.add(work(s, 10))
    scheduler.add(work(decoders[0], 1))
    assert [c.size for c in scheduler.plan().chunks] == [10, 10, 4]  # 6 x 4 positions

    scheduler = Scheduler(max_batch=8, token_budget=4, clock=lambda: 0.0)
    for s in decoders:
        scheduler.add(work(s, 1))
    run(scheduler)
    for s in newcomers:
        scheduler.add(work(s, 10))
    assert [c.size for c in scheduler.plan().chunks] == [10, 2]  # 6 // 2 = 3 budgets

    scheduler = Scheduler(max_batch=8, token_budget=4, clock=lambda: 0.0)
    scheduler.add(work(decoders[0], 1))
    run(scheduler)
    scheduler.add(work(newcomers[0], 10))
    scheduler.add(work(decoders[0], 1))
    assert [c.size for c in scheduler.plan().chunks] == [3]

    for cap in (16, 5, 1):
        scheduler = Scheduler(max_batch=8, token_budget=2, clock=lambda: 0.0, max_prompt_share=cap)
        scheduler.add(work(decoders[0], 1))
        run(scheduler)
        for s in [session(100 + i) for i in range(24)]:
            scheduler.add(work(s, 1000))
        scheduler.add(work(decoders[0], 1))
        assert sum(c.size for c in scheduler.plan().chunks) == (2 * cap if cap > 1 else 1)  # 1: the budget less the row


def test_drafts_of_generating_sessions_are_not_a_burst():
    """Speculating sessions send multi-position steps (drafts) through the prompt queue: they are generating, not
    newcomers, so one newcomer beside them and a decoder still gets one budget less the decode row."""
    scheduler = Scheduler(max_batch=8, token_budget=4, clock=lambda: 0.0)
    decoder, newcomer = session(0), session(9)
    speculators = [session(1 + i) for i in range(3)]
    for s in [decoder, *speculators]:
        scheduler.add(work(s, 1))
    run(scheduler)  # all four generating
    for s in speculators:
        scheduler.add(work(s, 3, keep=3))  # a token and two drafts each
    scheduler.add(work(newcomer, 50))
    scheduler.add(work(decoder, 1))
    plan = scheduler.plan()
    assert sum(c.size for c in plan.chunks) == 3  # 4 - 1 decode row: no burst
