"""The draft table: n-grams the model itself writes, counted at export, drafted by the client where prompt lookup
finds nothing; read back without pickle and checked; the output with its drafts is what it is without."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TINY
from drafts import FreePositions

from client.split import draft_table
from export.__main__ import main as export_main
from export.draft_table import count_ngrams
from splitcore.drafting import PRIOR_SEEN, TABLE_ARRAYS, DraftTable, PromptLookup, StepCosts
from splitcore.errors import ManifestError
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.manifest import load_bundle
from splitcore.sampling import SamplingParams


def table_of(sequences) -> DraftTable:
    return DraftTable.from_arrays(count_ngrams(sequences), vocab=100)


def test_counts_keep_each_pairs_most_frequent_successor_and_how_often_it_followed():
    arrays = count_ngrams([[1, 2, 3], [1, 2, 4], [1, 2, 4], [5, 6], [7, 8, 9, 7, 8]])
    pairs = DraftTable.from_arrays(arrays, vocab=100).pairs
    assert {k: v[0] for k, v in pairs.items()} == {(1, 2): 4, (7, 8): 9, (8, 9): 7, (9, 7): 8}  # [5, 6]: no triple
    assert (arrays["pair_seen"].tolist(), arrays["next_seen"].tolist()) == ([3, 1, 1, 1], [2, 1, 1, 1])
    assert pairs[(1, 2)][1] == pytest.approx(2 / (3 + PRIOR_SEEN))  # 4 followed (1, 2) twice in three
    assert count_ngrams([[3, 4, 9], [3, 4, 2]])["pair_next"].tolist() == [2]  # a tie: the smaller id


def test_the_table_chains_successors_with_the_chance_that_all_of_them_are_right():
    table = table_of([[1, 2, 3, 4], [9, 3, 4], [1, 2, 3, 5]])
    twice, half = 2 / (2 + PRIOR_SEEN), 1 / (2 + PRIOR_SEEN)
    tokens, chances = table.chain([0, 1, 2], limit=5)
    assert tokens == [3, 4] and chances == pytest.approx([twice, twice * half])  # (2, 3) -> 4 or 5: the smaller
    assert table.chain([0, 1, 2], limit=1) == ([3], [pytest.approx(twice)])
    assert table.chain([5, 3], limit=4) == ([], [])  # (5, 3) unknown
    assert table.chain([2], limit=4) == ([], [])


def test_step_costs_send_the_drafts_that_pay_for_their_positions():
    costs = StepCosts()
    assert costs.position_share() == StepCosts.PRIOR_SHARE and costs.measured_share() is None  # nothing timed yet
    for _ in range(5):
        costs.observe(1, 0.040)
        costs.observe(3, 0.044)  # two drafted positions, 2 ms each: 5% of a step
    assert costs.position_share() == pytest.approx(0.05)
    assert costs.best_length([0.3, 0.1, 0.01]) == 2  # the third: 1% more tokens for 5% more time
    assert costs.best_length([0.04]) == 0
    for _ in range(StepCosts.WINDOW // 2):  # the link got 20 ms slower: both kinds of step, the drafts' cost the same
        costs.observe(1, 0.060)
        costs.observe(3, 0.064)
    assert costs.measured_share() == pytest.approx(0.002 / 0.060)
    slow = StepCosts()
    for _ in range(5):
        slow.observe(1, 0.010)
        slow.observe(2, 0.013)  # 30% of a step per drafted position (a CPU tail on loopback)
    assert slow.best_length([0.25, 0.1]) == 0 and slow.best_length([0.9, 0.8]) == 2


def test_a_drafted_step_is_compared_with_the_plain_steps_around_it():
    """A slow stretch of plain steps, then a faster machine where nearly every step drafts: against all plain steps
    the drafted ones would look free (and the client would draft on every step, leaving nothing to correct it);
    against their neighbours they cost what they do."""
    costs = StepCosts()
    for _ in range(20):
        costs.observe(1, 0.053, 0.013)
    for i in range(20):
        costs.observe(2, 0.0526, 0.0126)  # 2.6 ms over the plain steps of its own stretch
        if i % 5 == 0:
            costs.observe(1, 0.050, 0.010)
    assert 0.04 < costs.measured_share() < 0.06


def test_a_positions_cost_comes_from_the_runs_own_times_where_the_tail_reports_them():
    """Over a jittery link the end-to-end times can make a drafted step look faster than a plain one; the head's and
    tail's run times say what the position cost."""
    costs = StepCosts()
    for jitter in (0.004, -0.003, 0.001, -0.004, 0.002):
        costs.observe(1, 0.050 + jitter, 0.010)
        costs.observe(2, 0.048 + jitter, 0.0126)  # 2.6 ms of runs more; the link happened to be faster
    assert costs.measured_share() == pytest.approx(0.0026 / 0.051, rel=0.02)
    blind = StepCosts()
    for positions, seconds, _ in costs.steps:
        blind.observe(positions, seconds)
    assert blind.measured_share() == 0.0  # from end-to-end times alone: free, which it is not


