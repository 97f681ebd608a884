"""What ``--model`` accepts, and what a failed export leaves behind (nothing it created)."""

from __future__ import annotations

from pathlib import Path

import pytest

from export import cleanup, sources
from export.sources import (
    RANDOM_CONFIGS,
    SUPPORTED_MODEL_TYPES,
    SourceError,
    check_config,
    check_model_type,
    load_model,
)


def test_supported_families_are_one_list():
    assert SUPPORTED_MODEL_TYPES == ("llama", "mistral", "qwen2")
    assert {config["model_type"] for config in RANDOM_CONFIGS.values()} == set(SUPPORTED_MODEL_TYPES)


def test_unsupported_model_type_names_the_list():
    with pytest.raises(SourceError) as refused:
        check_model_type("gemma2", "google/gemma-2-2b")
    message = str(refused.value)
    assert "\n" not in message and "'gemma2'" in message and "llama, mistral, qwen2" in message


def test_an_mlp_activation_the_graphs_do_not_build_is_refused_by_name():
    from transformers import LlamaConfig

    with pytest.raises(SourceError, match="'relu' \\(hidden_act\\); the graphs build silu"):
        check_config(LlamaConfig(hidden_act="relu"), "someone/relu-llama")
    check_config(LlamaConfig(hidden_act="gelu_new"), "someone/gelu-llama")  # built: no error


@pytest.mark.parametrize(("name", "cls"), [("llama3-tiny", "LlamaForCausalLM"), ("mistral-tiny", "MistralForCausalLM"),
                                           ("qwen2-tiny", "Qwen2ForCausalLM")])
def test_random_configs_use_their_family_classes(name, cls):
    loaded = load_model(f"random:{name}")
    assert type(loaded.model).__name__ == cls
    assert loaded.model.config.initializer_range == 0.5
    assert loaded.tokenizer.vocab_size <= loaded.model.config.vocab_size


def test_random_weights_are_reproducible():
    a, b = load_model("random:qwen2-tiny", seed=3).model, load_model("random:qwen2-tiny", seed=3).model
    bias_a, bias_b = a.model.layers[1].self_attn.k_proj.bias, b.model.layers[1].self_attn.k_proj.bias
    assert bias_a.abs().min() > 0 and bool((bias_a == bias_b).all())


@pytest.mark.parametrize("spec", ["Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct",
                                  "mistralai/Mistral-7B-Instruct-v0.3"])
def test_hub_shaped_ids(spec):
    assert sources.HUB_ID.fullmatch(spec)


@pytest.mark.parametrize("spec", ["smolm2", "llama", "random-tiny", "/abs/path", "./rel", "a/b/c", "org/"])
def test_not_hub_shaped(spec):
    assert not sources.HUB_ID.fullmatch(spec)


# -- cleanup after a failed export ---------------------------------------------------------------------------


def fail_inside(out: Path, write) -> None:
    with pytest.raises(RuntimeError, match="export failed"), cleanup.removed_on_failure(out):
        write()
        raise RuntimeError("export failed")


def test_new_folders_are_removed_with_everything_in_them(tmp_path):
    out = tmp_path / "bundles" / "model-k4"

    def write():
        (out / "client").mkdir(parents=True)
        (out / "server").mkdir()
        (out / "client" / "head.onnx").write_bytes(b"half")

    fail_inside(out, write)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_bundle_keeps_its_files_and_loses_only_new_ones(tmp_path):
    out = tmp_path / "model-k4"
    (out / "client").mkdir(parents=True)
    (out / "client" / "head.onnx").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("the user's")

    def write():
        (out / "client" / "head.onnx").write_bytes(b"overwritten")
        (out / "client" / "head.onnx.data").write_bytes(b"new")
        (out / "server").mkdir()

    fail_inside(out, write)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "model-k4", "model-k4/client", "model-k4/client/head.onnx", "notes.txt"]


def test_success_keeps_everything(tmp_path):
    out = tmp_path / "new" / "bundle"
    with cleanup.removed_on_failure(out):
        out.mkdir(parents=True)
        (out / "manifest.json").write_text("{}")
    assert (out / "manifest.json").is_file()


def test_interrupt_cleans_up_and_propagates(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt), cleanup.removed_on_failure(out):
        out.mkdir()
        raise KeyboardInterrupt
    assert not out.exists()
