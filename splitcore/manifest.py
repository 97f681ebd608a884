"""The manifest: the one description of a split bundle, written by export and read by the client and the service.

Everything shape-related (split layer, hidden size, KV layout, IO names, dtypes) lives here and nowhere else. The
same manifest bytes go into the client and the server bundle, so both sides compute the same manifest hash and
every request can name the exact export it was made for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from splitcore import names
from splitcore.errors import ManifestError

# 2 added ``output_mode`` and ``lm_head``. 3: every graph keeps its KV cache in fixed-size buffers written in
# place (GroupQueryAttention), weights may be quantized (``weights``), and the model records its family's facts.
# Older bundles grow their cache by concatenation, which this runtime no longer drives: they are refused with a
# hint to re-export, and so is a manifest newer than this code, since its meaning may have changed.
SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (3,)
MANIFEST_FILE = "manifest.json"

# "full" is the unsplit single-graph bundle that benchmarks compare the split against.
Role = Literal["client", "server", "full"]
DType = Literal["int64", "int32", "float32", "float16"]
# Weights of the graph's matrix multiplications: plain floats, or blockwise-quantized (onnxruntime MatMulNBits,
# block 32, asymmetric) 8- or 4-bit integers ("int4-mlp": the MLP's gate and up projections 4-bit, the rest 8-bit;
# see export/matmul_weights.py). Activations stay in the graph's dtype.
Weights = Literal["fp32", "fp16", "int8", "int4-mlp", "int4"]
# "logits": the tail ends with the final norm + LM head and returns ``logits``; the server sees the output
# distribution. "hidden": the tail returns ``final_hidden_states`` (after layer N-1, before the final norm) and the
# client bundle's ``lm_head`` graph (final norm + LM head) turns them into logits on the user's machine.
OutputMode = Literal["logits", "hidden"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    dtype: DType
    shape: list[int | str]


class GraphSpec(_Strict):
    """One ONNX graph: its files, the half-open layer span it holds and its IO."""

    file: str
    data_file: str | None
    layers: tuple[int, int]
    dtype: Literal["float32", "float16"]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    past: list[tuple[str, str]]
    present: list[tuple[str, str]]
    weights: Weights
    # How the LM head's weights are stored where the graph has one and it differs from ``weights`` (int4 graphs keep
    # an 8-bit LM head: the vocabulary projection is where 4 bits cost the most quality).
    lm_head_weights: Weights | None = None
    # How a graph that starts from token ids stores its embedding table (None: the graph has none). Quantized
    # schemes keep it as 8-bit blocks of 32 per row ("int8", onnxruntime GatherBlockQuantized).
    embedding_weights: Weights | None = None


class ModelSpec(_Strict):
    id: str
    source: str
    revision: str | None
    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None
    rms_norm_eps: float
    tie_word_embeddings: bool
    # The family's facts the graphs were built with, so no reader has to guess them.
    model_type: str = "llama"
    sliding_window: int | None = None
    attention_bias: bool = False


class TokenizerSpec(_Strict):
    file: str
    chat_template_file: str | None
    bos_token: str | None
    eos_token: str | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    add_bos_token: bool


class DraftTableSpec(_Strict):
    """The client's draft table (splitcore/drafting.py DraftTable), counted at export from the model's own answers."""

    file: str
    sampled_tokens: int
    seed: int
    pairs: int


class LookaheadSpec(_Strict):
    """The tail's look-ahead (splitcore/lookahead.py), fitted at export on the draft table's samples."""

    file: str
    shortlist: int  # the tokens it guesses among
    positions: int  # answer positions it was fitted on
    greedy_agreement: float  # how often its guess was the next token of greedy answers to requests it was not fitted on
    # A guess whose confidence falls in [edges[i], edges[i + 1]) is right with chances[i] (on those answers).
    confidence_edges: list[float]
    chances: list[float]


class TailDraftSpec(_Strict):
    """The tail's own drafts (splitcore/tail_drafts.py): the server bundle carries the head graph too, and runs it over
    the tokens it sampled itself (never the prompt, which it never sees) to draft the tokens after them."""

    # The ids the model's chat template writes before an answer (or the BOS id, without a template): the head sees
    # them before the answer's own tokens, in place of the prompt.
    prefix: list[int]
    window: int  # the most recent sampled tokens the head runs over for each draft


class FileEntry(_Strict):
    sha256: str
    bytes: int
    roles: list[Role]


class Manifest(_Strict):
    schema_version: int
    model: ModelSpec
    split_layer: int
    head: GraphSpec
    tail: GraphSpec
    # Optional unsplit graph (layers [0, N) + norm + LM head), written by `python -m export --full`.
    full: GraphSpec | None = None
    output_mode: OutputMode = "logits"
    lm_head: GraphSpec | None = None
    # The model's own sampling defaults (transformers' generation_config names: do_sample, temperature, top_p,
    # top_k, repetition_penalty); the gateway uses them where a request does not say.
    generation: dict | None = None
    tokenizer: TokenizerSpec | None
    # Optional draft n-grams for speculation on the client (`python -m export --draft-tokens`).
    drafts: DraftTableSpec | None = None
    # Optional guess at the token after each sampled one, made where the logits are (the tail, in output mode logits).
    lookahead: LookaheadSpec | None = None
    # Optional drafts made by the tail from the tokens it sampled (output mode logits; the server bundle has the head).
    tail_drafts: TailDraftSpec | None = None
    files: dict[str, FileEntry]
    validation: dict
    tools: dict[str, str]
    export: dict

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        n, k = self.model.num_layers, self.split_layer
        if not 1 <= k < n:
            raise ValueError(f"split_layer {k} outside 1..{n - 1}")
        if tuple(self.head.layers) != (0, k) or tuple(self.tail.layers) != (k, n):
            raise ValueError(f"graph layer spans {self.head.layers}, {self.tail.layers} do not cut {n} layers at {k}")
        if self.drafts is not None and "client" not in getattr(self.files.get(self.drafts.file), "roles", ()):
            raise ValueError(f"draft table {self.drafts.file!r} is not among the client bundle's files")
        if self.lookahead is not None and "server" not in getattr(self.files.get(self.lookahead.file), "roles", ()):
            raise ValueError(f"look-ahead {self.lookahead.file!r} is not among the server bundle's files")
        if self.lookahead is not None and self.output_mode != "logits":
            raise ValueError("a look-ahead reads the tail's logits: output_mode must be 'logits'")
        if self.full is not None and tuple(self.full.layers) != (0, n):
            raise ValueError(f"full graph spans layers {self.full.layers}, expected (0, {n})")
        tail_out = self.tail.outputs[0].name
        if self.output_mode == "logits":
            if self.lm_head is not None or tail_out != names.LOGITS:
                raise ValueError(f"output_mode 'logits' needs a tail returning {names.LOGITS!r} and no lm_head graph")
        else:
            if self.lm_head is None or tail_out != names.FINAL_HIDDEN_STATES:
                raise ValueError(
                    f"output_mode 'hidden' needs a tail returning {names.FINAL_HIDDEN_STATES!r} (got {tail_out!r}) "
                    "and an lm_head graph"
                )
            if self.lm_head.inputs[0].name != tail_out or self.lm_head.outputs[0].name != names.LOGITS:
                raise ValueError(f"lm_head must map {tail_out!r} to {names.LOGITS!r}")
        if self.tail_drafts is not None:
            if self.output_mode != "logits":
                raise ValueError("the tail drafts from tokens it samples: output_mode must be 'logits'")
            if any("server" not in getattr(self.files.get(name), "roles", ())
                   for name in filter(None, (self.head.file, self.head.data_file))):
                raise ValueError("the tail drafts with the head graph: it must be among the server bundle's files")
            if self.tail_drafts.window < 1 or not all(0 <= t < self.model.vocab_size for t in self.tail_drafts.prefix):
                raise ValueError("tail_drafts needs a window >= 1 and prefix ids in the vocabulary")
        return self

    @property
    def kv_shape_per_token(self) -> tuple[int, int]:
        """(kv heads, head dim) of one cached position of one layer."""
        return self.model.num_key_value_heads, self.model.head_dim

    def kv_bytes_per_token(self, graph: GraphSpec) -> int:
        """Bytes one cached position costs a session of ``graph``: key + value for each of its layers."""
        kv_heads, head_dim = self.kv_shape_per_token
        start, end = graph.layers
        return 2 * (end - start) * kv_heads * head_dim * np.dtype(graph.dtype).itemsize

    def role_files(self, role: Role) -> list[str]:
        return [name for name, entry in self.files.items() if role in entry.roles]


class Bundle:
    """A verified bundle directory: its manifest, where its files are, and the manifest hash."""

    def __init__(self, root: Path, manifest: Manifest, manifest_sha256: str, role: Role) -> None:
        self.root = root
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.role = role

    def path(self, name: str) -> Path:
        return self.root / name


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def parse_manifest(raw: bytes, where: str = "manifest") -> Manifest:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where} is not valid JSON ({e}); re-run the export") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ManifestError(
            f"{where} has schema_version {version!r}, this code reads {list(READABLE_SCHEMA_VERSIONS)}; re-run the "
            "export with this version of the project"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'manifest'}: {err['msg']}" for err in e.errors())
        raise ManifestError(f"{where} does not match the manifest schema ({problems}); re-run the export") from None


def load_bundle(root: str | Path, role: Role, verify: bool = True) -> Bundle:
    """Read ``root/manifest.json`` and check that every file the role needs is there with its recorded sha256."""
    root = Path(root)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ManifestError(f"no {MANIFEST_FILE} in {root}: point this at a bundle written by `make export`")
    raw = manifest_path.read_bytes()
    manifest = parse_manifest(raw, str(manifest_path))
    if verify:
        for name in manifest.role_files(role):
            _verify_file(root, name, manifest.files[name])
    return Bundle(root, manifest, hashlib.sha256(raw).hexdigest(), role)


def _verify_file(root: Path, name: str, entry: FileEntry) -> None:
    path = root / name
    if not path.is_file():
        raise ManifestError(f"{path} is listed in the manifest but missing; re-run the export")
    size = path.stat().st_size
    if size != entry.bytes:
        raise ManifestError(f"{path} has {size} bytes, the manifest says {entry.bytes}; re-run the export")
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise ManifestError(
            f"{path} has sha256 {actual[:12]}…, the manifest says {entry.sha256[:12]}…; the file changed after "
            "export: re-run the export"
        )

