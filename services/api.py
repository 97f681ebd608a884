"""The session API: open a session, send hidden states step by step, get the next token (or logits) back.

Handlers only parse and check what arrived, hand it to the engine and format its answer; the engine owns every
session (services/engine.py). Bodies were bounded and read, and the token checked, before any of this runs
(services/guards.py).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BeforeValidator, Field

from services.engine import Engine, OpenRequest, StepRequest
from services.metrics import Metrics
from services.settings import ServerSettings
from splitcore import protocol, wire
from splitcore.errors import InvalidRequest, ManifestMismatch, ServiceUnavailable, WireError
from splitcore.graphs import TailRunner
from splitcore.manifest import Bundle
from splitcore.sampling import SamplingParams

FP16_MAX = float(np.finfo(np.float16).max)
MAX_SAMPLE_COUNT = 256


@dataclass
class Service:
    """Everything the lifespan loads once; handlers get it by dependency injection."""

    settings: ServerSettings
    bundle: Bundle
    tail: TailRunner
    engine: Engine
    metrics: Metrics


async def get_service(request: Request) -> Service:  # async: a plain def would run on the threadpool
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise ServiceUnavailable("the service is still loading")
    return service


ServiceDep = Annotated[Service, Depends(get_service)]
router = APIRouter(prefix=protocol.SESSIONS_PATH, tags=["sessions"])


def check_manifest(service: Service, sha256: str | None) -> None:
    if sha256 is None:
        raise ManifestMismatch(f"this request carries no {protocol.MANIFEST_HEADER} header: send the sha256 of the "
                               f"client bundle's manifest (this server runs {service.bundle.manifest_sha256[:12]}…)")
    if sha256 != service.bundle.manifest_sha256:
        raise ManifestMismatch(
            f"client head was exported for manifest {str(sha256)[:12]}…, this server runs "
            f"{service.bundle.manifest_sha256[:12]}…; use the client bundle from the same export as the server's"
        )


@router.post("", status_code=201, response_model=protocol.SessionOpened)
async def open_session(body: protocol.OpenSession, service: ServiceDep) -> protocol.SessionOpened:
    check_manifest(service, body.manifest_sha256)
    if len(body.generated) > service.settings.max_generated:
        raise InvalidRequest(f"generated holds {len(body.generated)} ids; this server takes at most "
                             f"{service.settings.max_generated} (the repetition penalty looks at the latest "
                             f"{service.settings.sampling_history})")
    try:
        params = SamplingParams(**body.sampling.model_dump())
    except ValueError as e:
        raise InvalidRequest(f"sampling: {e}") from None
    session = await service.engine.open(OpenRequest(body.max_length, params, body.top_logprobs, body.generated,
                                                   body.min_length))
    return protocol.SessionOpened(session_id=session.id, max_length=session.max_length,
                                  idle_ttl_s=service.settings.session_ttl_s, provider=service.tail.providers[0])


@router.delete("/{session_id}", status_code=204)
async def close_session(session_id: str, service: ServiceDep) -> Response:
    await service.engine.close(session_id)
    return Response(status_code=204)


def _decimal(value: object) -> object:
    """A number header as plain ASCII digits ("0.0", "1_0", "+3" or "²" are not lengths); int() alone takes all four
    but the last, and pydantic's lax int the first two."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("expected a non-negative integer in decimal digits")
    return value