def test_prompt_lookup_drafts_from_the_table_only_where_the_conversation_has_no_match():
    table = table_of([[1, 2, 3, 4, 5]] * 3)  # each pair seen three times, always with the same successor
    lookup = PromptLookup(max_draft=8, table=table)
    assert lookup.propose([7, 3, 9, 7, 3], limit=4) == [9, 7, 3] and not lookup.from_table  # the conversation first
    assert lookup.propose([8, 1, 2], limit=4) == [3, 4, 5] and lookup.from_table  # no match: the table's chain
    assert lookup.propose([8, 1, 2], limit=2) == [3, 4]


def test_table_drafts_that_keep_missing_stop_until_their_record_fades():
    table = table_of([[1, 2, 3]] * 3)
    lookup = PromptLookup(max_draft=8, table=table)
    for _ in range(5):
        lookup.observe(1, 0.040)
        lookup.observe(2, 0.048)  # 20% of a step per drafted position: a chance of 0.6 pays, 0.2 does not
    misses = 0
    while lookup.propose([8, 1, 2], limit=4) == [3]:
        lookup.update(proposed=1, accepted=0)
        misses += 1
        assert misses < 20, "the table must stop drafting after missing again and again"
    assert misses >= 2 and (lookup.length, lookup.rejected) == (4, 0)  # apart from the conversation's own record
    rested = 1
    while lookup.propose([8, 1, 2], limit=4) == []:
        rested += 1
        assert rested < 500, "an old record must fade and the table be tried again"
    assert rested >= 5


GOOD = {"pair_first": [1], "pair_second": [2], "pair_next": [3], "pair_seen": [2], "next_seen": [1]}


def test_a_table_of_an_older_export_without_counts_is_read_as_seen_once(tmp_path):
    path = tmp_path / "drafts.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in GOOD.items() if k not in ("pair_seen", "next_seen")})
    table = DraftTable.load(path, vocab=256)
    assert not table.counted and table.pairs == {(1, 2): (3, pytest.approx(1 / (1 + PRIOR_SEEN)))}
    assert DraftTable.from_arrays({k: np.asarray(v) for k, v in GOOD.items()}, vocab=256).counted


@pytest.mark.parametrize(("arrays", "why"), [
    ({**GOOD, "pair_next": [300]}, "below 256"),
    ({**GOOD, "pair_first": [1, 2]}, "of one length"),
    ({**GOOD, "pair_next": [-3]}, "below 256"),
    ({**GOOD, "pair_first": [1.5]}, "integers"),
    ({**GOOD, "next_seen": [3]}, "at most its pair's"),
    ({**GOOD, "next_seen": [0], "pair_seen": [0]}, "counts must be >= 1"),
    ({k: v for k, v in GOOD.items() if k != "pair_next"}, "not a draft table"),
])
def test_a_bad_table_file_is_refused_in_one_line(tmp_path, arrays, why):
    path = tmp_path / "drafts.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    with pytest.raises(ManifestError, match=why):
        DraftTable.load(path, vocab=256)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", np.arange(3).tobytes()])
def test_a_file_that_is_no_archive_is_refused_in_one_line(tmp_path, content):
    path = tmp_path / "drafts.npz"
    path.write_bytes(content)
    with pytest.raises(ManifestError, match="not a draft table"):
        DraftTable.load(path, vocab=256)


def test_a_plain_npy_array_is_refused_in_one_line(tmp_path):
    path = tmp_path / "drafts.npz"
    with open(path, "wb") as f:
        np.save(f, np.arange(3))
    with pytest.raises(ManifestError, match="not a draft table"):
        DraftTable.load(path, vocab=256)


def test_a_manifest_whose_table_is_not_a_client_file_is_refused(drafted_bundle):
    from splitcore.manifest import Manifest

    manifest = json.loads((drafted_bundle / "client" / "manifest.json").read_text())
    Manifest.model_validate(manifest)
    elsewhere = {**manifest, "drafts": {**manifest["drafts"], "file": "elsewhere.npz"}}
    with pytest.raises(ValueError, match="not among the client bundle's files"):
        Manifest.model_validate(elsewhere)
    server_only = json.loads(json.dumps(manifest))
    server_only["files"][manifest["drafts"]["file"]]["roles"] = ["server"]
    with pytest.raises(ValueError, match="not among the client bundle's files"):
        Manifest.model_validate(server_only)


