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
