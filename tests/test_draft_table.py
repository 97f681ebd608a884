"""The draft table: n-grams the model itself writes, counted at export, drafted by the client where prompt lookup
finds nothing; read back without pickle and checked; the output with its drafts is what it is without."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TINY

from client.split import draft_table
from export.__main__ import main as export_main
from export.draft_table import count_ngrams
from splitcore.drafting import TABLE_ARRAYS, TABLE_MISSES, DraftTable, PromptLookup
from splitcore.errors import ManifestError
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, TailRunner
from splitcore.manifest import load_bundle
from splitcore.sampling import SamplingParams


def table_of(sequences) -> DraftTable:
    return DraftTable.from_arrays(count_ngrams(sequences), vocab=100)


def test_counts_keep_each_pairs_most_frequent_successor():
    arrays = count_ngrams([[1, 2, 3], [1, 2, 4], [1, 2, 4], [5, 6], [7, 8, 9, 7, 8]])
    pairs = DraftTable.from_arrays(arrays, vocab=100).pairs
    assert pairs == {(1, 2): 4, (7, 8): 9, (8, 9): 7, (9, 7): 8}  # (1, 2): 4 twice, 3 once; [5, 6] has no triple
    assert count_ngrams([[3, 4, 9], [3, 4, 2]])["pair_next"].tolist() == [2]  # a tie: the smaller id


def test_the_table_drafts_the_successor_of_the_last_two_tokens():
    table = table_of([[1, 2, 3, 4], [9, 3, 4]])
    assert table.propose([0, 1, 2]) == [3]
    assert table.propose([5, 3]) == []  # (5, 3) unknown
    assert table.propose([2]) == []


def test_prompt_lookup_drafts_from_the_table_only_where_the_conversation_has_no_match():
    table = table_of([[1, 2, 3, 4, 5]])
    lookup = PromptLookup(max_draft=8, table=table)
    assert lookup.propose([7, 3, 9, 7, 3], limit=4) == [9, 7, 3] and not lookup.from_table  # the conversation first
    assert lookup.propose([8, 1, 2], limit=4) == [3] and lookup.from_table  # no match: one token from the table
    for _ in range(TABLE_MISSES):
        assert lookup.propose([8, 1, 2], limit=4) == [3]
        lookup.update(proposed=1, accepted=0)
    assert (lookup.length, lookup.rejected) == (4, 0)  # the table's misses count apart from the conversation's
    assert lookup.propose([8, 1, 2], limit=4) == []  # enough misses in a row: the table rests
    lookup.propose([7, 3, 9, 7, 3], limit=4)
    lookup.update(proposed=3, accepted=1)  # until a lookup draft is kept again
    assert lookup.propose([8, 1, 2], limit=4) == [3]
    lookup.update(proposed=1, accepted=0)
    assert lookup.table_missed == 1
    lookup.propose([8, 1, 2], limit=4)
    lookup.update(proposed=1, accepted=1)  # a kept table draft resets its count too
    assert lookup.table_missed == 0


@pytest.mark.parametrize(("arrays", "why"), [
    ({"pair_first": [1], "pair_second": [2], "pair_next": [300]}, "below 256"),
    ({"pair_first": [1, 2], "pair_second": [2], "pair_next": [3]}, "of one length"),
    ({"pair_first": [1], "pair_second": [2], "pair_next": [-3]}, "below 256"),
    ({"pair_first": [1.5], "pair_second": [2], "pair_next": [3]}, "token ids"),
    ({"pair_first": [1], "pair_second": [2]}, "not a draft table"),
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
    np.savez(path, pair_first=np.array([{"x": 1}], dtype=object), pair_second=np.array([1]), pair_next=np.array([1]))
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


def test_greedy_output_with_table_drafts_equals_one_token_per_step(drafted_bundle):
    client = load_bundle(drafted_bundle / "client", "client", verify=False)
    server = load_bundle(drafted_bundle / "server", "server")
    table = DraftTable.load(client.path(client.manifest.drafts.file), client.manifest.model.vocab_size)
    head, tail = HeadRunner(client), TailRunner(server)
    prompt = list(range(30, 44))  # no repeats: drafts come from the table alone at first

    class Counting(PromptLookup):
        from_table_proposals = 0

        def propose(self, history, limit):
            drafts = super().propose(history, limit)
            self.from_table_proposals += self.from_table
            return drafts

    outputs, drafter = [], Counting(table=table)
    for each in (None, drafter):
        generator = SplitGenerator(head, LocalTail(tail, SamplingParams()), prefill_chunk=5, drafter=each)
        outputs.append([c.token for c in generator.generate(prompt, 40, ())])
    assert drafter.from_table_proposals > 0, "the table must have drafted something"
    assert outputs[0] == outputs[1]


def test_the_client_drafts_from_its_bundles_table_unless_speculation_is_off(drafted_bundle):
    from client.settings import ClientSettings
    from client.split import Split

    split = Split(ClientSettings(bundle=drafted_bundle), local=True)
    try:
        generator = split.new_generator(SamplingParams())
        assert generator.drafter.table is split.draft_table and len(split.draft_table.pairs) > 0
    finally:
        split.close()
    split = Split(ClientSettings(bundle=drafted_bundle, speculate=False), local=True)
    try:
        assert split.draft_table is None and split.new_generator(SamplingParams()).drafter is None
    finally:
        split.close()
