"""Client settings: environment variables with the SPLIT_CLIENT_ prefix; command-line flags override them."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPLIT_CLIENT_", extra="forbid")

    bundle: Path = Field(Path("bundles/smollm2-k4"), description="export output dir, or its client/ bundle")
    server_url: str = "http://127.0.0.1:8000"
    token: str | None = Field(None, description="bearer token of the tail service")
    ca_cert: Path | None = Field(None, description="CA certificate to trust for https server URLs")
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = None
    system_prompt: str | None = None
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(4, ge=0, description="reconnect attempts before giving up")
    max_length: int | None = Field(None, ge=1, description="positions to reserve on the server (None: its default)")
    prefill_chunk: int = Field(512, ge=1)
    intra_op_threads: int = Field(0, ge=0, description="0 lets onnxruntime choose")
    noise_sigma: float = Field(
        0.0, ge=0, description="Gaussian noise added to the hidden states sent, as a multiple of each position's RMS"
    )
