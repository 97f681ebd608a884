"""Service settings: environment variables with the SPLIT_SERVER_ prefix. Model facts come from the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    io_binding: Literal["auto", "on", "off"] = Field(
        "auto", description="keep KV caches on the device between steps; auto: on when the tail runs on CUDA",
    )
    intra_op_threads: int = Field(0, ge=0, description="0 lets onnxruntime choose")
    max_sessions: int = Field(64, ge=1)
    max_kv_bytes: int = Field(4 * 2**30, ge=1, description="KV cache bytes reserved by all sessions together")
    default_max_length: int = Field(2048, ge=1, description="positions reserved when a client does not say")
    session_ttl_s: float = Field(600.0, gt=0, description="idle sessions are closed after this long")
    evict_idle_s: float = Field(60.0, ge=0, description="when full, sessions idle this long make room for new ones")
    max_batch: int = Field(32, ge=1, description="most decode steps of different sessions in one run (1: no batching)")
    prefill_chunk: int = Field(
        16, ge=1, description="while sessions are decoding, prompts run in chunks of this many positions between "
        "their batches, so a decode step waits for at most one chunk",
    )
    batch_gather_ms: float = Field(
        30.0, ge=0, description="a decode batch waits up to this long for as many steps as the previous batch had",
    )
    max_body_bytes: int = Field(64 * 2**20, ge=1024)
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
    def _not_placeholder(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and PLACEHOLDER_MARK in token.get_secret_value():
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
