"""Write the client and server bundle directories and the one manifest both of them carry."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from export.graph_builder import sliding_windows
from splitcore.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    DraftTableSpec,
    GraphSpec,
    LookaheadSpec,
    Manifest,
    ModelSpec,
    TokenizerSpec,
    sha256_file,
)

CLIENT, SERVER, FULL = "client", "server", "full"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOOLS = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "gguf", "numpy")


def model_spec(model, model_id: str, source: str, revision: str | None) -> ModelSpec:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    rope = dict(rope)
    theta = rope.pop("rope_theta", None) or getattr(c, "rope_theta", None) or 10000.0
    return ModelSpec(
        id=model_id,
        source=source,
        revision=revision,
        architecture=(c.architectures or [type(model).__name__])[0],
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=float(theta),
        rope_scaling=rope or None,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        model_type=c.model_type,
        sliding_window=next((w for w in sliding_windows(c) if w), None),
        attention_bias=model.model.layers[0].self_attn.q_proj.bias is not None,
    )


# transformers' documented defaults for what a generation_config leaves unset (its 5.x objects hold None there).
GENERATION_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


def generation_defaults(model) -> dict:
    """The model's effective sampling defaults (its generation_config, transformers' defaults filled in), so a
    model that does not sample by default is answered greedily."""
    config = model.generation_config
    values = {name: getattr(config, name, None) for name in GENERATION_DEFAULTS}
    return {name: default if values[name] is None else values[name] for name, default in GENERATION_DEFAULTS.items()}


def write_tokenizer(tokenizer: PreTrainedTokenizerBase, generation_eos, client_dir: Path) -> TokenizerSpec:
    """tokenizer.json and the chat template go to the client only: the server never sees text."""
    tokenizer.backend_tokenizer.save(str(client_dir / TOKENIZER_FILE))
    template_file = None
    if tokenizer.chat_template:
        (client_dir / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template)
        template_file = CHAT_TEMPLATE_FILE
    eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    probe = "a"
    adds_bos = (
        tokenizer.bos_token_id is not None
        and tokenizer(probe)["input_ids"][:1] == [tokenizer.bos_token_id]
        and tokenizer(probe, add_special_tokens=False)["input_ids"][:1] != [tokenizer.bos_token_id]
    )
    return TokenizerSpec(
        file=TOKENIZER_FILE,
        chat_template_file=template_file,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=eos,
        pad_token_id=tokenizer.pad_token_id,
        add_bos_token=adds_bos,
    )


def file_entries(
    out: Path, head: GraphSpec, tail: GraphSpec, tokenizer: TokenizerSpec | None, full: GraphSpec | None = None,
    lm_head: GraphSpec | None = None, drafts: DraftTableSpec | None = None, lookahead: LookaheadSpec | None = None,
    tail_drafts: bool = False,
) -> dict:
    """Each file's hash, size and the bundles that hold it (``tail_drafts``: the head graph is in both)."""
    roles = {CLIENT: [head.file, head.data_file], SERVER: [tail.file, tail.data_file]}
    if tail_drafts:
        roles[SERVER] += [head.file, head.data_file]
    if lm_head is not None:
        roles[CLIENT] += [lm_head.file, lm_head.data_file]
    if drafts is not None:
        roles[CLIENT].append(drafts.file)
    if lookahead is not None:
        roles[SERVER].append(lookahead.file)
    if tokenizer is not None:
        roles[CLIENT] += [tokenizer.file, tokenizer.chat_template_file]
    if full is not None:
        roles[FULL] = [full.file, full.data_file]
    entries = {}
    for role, files in roles.items():
        for name in filter(None, files):
            path = out / role / name
            entry = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "roles": [role]}
            if name in entries:  # one file in two bundles: the same bytes in each
                if entries[name]["sha256"] != entry["sha256"]:
                    raise ValueError(f"{name} differs between the bundles: {entries[name]['roles']} and {role}")
                entry["roles"] = [*entries[name]["roles"], role]
            entries[name] = entry
    return entries


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def write_manifest(out: Path, manifest: Manifest) -> bytes:
    """The same bytes into every bundle, so the client and the server agree on the manifest hash.

    Optional fields left unset (``full``, ``quantization``) are omitted, so a plain split bundle reads the same as
    before they existed.
    """
    raw = (json.dumps(manifest.model_dump(mode="json", exclude_unset=True), indent=2) + "\n").encode()
    roles = [CLIENT, SERVER] + ([FULL] if manifest.full is not None else [])
    for role in roles:
        tmp = out / role / (MANIFEST_FILE + ".tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, out / role / MANIFEST_FILE)
    return raw


def build_manifest(**fields) -> Manifest:
    return Manifest(schema_version=SCHEMA_VERSION, **fields)
