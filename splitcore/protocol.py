"""The HTTP protocol between client and tail service: paths, headers and the JSON bodies around tensor frames."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SESSIONS_PATH = "/v1/sessions"
MANIFEST_HEADER = "X-Manifest-Sha256"
PAST_LENGTH_HEADER = "X-Past-Length"
SAMPLE_HEADER = "X-Sample"
RETURN_HEADER = "X-Return"
# Speculative decoding. X-Keep-Length: L rolls the session back to its first L positions before the step is applied
# (allowed from the length before the session's latest step up to its current length; anything else is 409, so a
# stale or replayed step is still refused); X-Past-Length must then equal L. X-Sample-Count: n samples each of the
# step's last n positions (repetition penalty applied in order), answered in ``tokens`` / ``logprobs``.
KEEP_LENGTH_HEADER = "X-Keep-Length"
SAMPLE_COUNT_HEADER = "X-Sample-Count"
# X-Guess: 1 asks for the look-ahead's guess after each sampled token (``guesses``), where the bundle has one. Per
# step, so a client asks only while a guess can pay for the position it costs (splitcore/drafting.py).
GUESS_HEADER = "X-Guess"
# X-Draft: n asks the tail to draft up to n tokens after the step's last kept token (``drafts``, following
# ``tokens[drafts_after]``; splitcore/tail_drafts.py), where the bundle lets it. The tail can tell which token that is
# when the step samples one position, or when X-Drafted: j says that the step's positions after the first hold the
# first j of its latest answer's drafts (then X-Sample-Count must be j + 1).
DRAFT_HEADER = "X-Draft"
MAX_DRAFTS = 16  # the most drafts one step may ask for
DRAFTED_HEADER = "X-Drafted"
# Every step's answer says how long the tail's run took, as the W3C Server-Timing header (``tail;dur=<ms>``, and
# ``draft;dur=<ms>`` for the drafting in it): the client learns what a drafted position costs from it without the
# link's jitter (splitcore/drafting.py StepCosts).
SERVER_TIMING_HEADER = "Server-Timing"
# A random key per conversation, sent on every request including the open: a load balancer that hashes on it
# (k8s/optional/ingress-nginx.yaml) sends a conversation's steps to the replica that holds its KV cache. The
# session id cannot serve: it does not exist yet when the session is opened.
AFFINITY_HEADER = "X-Split-Affinity"


def steps_path(session_id: str) -> str:
    return f"{SESSIONS_PATH}/{session_id}/steps"


# Bounds that keep every number a client may send inside what the service computes with (int64, finite floats).
MAX_INT = 2**63 - 1
MAX_GENERATED = 2**20


class _Body(BaseModel):
    # JSON Infinity / NaN (which Python's json module accepts) are refused like any other invalid number.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Request(_Body):
    # What the service reads is read strictly: true is not 1 and 8.0 is not 8. (The client reads the service's
    # answers strictly too: client.remote.parse.)
    model_config = ConfigDict(strict=True)


class Sampling(_Request):
    temperature: float = Field(0.0, ge=0, le=1e6, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=MAX_INT, description="0 keeps every token")
    repetition_penalty: float = Field(1.0, gt=0, le=1e6, description="applies to tokens this session generated")
    seed: int | None = Field(None, ge=0, le=MAX_INT)


class OpenSession(_Request):
    manifest_sha256: str = Field(max_length=128,
                                 description="sha256 of the manifest.json the client's head was exported with")
    max_length: int | None = Field(None, ge=1, le=MAX_INT, description="most positions this session will hold")
    min_length: int | None = Field(
        None, ge=1, le=MAX_INT, description="fewest positions the client can work with: the server grants "
        "max_length or, when its KV slots are shorter, as many as a slot holds if that is at least min_length "
        "(absent: max_length itself is required)")
    sampling: Sampling = Sampling()
    top_logprobs: int = Field(0, ge=0, le=20)
    generated: list[int] = Field(default_factory=list, max_length=MAX_GENERATED,
                                 description="tokens generated before a replay (ids of the vocabulary)")


class SessionOpened(_Body):
    session_id: str
    max_length: int
    idle_ttl_s: float
    provider: str


class StepResult(_Body):
    token: int | None = Field(description="the sampled next token; null when the step asked for no sample")
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = Field(
        default_factory=list, description="the best tokens of the last position (fewer where top-k/top-p cut)")
    length: int = Field(description="positions this session holds after the step")
    tokens: list[int] = Field(default_factory=list, description="one sample per position of X-Sample-Count, in order; "
                              "the last is ``token``")
    logprobs: list[float] = Field(default_factory=list, description="their log-probabilities")
    guesses: list[tuple[int, float]] = Field(
        default_factory=list, description="for each token of ``tokens`` (when the step asked for guesses): the "
        "tail's guess at the token after it and the chance that guess is right")
    drafts: list[int] = Field(default_factory=list, description="the tail's drafts (when the step asked for them)")
    drafts_after: int = Field(0, description="the index in ``tokens`` of the token the drafts follow")


ReturnKind = Literal["token", "logits"]
