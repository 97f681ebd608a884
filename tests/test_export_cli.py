"""Bad export arguments end in one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY

from export.__main__ import main as export_main

ROOT = Path(__file__).resolve().parents[1]


def run_export(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def export_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same entry point without a new interpreter: most bad arguments need no second torch import."""
    try:
        code = export_main(list(args))
    except SystemExit as e:  # argparse errors exit with 2
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.mark.slow
def test_unknown_hub_id_offline(tmp_path):
    """A subprocess, so the hub library starts in offline mode instead of waiting on the network."""
    result = run_export("--model", "no-such-org/no-such-model", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "cannot load no-such-org/no-such-model")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--model", "random:nope"], ["unknown random config", "tiny"]),
        (["--model", "/definitely/missing/model.gguf"], ["does not exist"]),
        (["--model", TINY, "--split-layer", "0"], ["1..N-1"]),
        (["--model", TINY, "--split-layer", "4"], ["1..3", "4 layers"]),
        (["--model", TINY, "--dtype", "int4"], ["invalid choice"]),
    ],
)
def test_bad_arguments(tmp_path, capsys, args, fragments):
    assert_one_line_error(export_in_process(capsys, *args, "--out", str(tmp_path / "out")), *fragments)


def test_unreadable_gguf(tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF this is not a model")
    monkeypatch.setenv("SPLIT_CACHE_DIR", str(tmp_path))
    assert_one_line_error(export_in_process(capsys, "--model", str(broken), "--out", str(tmp_path / "out")),
                          "cannot read GGUF file")


def test_out_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = export_in_process(capsys, "--model", TINY, "--out", str(blocker / "bundle"))
    assert_one_line_error(result, "not writable")


@pytest.mark.slow
def test_second_run_is_up_to_date(export_bundle):
    out = export_bundle(TINY, 2)
    result = run_export("--model", TINY, "--split-layer", "2", "--full", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stderr


# -- the model argument (issue 15, defects 6 and 12; issue 16: the supported families) --------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the hub, in any way the exporter could."""
    import huggingface_hub
    import transformers

    def touched(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", touched)
    for auto in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(auto, "from_pretrained", touched)


def test_model_name_typo_fails_at_once_without_the_hub(tmp_path, capsys, no_hub):
    started = time.perf_counter()
    result = export_in_process(capsys, "--model", "smolm2", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "unknown model 'smolm2'", "did you mean smollm2?", "random:llama3-tiny",
                          "a .gguf file", "owner/name")
    assert time.perf_counter() - started < 2


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path, capsys, no_hub):
    result = export_in_process(capsys, "--model", str(tmp_path / "no" / "such" / "model"), "--out",
                               str(tmp_path / "out"))
    assert_one_line_error(result, "no directory", "--model takes")


def test_failed_export_leaves_no_bundle_folders(tmp_path, capsys, no_hub):
    """Needs export.cleanup.removed_on_failure around the export in export/__main__.py."""
    out = tmp_path / "bundles" / "typo-k4"
    assert_one_line_error(export_in_process(capsys, "--model", "smolm2", "--out", str(out)), "unknown model")
    assert not (tmp_path / "bundles").exists(), sorted(str(p) for p in tmp_path.rglob("*"))


def test_unreachable_hub_is_one_line_after_one_short_try(tmp_path, capsys, monkeypatch):
    """No network: one look-up, then the local hub cache, then one line (not a minute of retries)."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(kwargs.get("timeout"))
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    started = time.perf_counter()
    result = export_in_process(capsys, "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "cannot load no-such-org/no-such-model")
    assert len(calls) == 1 and calls[0] <= 10
    assert time.perf_counter() - started < 10


def test_unknown_hub_repository_is_one_line(tmp_path, capsys, monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(self, repo_id, **kwargs):
        response = httpx2.Response(404, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
        raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=response)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", not_found)
    result = export_in_process(capsys, "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "no model no-such-org/no-such-model on the hub")


def write_tokenizer(directory: Path) -> None:
    from export.byte_tokenizer import byte_tokenizer

    byte_tokenizer(512).save_pretrained(directory)


def test_unsupported_model_type_is_refused_naming_the_list(tmp_path, capsys):
    """Refused from config.json alone, before any weights are read (there are none here)."""
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=512).save_pretrained(tmp_path / "gpt2")
    write_tokenizer(tmp_path / "gpt2")
    result = export_in_process(capsys, "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "is a 'gpt2' model", "supports model types llama, mistral, qwen2")


def test_local_directory_without_tokenizer_files(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    result = export_in_process(capsys, "--model", str(tmp_path / "llama"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "has no tokenizer files", "tokenizer.json", "tokenizer.model")


def test_sentencepiece_only_tokenizer_without_sentencepiece(tmp_path, capsys, monkeypatch):
    """Older Llama checkpoints carry only tokenizer.model; the export extra installs sentencepiece for them."""
    from transformers import LlamaConfig

    from export import sources

    LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.model").write_bytes(b"not read: the check comes first")
    monkeypatch.setattr(sources, "has_sentencepiece", lambda: False)
    result = export_in_process(capsys, "--model", str(tmp_path / "llama"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "tokenizer.model", "pip install sentencepiece")


def test_directory_without_config(tmp_path, capsys):
    write_tokenizer(tmp_path / "half")
    result = export_in_process(capsys, "--model", str(tmp_path / "half"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "no config.json")


def test_gguf_of_an_unsupported_architecture(tmp_path, capsys, monkeypatch):
    """Refused from the GGUF's metadata, before the (slow) conversion."""
    import gguf

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    monkeypatch.setenv("SPLIT_CACHE_DIR", str(tmp_path / "cache"))
    result = export_in_process(capsys, "--model", str(path), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "is a 'gpt2' GGUF", "llama, mistral, qwen2")


def test_sentencepiece_is_in_the_export_extra():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("sentencepiece") for dep in extras["export"])


def test_export_shows_progress_per_layer_on_stderr(tmp_path, caplog):
    """Issue 15 defect 14: long graph builds report their layers (every layer on a terminal, ~10% steps in a log)."""
    import logging

    caplog.set_level(logging.INFO, logger="export")
    assert export_main(["--model", TINY, "--split-layer", "1", "--out", str(tmp_path / "out")]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "export"]
    assert "  head: layer 1/1" in lines
    assert [line for line in lines if line.startswith("  tail: layer")] == [f"  tail: layer {i}/3" for i in (1, 2, 3)]
    steps = [line for line in lines if line.startswith("[")]
    assert steps[0] == "[1/5] loading random:tiny" and steps[-1] == "[5/5] writing manifest"


# -- shapes a held-out checkpoint may have ------------------------------------------------------------------------


def write_llama(directory: Path, **config) -> None:
    """A tiny random Llama in the transformers layout, with the byte tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from export.byte_tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer(512)
    shapes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, initializer_range=0.5,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**shapes, **config})).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.mark.parametrize("config", [
    {"max_position_embeddings": 64},  # fewer positions than the held-out text has tokens
    {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},  # default rope within them
    {"head_dim": 32},  # != hidden / heads; logits PyTorch's own fp32 resolves to ~2e-4 only
])
def test_a_local_checkpoint_of_these_shapes_exports_and_passes_parity(tmp_path, config):
    write_llama(tmp_path / "model", **config)
    out = tmp_path / "out"
    assert export_main(["--model", str(tmp_path / "model"), "--split-layer", "1", "--draft-tokens", "0",
                        "--out", str(out)]) == 0
    manifest = json.loads((out / "client" / "manifest.json").read_text())
    assert manifest["validation"]["status"] == "passed"
    assert manifest["validation"]["quality"]["tokens"] == min(256, config.get("max_position_embeddings", 1024))
    if "head_dim" in config:  # passed against PyTorch in float64, which PyTorch fp32 misses by more than 1e-4
        assert manifest["validation"]["logits_reference"] == "float64"
        assert manifest["validation"]["torch_fp32_logits_error"] > 1e-4


@pytest.mark.parametrize("config, fragments", [
    # onnxruntime's GroupQueryAttention takes head sizes in multiples of 16 (OpenLLaMA-3B: 100; llama2.c: 8).
    ({"hidden_size": 40, "num_attention_heads": 5, "num_key_value_heads": 5}, ("heads of 8 dimensions",
                                                                              "multiple of 16")),
    ({"num_hidden_layers": 1}, ("has 1 decoder layer", "needs at least 2")),
])
def test_a_checkpoint_the_graphs_cannot_split_is_refused_in_one_line(tmp_path, capsys, config, fragments):
    write_llama(tmp_path / "model", **config)
    result = export_in_process(capsys, "--model", str(tmp_path / "model"), "--split-layer", "1", "--draft-tokens",
                               "0", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, *fragments)
