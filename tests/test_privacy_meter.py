"""The privacy meter's quick mode on random:tiny: its numbers are sane and its report is complete."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, bundles

from privacy import meter, texts
from privacy.__main__ import main as privacy_main
from privacy.attacks.inverter import Inverter
from privacy.config import QUICK

# K=1 only, fewer prompts and two sigmas: the full quick preset is `make privacy-quick`'s job.
SMALL = QUICK.with_overrides(ks=(1,), prompts=10, max_prompt_tokens=16, sigmas=(0.0, 10.0), train_random=48,
                             train_generated=16)


@pytest.fixture(scope="module")
def small_run(export_bundle):
    return meter.run(SMALL, {1: bundles(export_bundle(TINY, 1))})


def test_replay_search_recovers_most_tokens_at_k1(small_run):
    replay = small_run.splits[1]["replay"]
    assert replay.token_recovery >= 0.9, replay
    assert replay.exact_matches >= 0.9, replay
    assert replay.prompt_recovery >= 0.5, replay
    assert replay.seconds > 0 and replay.ms_per_token > 0


def test_large_noise_drives_recovery_toward_chance(small_run):
    chance = 1 / small_run.vocab_size
    noisy = small_run.noise[10.0]
    for attack, result in noisy["attacks"].items():
        assert result.token_recovery <= 10 * chance + 0.02, (attack, result)
        assert result.prompt_recovery == 0.0, (attack, result)
    assert small_run.noise[0.0]["utility"]["greedy_agreement"] == 1.0
    assert small_run.noise[0.0]["utility"]["perplexity_change"] == 0.0
    assert noisy["utility"]["greedy_agreement"] < 0.5
    assert small_run.halving_sigma()["replay"] == 10.0


def test_heldout_prompts_are_fixed_and_not_training_text():
    prompts = texts.load_lines(texts.HELDOUT_PROMPTS)
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)
    assert not set(prompts) & set(texts.load_lines(texts.UTILITY_TEXTS))


def test_inverter_learns_a_linear_code():
    """On hidden states that are a linear image of the embedding, the inverter names the token."""
    import numpy as np

    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((300, 16)).astype(np.float32)
    mix = rng.standard_normal((16, 24)).astype(np.float32)
    tokens = rng.integers(0, 300, 2000)
    inverter = Inverter(embedding).fit(embedding[tokens] @ mix, tokens)
    held_out = rng.integers(0, 300, 200)
    assert (inverter.top(embedding[held_out] @ mix, 1)[:, 0] == held_out).mean() > 0.95


def test_cli_writes_json_markdown_and_chart(export_bundle, tmp_path):
    out = tmp_path / "report"
    argv = ["--quick", "--bundle", str(export_bundle(TINY, 1)), "--prompts", "4", "--sigmas", "0,1",
            "--train-random", "16", "--train-generated", "4", "--out", str(out)]
    assert privacy_main(argv) == 0
    data = json.loads((out / "privacy.json").read_text())
    assert list(data["splits"]) == ["1"] and set(data["splits"]["1"]) == set(meter.ATTACKS)
    assert [row["sigma"] for row in data["noise"]["sweep"]] == [0.0, 1.0]
    assert "| replay search |" in (out / "privacy.md").read_text()
    assert (out / "privacy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
