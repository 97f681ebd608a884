"""Sampling: greedy is argmax, seeds reproduce, truncation and penalties do what they say."""

from __future__ import annotations

import numpy as np
import pytest

from splitcore.sampling import Sampler, SamplingParams

LOGITS = np.log(np.array([0.05, 0.5, 0.3, 0.1, 0.05]))


def draws(params: SamplingParams, n: int = 200) -> list[int]:
    sampler = Sampler(params)
    return [sampler.choose(LOGITS).token for _ in range(n)]


def test_greedy_is_argmax_with_its_logprob():
    choice = Sampler(SamplingParams()).choose(LOGITS, top_logprobs=2)
    assert choice.token == 1
    assert choice.logprob == pytest.approx(np.log(0.5))
    assert [t for t, _ in choice.top] == [1, 2]


def test_same_seed_same_tokens_other_seed_other_tokens():
    params = SamplingParams(temperature=1.0, seed=7)
    assert draws(params) == draws(params)
    assert draws(params) != draws(SamplingParams(temperature=1.0, seed=8))


def test_top_k_and_top_p_truncate():
    assert set(draws(SamplingParams(temperature=1.0, top_k=2, seed=1))) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=1))) == {1}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.8, seed=1))) == {1, 2}


def test_repetition_penalty_demotes_seen_tokens():
    sampler = Sampler(SamplingParams(repetition_penalty=100.0))
    assert sampler.choose(LOGITS, history=[1]).token == 2


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(repetition_penalty=0)])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_reused_work_buffers_leave_no_trace():
    """choose_batch works in per-thread buffers: a call that reuses them after a larger batch must pick exactly what
    a fresh thread (fresh buffers) picks, for greedy, sampled and penalised rows, with the caller's logits untouched."""
    import threading

    from splitcore.sampling import choose_batch

    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 300)) * 3).astype(np.float16)
    before = logits.copy()
    params = [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.8, seed=7),
              SamplingParams(temperature=1.1, top_k=20, repetition_penalty=1.5, seed=8)]
    histories = [(), [3, 4], [int(logits[2].astype(np.float32).argmax()), 9]]

    def pick() -> list[tuple[int, float, list]]:
        return [(c.token, c.logprob, c.top) for c in
                choose_batch(list(logits), [Sampler(p) for p in params], histories, [2, 2, 2])]

    fresh: list = []
    thread = threading.Thread(target=lambda: fresh.extend(pick()))
    thread.start()
    thread.join()
    # This thread's buffers first hold a larger batch of other values, then serve the 3 rows.
    choose_batch(rng.standard_normal((9, 300)).astype(np.float32) * 50, [Sampler(SamplingParams())] * 9,
                 [()] * 9, [0] * 9)
    assert pick() == fresh
    np.testing.assert_array_equal(logits, before)


def test_a_batch_picks_what_each_row_picks_alone():
    from splitcore.sampling import choose_batch

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 300)).astype(np.float32) * 4
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.0, top_k=5, seed=2), SamplingParams(temperature=1.2, top_p=0.6, seed=3),
              SamplingParams(repetition_penalty=5.0),
              SamplingParams(temperature=1e-300, seed=4)]
    histories = [[], [1, 2], [], [7], [int(logits[4].argmax())], []]
    alone = [Sampler(p).choose(row, h, top_logprobs=3) for p, row, h in zip(params, logits, histories)]
    together = choose_batch(logits, [Sampler(p) for p in params], histories, [3] * 6)
    assert [c.token for c in together] == [c.token for c in alone]
    assert [c.logprob for c in together] == pytest.approx([c.logprob for c in alone])
    assert together[4].token != int(logits[4].argmax())  # the penalty demoted the best token
    assert together[5].token == int(logits[5].argmax())  # a vanishing temperature is greedy, not an overflow
    # top_logprobs beyond top_k: only the tokens that can be drawn, all finite.
    assert len(together[2].top) == 3 and all(np.isfinite(lp) for _, lp in together[2].top)
    few = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=0)).choose(logits[0], top_logprobs=5)
    assert few.top == [(few.token, 0.0)] and few.logprob == 0.0


def test_samples_a_rollback_drops_do_not_push_out_what_the_penalty_sees():
    from splitcore.sampling import History

    history = History(limit=4)
    for position, token in enumerate([10, 11, 12, 13]):
        history.add(token, position)
    for position, token in enumerate([20, 21, 22], start=4):  # a speculative step's samples, then rejected
        history.add(token, position)
    assert history.tokens().tolist() == [13, 20, 21, 22], "the penalty looks at the latest 4"
    history.rollback(4)
    assert history.tokens().tolist() == [10, 11, 12, 13]
    assert History(limit=0, tokens=[1, 2]).tokens().tolist() == []
