"""The HTTP protocol between client and tail service: paths, headers and the JSON bodies around tensor frames."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SESSIONS_PATH = "/v1/sessions"
MANIFEST_HEADER = "X-Manifest-Sha256"
PAST_LENGTH_HEADER = "X-Past-Length"
SAMPLE_HEADER = "X-Sample"
RETURN_HEADER = "X-Return"
# A random key per conversation, sent on every request including the open: a load balancer that hashes on it
# (k8s/optional/ingress-nginx.yaml) sends a conversation's steps to the replica that holds its KV cache. The
# session id cannot serve: it does not exist yet when the session is opened.
AFFINITY_HEADER = "X-Split-Affinity"


def steps_path(session_id: str) -> str:
    return f"{SESSIONS_PATH}/{session_id}/steps"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(_Body):
    temperature: float = Field(0.0, ge=0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 keeps every token")
    repetition_penalty: float = Field(1.0, gt=0, description="applies to tokens this session generated")
    seed: int | None = None


class OpenSession(_Body):
    manifest_sha256: str = Field(description="sha256 of the manifest.json the client's head was exported with")
    max_length: int | None = Field(None, ge=1, description="most positions this session will hold (reserved)")
    sampling: Sampling = Sampling()
    top_logprobs: int = Field(0, ge=0, le=20)
    generated: list[int] = Field(default_factory=list, description="tokens generated before a replay")


class SessionOpened(_Body):
    session_id: str
    max_length: int
    idle_ttl_s: float
    provider: str


class StepResult(_Body):
    token: int | None = Field(description="the sampled next token; null when the step asked for no sample")
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = Field(default_factory=list)
    length: int = Field(description="positions this session holds after the step")


class ErrorBody(_Body):
    error: str
    detail: str
    expected: str | None = None


ReturnKind = Literal["token", "logits"]