def test_a_pickled_table_is_not_unpickled(tmp_path):
    path = tmp_path / "drafts.npz"
    np.savez(path, **{**{k: np.asarray(v) for k, v in GOOD.items()}, "pair_first": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(ManifestError, match="not a draft table"):
        DraftTable.load(path, vocab=256)


@pytest.fixture(scope="module")
def drafted_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("drafts") / "tiny"
    assert export_main(["--model", TINY, "--split-layer", "2", "--draft-tokens", "2048", "--out", str(out)]) == 0
    return out


def test_export_writes_the_table_into_the_client_bundle_and_its_manifest(drafted_bundle, tmp_path):
    client = load_bundle(drafted_bundle / "client", "client")
    spec = client.manifest.drafts
    assert spec is not None and spec.file in client.manifest.role_files("client")
    assert spec.sampled_tokens > 1000 and spec.pairs > 100
    assert client.manifest.export["args"]["draft_tokens"] == 2048
    table = draft_table(client)
    assert len(table.pairs) == spec.pairs
    manifest = json.loads((drafted_bundle / "client" / "manifest.json").read_text())
    assert manifest["files"][spec.file]["roles"] == ["client"]
    # A table edited after the export no longer matches its manifest: the bundle is refused.
    copy = tmp_path / "client"
    shutil.copytree(drafted_bundle / "client", copy)
    np.savez(copy / spec.file, **{name: np.array([1]) for name in TABLE_ARRAYS})
    with pytest.raises(ManifestError, match="drafts.npz has .*the manifest says"):
        load_bundle(copy, "client")


def test_a_bundle_whose_table_an_older_exporter_wrote_is_exported_again(drafted_bundle, tmp_path, caplog):
    import hashlib

    out = tmp_path / "tiny"
    shutil.copytree(drafted_bundle, out)
    table = out / "client" / "drafts.npz"
    with np.load(table) as f:  # the arrays of the first table format: no counts
        np.savez(table, **{name: f[name] for name in ("pair_first", "pair_second", "pair_next")})
    manifest_path = out / "client" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["drafts.npz"].update(sha256=hashlib.sha256(table.read_bytes()).hexdigest(),
                                           bytes=table.stat().st_size)
    manifest_path.write_text(json.dumps(manifest))
    load_bundle(out / "client", "client")  # a consistent bundle, its table alone is stale
    with caplog.at_level("INFO"):
        assert export_main(["--model", TINY, "--split-layer", "2", "--draft-tokens", "2048", "--out", str(out)]) == 0
    assert "up to date" not in caplog.text
    assert len(draft_table(load_bundle(out / "client", "client")).pairs) > 100


def test_greedy_output_with_table_drafts_equals_one_token_per_step(drafted_bundle):
    client = load_bundle(drafted_bundle / "client", "client", verify=False)
    server = load_bundle(drafted_bundle / "server", "server")
    table = DraftTable.load(client.path(client.manifest.drafts.file), client.manifest.model.vocab_size)
    head, tail = HeadRunner(client), TailRunner(server)
    prompt = list(range(30, 44))  # no repeats: drafts come from the table alone at first

    class Counting(PromptLookup):
        from_table_proposals = guessed_proposals = 0

        def propose(self, history, limit, guess=None, tail=()):
            drafts = super().propose(history, limit, guess, tail)
            self.from_table_proposals += self.from_table
            self.guessed_proposals += self._guessed is not None and self.from_table
            return drafts

    outputs = []
    drafter = Counting(table=table, costs=FreePositions())
    guessing = Counting(table=table, costs=FreePositions(), best_guess=0.5)
    for each in (None, drafter, guessing):
        generator = SplitGenerator(head, LocalTail(tail, SamplingParams()), prefill_chunk=5, drafter=each)
        outputs.append([c.token for c in generator.generate(prompt, 40, ())])
    assert drafter.from_table_proposals > 0, "the table must have drafted something"
    assert guessing.guessed_proposals > 0, "the tail's look-ahead must have drafted something"
    assert outputs[0] == outputs[1] == outputs[2]
    kinds = {positions > 1 for positions, _, _ in drafter.costs.steps}
    assert all(compute is not None for _, _, compute in drafter.costs.steps), "the runs' own times reach it too"
    assert kinds == {False, True}, "every decode step's time, drafted or not, must reach the drafter"


def test_the_client_drafts_from_its_bundles_table_unless_speculation_is_off(drafted_bundle):
    from client.settings import ClientSettings
    from client.split import Split

    split = Split(ClientSettings(bundle=drafted_bundle), local=True)
    try:
        generator = split.new_generator(SamplingParams())
        assert generator.drafter.table is split.draft_table and len(split.draft_table.pairs) > 0
        # What a drafted position costs is the deployment's: one record for every conversation of the process.
        assert generator.drafter.costs is split.new_generator(SamplingParams()).drafter.costs is split.step_costs
    finally:
        split.close()
    split = Split(ClientSettings(bundle=drafted_bundle, speculate=False), local=True)
    try:
        assert split.draft_table is None and split.new_generator(SamplingParams()).drafter is None
    finally:
        split.close()
