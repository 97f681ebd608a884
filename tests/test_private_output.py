"""Private-output mode: the tail returns final hidden states and the client's LM head makes the logits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY, bundles

from client.cli import main as client_main
from export import parity
from splitcore.errors import ManifestError
from splitcore.generation import LocalTail, SplitGenerator
from splitcore.graphs import HeadRunner, LmHeadRunner, TailRunner
from splitcore.sampling import SamplingParams

K = 2


def test_manifest_announces_hidden_mode_and_client_lm_head(export_bundle):
    client, server = bundles(export_bundle(TINY, K, private_output=True))
    m = client.manifest
    assert m.schema_version == 3 and m.output_mode == "hidden"
    assert m.tail.outputs[0].name == "final_hidden_states"
    assert m.tail.outputs[0].shape == ["batch_size", "kept_sequence_length", m.model.hidden_size]
    assert [t.name for t in m.lm_head.inputs] == ["final_hidden_states"]
    assert m.lm_head.outputs[0].shape[-1] == m.model.vocab_size
    assert m.files["lm_head.onnx"].roles == ["client"]
    assert not (server.root / "lm_head.onnx").exists()
    # It samples nothing, so it drafts nothing: no head beside the tail.
    assert m.tail_drafts is None and not (server.root / "head.onnx").exists()
    assert server.manifest_sha256 == client.manifest_sha256


def test_private_tail_plus_client_lm_head_equals_default_logits(export_bundle):
    default_client, default_server = bundles(export_bundle(TINY, K))
    client, server = bundles(export_bundle(TINY, K, private_output=True))
    ids = np.arange(20, 31, dtype=np.int64)[None, :]
    head = HeadRunner(default_client)
    hidden = head.forward(ids, head.new_cache())
    default_tail = TailRunner(default_server)
    expected = default_tail.forward(hidden, default_tail.new_cache(), logits_to_keep=0)
    tail = TailRunner(server)
    final = tail.forward(hidden, tail.new_cache(), logits_to_keep=0)
    assert final.shape == (1, ids.shape[1], client.manifest.model.hidden_size)
    parity.assert_close("logits (private vs default)", LmHeadRunner(client).forward(final), expected)


def test_private_output_greedy_tokens_equal_default_mode(export_bundle):
    default_client, default_server = bundles(export_bundle(TINY, K))
    client, server = bundles(export_bundle(TINY, K, private_output=True))
    prompt = list(range(40, 52))
    eos = client.manifest.tokenizer.eos_token_ids

    def greedy(c, s, lm_head):
        tail = LocalTail(TailRunner(s), SamplingParams(), lm_head)
        generator = SplitGenerator(HeadRunner(c), tail, prefill_chunk=5)
        return [choice.token for choice in generator.generate(prompt, 32, eos)]

    expected = greedy(default_client, default_server, None)
    assert greedy(client, server, LmHeadRunner(client)) == expected
    assert len(expected) >= 16 and len(set(expected)) >= 8, f"degenerate generation proves little: {expected}"


def test_local_tail_refuses_a_mode_mismatch(export_bundle):
    client, server = bundles(export_bundle(TINY, K, private_output=True))
    with pytest.raises(ManifestError, match="needs the client bundle's LM head"):
        LocalTail(TailRunner(server), SamplingParams())
    default_client, _ = bundles(export_bundle(TINY, K))
    with pytest.raises(ManifestError, match="no lm_head graph"):
        LmHeadRunner(default_client)


def test_client_cli_local_runs_private_output_like_default(export_bundle, capsys):
    argv = ["--local", "--raw", "--max-new-tokens", "12", "split inference"]
    assert client_main([*argv, "--bundle", str(export_bundle(TINY, K))]) == 0
    expected = capsys.readouterr().out
    assert client_main([*argv, "--bundle", str(export_bundle(TINY, K, private_output=True))]) == 0
    assert capsys.readouterr().out == expected and expected.strip()


def test_older_and_newer_manifests_are_refused_with_a_hint(export_bundle):
    """Schema 1 and 2 bundles grow their KV cache by concatenation, which this runtime no longer drives."""
    import json

    from splitcore.manifest import parse_manifest

    client, _ = bundles(export_bundle(TINY, K))
    data = json.loads((client.root / "manifest.json").read_text())
    assert data["schema_version"] == 3 and data["output_mode"] == "logits" and data["lm_head"] is None
    for version in (1, 2, 4):
        with pytest.raises(ManifestError, match=f"schema_version {version}.*re-run the export"):
            parse_manifest(json.dumps(data | {"schema_version": version}).encode())
    with pytest.raises(ManifestError, match="output_mode 'hidden' needs"):
        parse_manifest(json.dumps(data | {"output_mode": "hidden"}).encode())


def test_private_output_over_http_equals_default_mode(export_bundle):
    """End to end: the service returns final hidden states, the client's LM head picks the same greedy tokens."""
    import httpx
    from servers import service_thread

    from client.remote import RemoteTail
    from client.settings import ClientSettings
    from splitcore import protocol, wire

    prompt = list(range(40, 60))
    default_client, default_server = bundles(export_bundle(TINY, 2))
    private = export_bundle(TINY, 2, private_output=True)
    client, _ = bundles(private)
    expected = SplitGenerator(HeadRunner(default_client), LocalTail(TailRunner(default_server), SamplingParams()))
    expected_tokens = [c.token for c in expected.generate(prompt, 24, stop_ids=())]
    with service_thread(private / "server") as url:
        assert httpx.get(f"{url}/readyz").json()["output_mode"] == "hidden"
        link = RemoteTail.open(client, ClientSettings(server_url=url), SamplingParams(), LmHeadRunner(client))
        generator = SplitGenerator(HeadRunner(client), link)
        assert [c.token for c in generator.generate(prompt, 24, stop_ids=())] == expected_tokens
        # What came back per decode step is a hidden-state frame, never a token id.
        sid = httpx.post(f"{url}{protocol.SESSIONS_PATH}", json={"manifest_sha256": client.manifest_sha256}).json()
        frame = wire.encode(np.zeros((1, 1, client.manifest.model.hidden_size), np.float16))
        answer = httpx.post(f"{url}{protocol.steps_path(sid['session_id'])}", content=frame, headers={
            "Content-Type": wire.MEDIA_TYPE, protocol.PAST_LENGTH_HEADER: "0",
            protocol.MANIFEST_HEADER: client.manifest_sha256})
        assert answer.headers["content-type"] == wire.MEDIA_TYPE
        assert wire.decode(answer.content).shape == (1, 1, client.manifest.model.hidden_size)
        assert b"token" not in answer.content
