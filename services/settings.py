"""Service settings: environment variables with the SPLIT_SERVER_ prefix. Model facts come from the manifest."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from splitcore.protocol import MAX_DRAFTS
from splitcore.sampling import HISTORY_LIMIT

# The mark in every placeholder secret we ship (k8s/10-secret.yaml): a service holding one refuses to start.
PLACEHOLDER_MARK = "REPLACE-ME"


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPLIT_SERVER_", extra="forbid")

    bundle: Path = Field(Path("bundles/smollm2-k4/server"), description="server bundle directory (manifest + tail)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    providers: list[str] = Field(
        default_factory=list,
        description="onnxruntime providers, all required, e.g. [\"CUDAExecutionProvider\"]; empty: best available",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="threads per graph; 0: one per physical core this process may use, within a CPU quota",
    )
    cuda_graphs: bool = Field(
        True, description="on CUDA, replay decode steps as captured CUDA graphs (one per batch-size bucket); off: "
        "every step launches its kernels one by one",
    )

    tail_drafts: bool = Field(
        True, description="draft the tokens after each sampled one with the head graph the server bundle carries "
        "(splitcore/tail_drafts.py), for clients that ask; off: the head is not loaded and no step gets drafts",
    )
    max_drafts: int = Field(
        8, ge=1, le=MAX_DRAFTS, description="the most drafts one step gets, a decode run each (X-Draft above it is "
        "clamped): bounds what one client's step can cost the batch it runs in",
    )
    # KV memory: ``max_sessions`` slots of ``slot_length`` positions, reserved at start-up (see splitcore/kvpool.py).
    max_sessions: int = Field(64, ge=1, description="KV slots, i.e. sessions open at once")
    slot_length: int = Field(
        2048, ge=1, description="positions one slot holds: the longest session (clipped to the model's positions)",
    )
    max_kv_bytes: int = Field(
        4 * 2**30, ge=1, description="KV bytes all slots may take together: fewer slots than max_sessions when "
        "max_sessions x the manifest's bytes per slot would exceed it",
    )
    default_max_length: int | None = Field(
        None, ge=1, description="positions a session may hold when its client does not say (None: slot_length)",
    )
    session_ttl_s: float = Field(600.0, gt=0, description="idle sessions are closed after this long")
    evict_idle_s: float = Field(60.0, ge=0, description="when full, sessions idle this long make room for new ones")

    # Scheduling (services/scheduler.py).
    max_batch: int = Field(64, ge=1, description="most decode steps of different sessions in one run (1: no batching)")
    prefill_chunk: int = Field(
        32, ge=1, description="while other sessions decode, prompt positions per scheduler step (the token budget "
        "beyond the decode rows), so a decode step waits for at most this many prompt positions, except when a "
        "burst of prompts arrives (see max_prompt_share)",
    )
    max_prompt_share: int = Field(
        16, ge=1, description="a burst of new sessions' prompts gets prefill_chunk positions per newcomer per "
        "generating session, up to this many times prefill_chunk per step: newcomers join the decode batch "
        "together, decoding sessions wait that one step (1: never more than prefill_chunk per step)",
    )
    batch_gather_ms: float = Field(
        20.0, ge=0, description="a decode batch waits up to this long for the sessions of the previous batch",
    )
    sampling_history: int = Field(
        HISTORY_LIMIT, ge=0,
        description="generated tokens of a session the repetition penalty looks at (the latest ones)",
    )

    # Limits on what clients send (each is a 4xx, never a 500).
    max_body_bytes: int = Field(64 * 2**20, ge=1024, description="body of a step (a hidden-state frame)")
    max_open_bytes: int = Field(1 * 2**20, ge=1024, description="body of POST /v1/sessions (JSON)")
    max_generated: int = Field(32768, ge=0, description="most ids in an open request's `generated` list")
    # Connections: idle and slow clients are dropped so they cannot hold file descriptors forever.
    keep_alive_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this long")
    head_timeout_s: float = Field(10.0, gt=0, description="a request's headers must arrive within this long")
    body_timeout_s: float = Field(30.0, gt=0, description="a request's body must arrive within this long")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="request line + headers (h11 limit)")
    max_connections: int = Field(
        1024, ge=1, description="connections + requests in flight; beyond it new requests get 503 (uvicorn)",
    )

    token: SecretStr | None = Field(None, description="bearer token; when set, every /v1 request needs it")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    drain_s: float = Field(5.0, ge=0, description="after SIGTERM: /readyz says 503 this long before stopping")
    graceful_shutdown_s: float = Field(20.0, ge=0, description="then in-flight requests get this long to finish")
    log_format: str = Field("text", pattern="^(text|json)$")
    log_level: str = "INFO"
    access_log: bool = Field(False, description="one log line per request, i.e. per decoded token of every session")

    @field_validator("token")
    @classmethod
    def _real_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is None:
            return None
        if not token.get_secret_value().strip():
            raise ValueError("the token is set but empty; unset SPLIT_SERVER_TOKEN to run without auth, or set one")
        if PLACEHOLDER_MARK in token.get_secret_value():
            raise ValueError(
                "the token is still the placeholder from k8s/10-secret.yaml; set a real one, e.g. "
                "kubectl -n split-inference create secret generic split-tail-auth --from-literal=token=$(openssl rand "
                "-hex 32) --dry-run=client -o yaml | kubectl apply -f -"
            )
        return token

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither")
        return self