def _count(low: int, high: int):  # noqa: ANN202 - an Annotated type
    """An integer header in [low, high], read strictly (the bounds first, so the OpenAPI schema states them)."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_decimal)]


Length = _count(0, protocol.MAX_INT)


@router.post(
    "/{session_id}/steps",
    response_model=protocol.StepResult,
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "hidden states [1, seq, hidden] as a tensor frame (see splitcore/wire.py), fp16 or fp32",
            "content": {wire.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    responses={200: {"content": {wire.MEDIA_TYPE: {}},
                     "description": "JSON step result, or a frame of logits / final hidden states"}},
)
async def step(
    session_id: str,
    request: Request,
    service: ServiceDep,
    x_past_length: Annotated[Length, Header(description="positions the client believes are cached")],
    x_manifest_sha256: Annotated[str | None, Header()] = None,
    x_sample: Annotated[_count(0, 1), Header()] = 1,
    x_return: Annotated[protocol.ReturnKind, Header()] = "token",
    x_keep_length: Annotated[Length | None, Header(description="roll back to this many positions first")] = None,
    x_sample_count: Annotated[_count(1, MAX_SAMPLE_COUNT), Header(description="sample each of the last n positions")
                              ] = 1,
    x_guess: Annotated[_count(0, 1), Header(description="1: the look-ahead's guess after each sampled token")] = 0,
    x_draft: Annotated[_count(0, protocol.MAX_DRAFTS), Header(
        description="tokens the tail should draft after the step")] = 0,
    x_drafted: Annotated[_count(0, protocol.MAX_DRAFTS), Header(
        description="the step's positions after the first hold this many of the tail's latest drafts")] = 0,
):
    check_manifest(service, x_manifest_sha256)
    hidden = validate_hidden(decode_frame(await request.body()), service)
    seq = hidden.shape[1]
    if x_sample_count > seq:
        raise InvalidRequest(f"{protocol.SAMPLE_COUNT_HEADER} {x_sample_count} > the step's {seq} positions")
    private = service.bundle.manifest.output_mode == "hidden"
    # Private-output bundles end before the final norm: no logits, no token here; the client samples.
    samples = x_sample_count if x_sample and x_return == "token" and not private else 0
    outcome = await service.engine.step(StepRequest(session_id, hidden, x_past_length, x_keep_length,
                                                    x_sample_count, samples, bool(x_guess), x_draft, x_drafted))
    timing = f"tail;dur={(outcome.seconds - outcome.draft_seconds) * 1000:.3f}"
    if outcome.drafts is not None:
        timing += f", draft;dur={outcome.draft_seconds * 1000:.3f}"
    headers = {protocol.PAST_LENGTH_HEADER: str(outcome.length), protocol.SERVER_TIMING_HEADER: timing}
    if x_return == "logits":
        logits = outcome.output[-1] if x_sample_count == 1 else outcome.output
        return Response(wire.encode(logits.astype(np.float32)), media_type=wire.MEDIA_TYPE, headers=headers)
    if private and x_sample:
        return Response(wire.encode(outcome.output[None].astype(np.float32)), media_type=wire.MEDIA_TYPE,
                        headers=headers)
    # The StepResult schema, written directly: validating our own answer again costs more than the step's JSON.
    if not outcome.choices:
        result = {"token": None, "logprob": None, "top_logprobs": [], "length": outcome.length, "tokens": [],
                  "logprobs": []}
    else:
        last = outcome.choices[-1]
        result = {"token": last.token, "logprob": last.logprob, "top_logprobs": last.top, "length": outcome.length,
                  "tokens": [c.token for c in outcome.choices], "logprobs": [c.logprob for c in outcome.choices]}
        if last.guess is not None:
            result["guesses"] = [c.guess for c in outcome.choices]
        if outcome.drafts is not None:
            result["drafts"], result["drafts_after"] = outcome.drafts, outcome.drafts_after
    return Response(json.dumps(result).encode(), media_type="application/json", headers=headers)


def decode_frame(body: bytes) -> np.ndarray:
    """wire.decode, after checking the declared size with Python integers (dims whose product overflows int64)."""
    if len(body) >= 8 and body[:4] == wire.MAGIC:
        code, rank = body[4], body[5]
        if code in wire.DTYPE_CODES and rank <= wire.MAX_RANK and len(body) >= 8 + 4 * rank:
            shape = struct.unpack_from(f"<{rank}I", body, 8)
            expected = math.prod(shape) * wire.DTYPE_CODES[code].itemsize
            if expected != len(body) - 8 - 4 * rank:
                raise WireError(f"frame of shape {list(shape)} {wire.DTYPE_CODES[code].name} needs {expected} data "
                                f"bytes, got {len(body) - 8 - 4 * rank}")
    return wire.decode(body)


def validate_hidden(hidden: np.ndarray, service: Service) -> np.ndarray:
    """The frame as the tail's input: float, [1, seq >= 1, hidden], finite, and within the tail dtype's range."""
    size = service.bundle.manifest.model.hidden_size
    if hidden.dtype not in (np.float16, np.float32):
        raise WireError(f"hidden states must be float16 or float32, got {hidden.dtype}")
    if hidden.ndim != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1 or hidden.shape[2] != size:
        raise WireError(f"hidden states must have shape [1, seq >= 1, {size}], got {list(hidden.shape)}")
    if not np.isfinite(hidden).all():
        raise WireError("hidden states contain NaN or infinity")
    if service.tail.dtype == np.float16 and hidden.dtype != np.float16:
        peak = float(np.abs(hidden).max())
        if peak > FP16_MAX:
            raise WireError(f"hidden states reach {peak:.3g}, beyond float16's {FP16_MAX:g}: this tail runs in "
                            "float16 and would overflow; send float16 or values within its range")
    return hidden.astype(service.tail.dtype)
