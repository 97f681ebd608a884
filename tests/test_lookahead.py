"""The tail's look-ahead (splitcore/lookahead.py, export/lookahead.py): its file read safely, its arithmetic, its
fit, and its guesses in process and over HTTP, where they change how many tokens a round trip brings, never which."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from conftest import TINY
from drafts import FreePositions
from servers import service_thread

from client.remote import RemoteTail
from client.settings import ClientSettings
from export.__main__ import main as export_main
from export.lookahead import Positions, build_graph
from splitcore.drafting import PromptLookup, StepCosts
from splitcore.errors import ManifestError
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.lookahead import Lookahead
from splitcore.manifest import load_bundle
from splitcore.sampling import SamplingParams

VOCAB = 50
EDGES, CHANCES = [0.0, 0.5, 1.0 + 1e-9], [0.1, 0.6]


def lookahead(tmp_path, from_token: np.ndarray, edges=EDGES, chances=CHANCES) -> Lookahead:
    """A look-ahead over the shortlist 5, 7, 9 whose map passes the logits through and adds ``from_token``."""
    graph = build_graph(np.array([5, 7, 9]), np.eye(3), from_token, np.zeros(3), VOCAB)
    onnx.save(graph, tmp_path / "lookahead.onnx")
    return Lookahead(tmp_path / "lookahead.onnx", VOCAB, edges, chances)


def test_a_guess_is_the_best_mapped_shortlist_logit_with_the_chance_of_its_confidence(tmp_path):
    from_token = np.zeros((4, 3))
    from_token[0, 0] = 10.0  # sampling token 5 points at 5
    from_token[3, 2] = 10.0  # any token off the shortlist points at 9
    sharp = np.zeros(VOCAB, np.float32)
    sharp[7] = 5.0
    flat = np.zeros(VOCAB, np.float32)
    guesses = lookahead(tmp_path, from_token).guess(np.stack([sharp, flat, flat, flat]), np.array([7, 5, 3, 7]))
    assert guesses == [(7, 0.6), (5, 0.6), (9, 0.6), (5, 0.1)]  # the last: a three-way tie, confidence 1/3


@pytest.mark.parametrize("edges, chances", [([0.0, 0.5, 0.5], [0.1, 0.6]), ([0.0, 1.0], [1.5]),
                                            ([0.0, 0.5, 1.0], [0.1]), ([0.0], [])])
def test_bad_confidence_bins_are_refused_in_one_line(tmp_path, edges, chances):
    with pytest.raises(ManifestError, match="re-run the export") as error:
        lookahead(tmp_path, np.zeros((4, 3)), edges, chances)
    assert "\n" not in str(error.value)


def test_a_graph_that_is_not_a_lookahead_is_refused(tmp_path):
    (tmp_path / "garbage.onnx").write_bytes(b"not a graph")
    with pytest.raises(ManifestError, match="not a look-ahead graph"):
        Lookahead(tmp_path / "garbage.onnx", VOCAB, EDGES, CHANCES)
    lookahead(tmp_path, np.zeros((4, 3)))
    with pytest.raises(ManifestError, match=f"takes logits \\[rows, {VOCAB + 1}\\]"):
        Lookahead(tmp_path / "lookahead.onnx", VOCAB + 1, EDGES, CHANCES)


def test_the_fit_learns_a_linear_rule_between_positions():
    """Answers whose next logits are a fixed linear function of this position's and of the token sampled there:
    the fitted map guesses every held-out next token."""
    rng = np.random.default_rng(0)
    k = 6
    shortlist = np.arange(10, 10 + k)
    token_part = rng.normal(size=(k, k))
    a, b = rng.normal(size=(k, k)) * 0.4, rng.normal(size=(k, k))
    row_of = {int(t): i for i, t in enumerate(shortlist)}

    def answer(length: int) -> tuple[np.ndarray, list[int]]:
        logits = [rng.normal(size=k)]
        tokens = []
        for _ in range(length):
            tokens.append(int(shortlist[rng.integers(k)]))
            logits.append(logits[-1] @ a + token_part[row_of[tokens[-1]]] @ b)
        return np.array(logits), tokens

    fitted, held = Positions(k), Positions(k, keep=True)
    for _ in range(40):
        fitted.add(*answer(12), token_part, row_of, shortlist)
    logits, tokens = answer(12)
    held.add(logits, tokens, token_part, row_of, shortlist)
    weights = fitted.solve()
    predicted = np.concatenate(held.features) @ weights
    np.testing.assert_allclose(predicted, logits[1:-1], atol=1e-3 * np.abs(logits).max())


@pytest.fixture(scope="module")
def guessing_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("lookahead") / "tiny"
    assert export_main(["--model", TINY, "--split-layer", "2", "--draft-tokens", "2048", "--out", str(out)]) == 0
    return out


def test_the_export_fits_a_lookahead_for_the_server_that_beats_chance(guessing_bundle):
    server = load_bundle(guessing_bundle / "server", "server")
    spec = server.manifest.lookahead
    assert spec is not None and server.manifest.files[spec.file].roles == ["server"]
    assert spec.shortlist > 16 and len(spec.chances) == len(spec.confidence_edges) - 1 >= 1
    # A random model's answers still have structure: several times what a blind pick from the shortlist gets.
    assert 3 / spec.shortlist < spec.greedy_agreement < 1
    lookahead = Lookahead(server.path(spec.file), server.manifest.model.vocab_size, spec.confidence_edges,
                          spec.chances)
    logits = np.random.default_rng(0).normal(size=(3, server.manifest.model.vocab_size)).astype(np.float32)
    assert all(0 <= token < server.manifest.model.vocab_size and 0 < chance < 1
               for token, chance in lookahead.guess(logits, np.array([1, 2, 3])))


def test_no_lookahead_without_draft_tokens_or_for_a_private_output_tail(tmp_path):
    for extra in ([], ["--draft-tokens", "2048", "--private-output"]):
        out = tmp_path / str(len(extra))
        assert export_main(["--model", TINY, "--split-layer", "2", "--out", str(out), *extra]) == 0
        manifest = json.loads((out / "server" / "manifest.json").read_text())
        assert manifest["lookahead"] is None and not (out / "server" / "lookahead.onnx").exists()


class Guessed(PromptLookup):
    guessed = 0

    def propose(self, history, limit, guess=None, tail=()):
        drafts = super().propose(history, limit, guess, tail)
        self.guessed += self.from_table and self._guessed is not None
        return drafts


PROMPT = list(range(30, 44))


def test_guesses_in_process_draft_and_leave_greedy_output_alone(guessing_bundle):
    client = load_bundle(guessing_bundle / "client", "client")
    server = load_bundle(guessing_bundle / "server", "server")
    head, tail = HeadRunner(client), TailRunner(server)
    plain = [c.token for c in SplitGenerator(head, LocalTail(tail, SamplingParams())).generate(PROMPT, 40)]
    drafter = Guessed(costs=FreePositions(), best_guess=max(server.manifest.lookahead.chances))
    generator = SplitGenerator(head, LocalTail(tail, SamplingParams()), drafter=drafter)
    assert [c.token for c in generator.generate(PROMPT, 40)] == plain
    assert drafter.guessed > 0 and generator.verified_steps > 0


def test_guesses_are_asked_for_only_while_one_can_pay_for_its_position():
    assert not PromptLookup(costs=FreePositions()).wants_guess(), "no look-ahead in the bundle: never ask"
    assert not PromptLookup(best_guess=0.9).wants_guess(), "not before a drafted position's cost is measured"
    assert PromptLookup(costs=FreePositions(), best_guess=0.3).wants_guess()
    dear = StepCosts()  # a drafted position costs half a step: a guess right 30% of the time loses time
    dear.observe(1, 1.0), dear.observe(2, 1.5)
    assert not PromptLookup(costs=dear, best_guess=0.3).wants_guess()
    assert PromptLookup(costs=dear, best_guess=0.9).wants_guess() is False, "0.9 pays, but not with the margin"
    half = StepCosts()
    half.observe(1, 1.0), half.observe(2, 1.1)
    assert PromptLookup(costs=half, best_guess=0.3).wants_guess()
    assert not PromptLookup(costs=half, best_guess=0.2).wants_guess()
    drafter = PromptLookup(costs=FreePositions(), best_guess=0.3)
    drafter.guess_record.add(0, 50.0)  # fifty guesses' worth of chances, none kept: stated chances do not hold here
    cheap = StepCosts()
    cheap.observe(1, 1.0), cheap.observe(2, 1.02)
    drafter.costs = cheap
    assert not drafter.wants_guess()


@pytest.mark.slow
def test_guesses_over_http_only_when_asked_and_with_many_sessions_at_once(guessing_bundle):
    client = load_bundle(guessing_bundle / "client", "client")
    head = HeadRunner(client)

    best = max(client.manifest.lookahead.chances)

    def run(url: str, drafter: PromptLookup | None = None) -> tuple[list[int], list]:
        link = RemoteTail.open(client, ClientSettings(server_url=url), SamplingParams())
        try:
            choices = list(SplitGenerator(head, link, drafter=drafter).generate(PROMPT, 24))
        finally:
            link.close()
        return [c.token for c in choices], [c.guess for c in choices]

    with service_thread(guessing_bundle / "server") as url:
        plain, no_guesses = run(url)
        assert no_guesses == [None] * len(plain), "no guesses where the step did not ask for them"
        drafter = Guessed(costs=FreePositions(), best_guess=best)
        drafted, guesses = run(url, drafter)
        assert drafted == plain and drafter.guessed > 0
        steps = list(drafter.costs.steps)
        assert steps and all(compute is not None for _, _, compute in steps), "the service says its run times"
        vocab = client.manifest.model.vocab_size
        assert all(0 <= token < vocab and 0 < chance < 1 for token, chance in filter(None, guesses)) and any(guesses)
        # Sessions stepping together (decode rows batched in one run) each get their own guesses and text.
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda _: run(url, Guessed(costs=FreePositions(), best_guess=best)), range(8)))
    assert all(tokens == plain for tokens, _ in together)
