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


def test_batched_head_states_equal_one_sequence_at_a_time(export_bundle):
    """The meter runs many sequences in one batched prefill; each row must be what the client's own head sends."""
    import numpy as np

    from privacy.boundary import head_states
    from splitcore.graphs import HeadRunner

    client, _ = bundles(export_bundle(TINY, 2))
    head = HeadRunner(client, ["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, client.manifest.model.vocab_size, (3, 10))
    batched = head_states(head, ids)
    for row in range(3):
        alone = head.forward(ids[row : row + 1], head.new_cache(10))
        np.testing.assert_allclose(batched[row], alone[0], atol=1e-5, rtol=1e-5)


def test_replay_in_several_trial_batches_recovers_the_prompt_exactly(export_bundle, monkeypatch):
    """With every token tried (candidates 0) and fewer trial slots than the vocabulary, the candidates run in
    turns, each from a fresh copy of the prefix's KV: the noise-free prompt comes back token for token."""
    import numpy as np

    from privacy.attacks import replay as replay_module
    from privacy.boundary import head_states
    from splitcore.graphs import HeadRunner

    monkeypatch.setattr(replay_module, "TRIAL_SLOTS", 100)
    client, _ = bundles(export_bundle(TINY, 2))
    head = HeadRunner(client, ["CPUExecutionProvider"])
    vocab = client.manifest.model.vocab_size
    rng = np.random.default_rng(1)
    embedding = rng.standard_normal((vocab, 8)).astype(np.float32)
    inverter = Inverter(embedding).fit(rng.standard_normal((64, client.manifest.model.hidden_size)),
                                       rng.integers(0, vocab, 64))
    prompt = rng.integers(0, vocab, 6)
    observed = head_states(head, prompt[None, :])[0]
    replayed = replay_module.replay(head, inverter, observed, candidates=0)
    assert replayed.tokens == prompt.tolist()
    assert all(replayed.exact)
