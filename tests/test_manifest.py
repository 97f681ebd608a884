"""The manifest is the contract: tampering, unknown keys and wrong versions are refused with a clear message."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY

from splitcore.errors import ManifestError
from splitcore.manifest import load_bundle


@pytest.fixture
def bundle_copy(export_bundle, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(export_bundle(TINY, 2), out)
    return out


def test_client_and_server_share_one_manifest(export_bundle):
    out = export_bundle(TINY, 2)
    client, server = load_bundle(out / "client", "client"), load_bundle(out / "server", "server")
    assert client.manifest_sha256 == server.manifest_sha256
    assert not (out / "server" / "tokenizer.json").exists() and not (out / "client" / "tail.onnx").exists()
    # The head is in both: the tail drafts with it (splitcore/tail_drafts.py); the same bytes, one manifest entry.
    assert server.manifest.tail_drafts is not None
    assert (out / "server" / "head.onnx").read_bytes() == (out / "client" / "head.onnx").read_bytes()
    assert client.manifest.files["head.onnx"].roles == ["client", "server"]
    m = client.manifest
    assert m.tail.past[0] == ("past_key_values.2.key", "past_key_values.2.value")
    assert m.validation["status"] == "passed" and m.validation["logits_max_abs_diff"] <= m.validation["atol"] * 10


def test_tampered_graph_is_refused(bundle_copy):
    data = bundle_copy / "server" / "tail.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="sha256 .* re-run the export"):
        load_bundle(bundle_copy / "server", "server")
    load_bundle(bundle_copy / "client", "client")  # the client bundle does not hold the tail


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "client" / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match="missing"):
        load_bundle(bundle_copy / "client", "client")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(schema_version=99), "schema_version 99"),
        (lambda m: m.update(surprise=1), "surprise"),
        (lambda m: m.update(split_layer=9), "split_layer 9"),
    ],
)
def test_malformed_manifest_is_refused(bundle_copy, edit, message):
    path = bundle_copy / "client" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=message):
        load_bundle(bundle_copy / "client", "client")
