"""Boundary noise: off means bit-identical, on means the stated multiple of each position's RMS."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY, bundles

from client.settings import ClientSettings
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.noise import BoundaryNoise
from splitcore.sampling import SamplingParams


class RecordingTail:
    """A tail link that keeps what it was sent, to see exactly what would leave the machine."""

    def __init__(self, tail: LocalTail) -> None:
        self.tail, self.sent = tail, []

    def step(self, hidden_states, past_length, sample=True, guess=False, draft=0):
        self.sent.append(hidden_states.copy())
        return self.tail.step(hidden_states, past_length, sample, guess, draft)


def run(export_bundle, noise, prompt=tuple(range(30, 45))):
    client, server = bundles(export_bundle(TINY, 2))
    tail = RecordingTail(LocalTail(TailRunner(server), SamplingParams()))
    tokens = [c.token for c in SplitGenerator(HeadRunner(client), tail, 4, noise).generate(list(prompt), 16)]
    return tokens, tail.sent


def test_sigma_zero_is_bit_identical_to_no_noise(export_bundle):
    tokens, sent = run(export_bundle, None)
    noisy_tokens, noisy_sent = run(export_bundle, BoundaryNoise(0.0, seed=1))
    assert noisy_tokens == tokens
    assert len(sent) == len(noisy_sent)
    for a, b in zip(sent, noisy_sent):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    hidden = np.ones((1, 2, 8), np.float16)
    assert BoundaryNoise(0.0)(hidden) is hidden


def test_noise_is_sigma_times_position_rms_and_seedable():
    rng = np.random.default_rng(0)
    # Positions of very different scale, as at the start of a real sequence.
    hidden = (rng.standard_normal((1, 3, 4096)) * np.array([50.0, 1.0, 0.1])[None, :, None]).astype(np.float32)
    noisy = BoundaryNoise(0.5, seed=3)(hidden)
    assert noisy.dtype == hidden.dtype and noisy.shape == hidden.shape
    rms = np.sqrt(np.mean(hidden**2, axis=-1))
    ratio = np.std(noisy - hidden, axis=-1) / rms
    np.testing.assert_allclose(ratio, 0.5, rtol=0.05)
    np.testing.assert_array_equal(BoundaryNoise(0.5, seed=3)(hidden), noisy)
    assert not np.array_equal(BoundaryNoise(0.5, seed=4)(hidden), noisy)


def test_noise_changes_what_is_sent_but_not_the_head_cache(export_bundle):
    _, clean = run(export_bundle, None)
    _, noisy = run(export_bundle, BoundaryNoise(0.05, seed=0))
    # Every prompt chunk (15 ids in chunks of 4; generated tokens may differ after that) differs from the clean one
    # by about sigma, not more: the head's own cache, which later chunks attend to, was not perturbed.
    for a, b in zip(clean[:4], noisy[:4]):
        rel = np.linalg.norm(b - a, axis=-1) / np.linalg.norm(a, axis=-1)
        assert np.all((rel > 0.02) & (rel < 0.1)), rel


def test_negative_sigma_is_refused():
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        BoundaryNoise(-0.1)
    with pytest.raises(ValueError):
        ClientSettings(noise_sigma=-1)
