"""Speculative decoding across the split: drafts verified by the tail in one step, caches rolled back to what was
kept; greedy output identical to one token per step, the sampled distribution unchanged."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from conftest import TINY, bundles
from drafts import OracleDrafts

from splitcore.drafting import PromptLookup
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, LmHeadRunner, TailRunner
from splitcore.sampling import SamplingParams


def run(head, tail, prompt, n, drafter=None, params=None, stop=(), lm_head=None) -> list[int]:
    generator = SplitGenerator(head, LocalTail(tail, params or SamplingParams(), lm_head), prefill_chunk=5,
                               drafter=drafter)
    return [c.token for c in generator.generate(prompt, n, stop)]


def test_prompt_lookup_proposes_the_continuation_of_the_most_recent_match():
    lookup = PromptLookup(max_draft=8)
    history = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup.propose(history, limit=3) == [7, 8, 5]  # the later "1 2 3" wins
    assert lookup.propose([4, 5, 6], limit=3) == []
    assert lookup.propose(history, limit=0) == []
    lookup.update(proposed=4, accepted=4)
    assert lookup.length == 5
    lookup.update(proposed=5, accepted=1)
    assert lookup.length == 2


def test_outright_rejections_raise_the_match_a_draft_needs():
    from splitcore.drafting import REJECTIONS_PER_TOKEN

    lookup = PromptLookup(max_draft=4)
    history = [5, 1, 2, 3, 9, 4, 6, 3]  # the last token, 3, matched alone (after 1 2); "6 3" matched nowhere
    assert lookup.propose(history, limit=4) == [9, 4, 6, 3]
    lookup.update(proposed=4, accepted=0)
    for _ in range(REJECTIONS_PER_TOKEN - 1):
        assert lookup.propose(history, limit=4) == [9]  # still drafts on a one-token match (the length shrank)
        lookup.update(proposed=1, accepted=0)
    assert lookup.propose(history, limit=4) == []  # enough misses in a row: one token of match is not enough
    assert lookup.propose([1, 2, 3, 9, 1, 2], limit=4) == [3]  # a two-token match still is
    lookup.update(proposed=1, accepted=1)  # one kept token lowers the bar again
    assert lookup.propose(history, limit=4) == [9, 4]


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_output_is_identical_with_drafts_kept_and_rejected(export_bundle, k):
    client, server = bundles(export_bundle(TINY, k))
    head, tail = HeadRunner(client), TailRunner(server)
    prompt = list(range(40, 52))
    plain = run(head, tail, prompt, 40)
    oracle = OracleDrafts(prompt, plain)
    assert run(head, tail, prompt, 40, oracle) == plain
    assert 0 < oracle.accepted < oracle.proposed, "the run must keep some drafts and reject others"
    # Prompt lookup on a prompt that repeats itself: misses and hits alike leave the output unchanged.
    looped = [7, 8, 9, 10, 11] * 4
    assert run(head, tail, looped, 30, PromptLookup()) == run(head, tail, looped, 30)


def test_a_stop_token_among_kept_drafts_ends_the_turn_and_the_next_turn_continues_exactly(export_bundle):
    client, server = bundles(export_bundle(TINY, 2))
    head, tail = HeadRunner(client), TailRunner(server)
    prompt = list(range(60, 70))
    plain = run(head, tail, prompt, 30)
    stop = plain[12]
    turns = []
    for drafter in (None, OracleDrafts(prompt, plain, wrong_every=50, length=6)):
        generator = SplitGenerator(head, LocalTail(tail, SamplingParams()), prefill_chunk=5, drafter=drafter)
        first = [c.token for c in generator.generate(prompt, 30, (stop,))]
        second = [c.token for c in generator.generate([33, 34], 10, ())]
        turns.append((first, second, generator.finish_reason, generator.cache.length(0)))
    assert turns[0] == turns[1]
    assert turns[0][0] == plain[: plain.index(stop)]


def test_private_output_mode_verifies_with_the_clients_lm_head(export_bundle):
    client, server = bundles(export_bundle(TINY, 2, private_output=True))
    head, tail, lm_head = HeadRunner(client), TailRunner(server), LmHeadRunner(client)
    prompt = list(range(80, 90))
    plain = run(head, tail, prompt, 24, lm_head=lm_head)
    oracle = OracleDrafts(prompt, plain)
    assert run(head, tail, prompt, 24, oracle, lm_head=lm_head) == plain
    assert oracle.accepted > 0


def chi_square_homogeneity(a: Counter, b: Counter) -> tuple[float, int]:
    """Pearson's statistic for two samples over the categories seen, rare ones pooled; returns (statistic, dof)."""
    total_a, total_b = sum(a.values()), sum(b.values())
    categories = sorted(set(a) | set(b), key=lambda t: -(a[t] + b[t]))
    cells, other = [], [0, 0]
    for t in categories:
        if a[t] + b[t] >= 10:
            cells.append((a[t], b[t]))
        else:
            other[0] += a[t]
            other[1] += b[t]
    if sum(other):
        cells.append(tuple(other))
    statistic = 0.0
    for x, y in cells:
        column = x + y
        for observed, total in ((x, total_a), (y, total_b)):
            expected = column * total / (total_a + total_b)
            statistic += (observed - expected) ** 2 / expected
    return statistic, len(cells) - 1


def chi_square_critical(dof: int, z: float = 3.09) -> float:
    """The 0.999 quantile of chi-square (Wilson-Hilferty), so a fixed-seed test fails only on a real difference."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_sampled_distribution_is_unchanged_by_speculation(export_bundle):
    """Sampling at temperature 1.5 over 400 seeds: the tokens at positions 2-4 (which speculation produces from
    kept drafts or from resampling) have the same distribution with and without drafts. The drafts propose the
    most likely token, so both branches of the accept/resample rule are exercised."""
    client, server = bundles(export_bundle(TINY, 2))
    head, tail = HeadRunner(client), TailRunner(server)
    prompt = list(range(100, 110))
    greedy = run(head, tail, prompt, 6)
    samples = {"plain": Counter(), "speculative": Counter()}
    kept = 0
    for seed in range(400):
        params = SamplingParams(temperature=1.5, seed=seed)
        for name in samples:
            drafter = OracleDrafts(prompt, greedy, wrong_every=10**6, length=3) if name == "speculative" else None
            tokens = run(head, tail, prompt, 4, drafter, params)
            samples[name].update((i, t) for i, t in enumerate(tokens[1:4]))
            kept += drafter.accepted if drafter else 0
    statistic, dof = chi_square_homogeneity(samples["plain"], samples["speculative"])
    assert dof >= 5, f"too few categories to test anything: {samples}"
    assert statistic < chi_square_critical(dof), f"chi-square {statistic:.1f} with {dof} dof"
    assert 0 < kept < 400 * 3, "drafts must be kept sometimes and rejected sometimes"


def test_different_samples_across_seeds_prove_sampling(export_bundle):
    """Guard for the distribution test: the sampled tokens vary with the seed at all."""
    client, server = bundles(export_bundle(TINY, 2))
    head, tail = HeadRunner(client), TailRunner(server)
    outputs = {tuple(run(head, tail, list(range(100, 110)), 4, None, SamplingParams(temperature=1.5, seed=s)))
               for s in range(20)}
    assert len(outputs) > 5
    assert np.isfinite(chi_square_critical(10))
