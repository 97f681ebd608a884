"""The session API: open a session, send hidden states step by step, get the next token (or logits) back."""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Header, Request, Response

from services.metrics import Metrics
from services.scheduler import TailScheduler
from services.sessions import Session, SessionStore
from services.settings import ServerSettings
from splitcore import protocol, wire
from splitcore.errors import (
    CapacityExceeded,
    LengthExceeded,
    ManifestMismatch,
    PayloadTooLarge,
    PositionMismatch,
    Unauthorized,
    WireError,
)
from splitcore.graphs import TailRunner
from splitcore.manifest import Bundle
from splitcore.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Service:
    """Everything the lifespan loads once; handlers get it by dependency injection."""

    settings: ServerSettings
    bundle: Bundle
    tail: TailRunner
    store: SessionStore
    scheduler: TailScheduler
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_token(service: ServiceDep, authorization: Annotated[str | None, Header()] = None) -> None:
    expected = service.settings.token
    if expected is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("this server needs 'Authorization: Bearer <token>' with the configured token")


router = APIRouter(prefix=protocol.SESSIONS_PATH, tags=["sessions"], dependencies=[Depends(require_token)])


def check_manifest(service: Service, sha256: str | None) -> None:
    if sha256 != service.bundle.manifest_sha256:
        raise ManifestMismatch(
            f"client head was exported for manifest {str(sha256)[:12]}…, this server runs "
            f"{service.bundle.manifest_sha256[:12]}…; use the client bundle from the same export as the server's"
        )


@router.post("", status_code=201, response_model=protocol.SessionOpened)
def open_session(body: protocol.OpenSession, service: ServiceDep) -> protocol.SessionOpened:
    check_manifest(service, body.manifest_sha256)
    if service.draining:
        raise CapacityExceeded("server is shutting down; open the session on another replica", retry_after_s=1)
    params = SamplingParams(**body.sampling.model_dump())
    try:
        max_length = body.max_length or min(service.settings.default_max_length, service.store.max_positions)
        session = service.store.open(max_length, Sampler(params), body.top_logprobs, body.generated)
    except CapacityExceeded:
        service.metrics.rejected.inc()
        raise
    log.info("session %s opened (max_length %d)", session.id, session.max_length, extra={"session": session.id})
    return protocol.SessionOpened(
        session_id=session.id, max_length=session.max_length, idle_ttl_s=service.settings.session_ttl_s,
        provider=service.tail.providers[0],
    )


@router.delete("/{session_id}", status_code=204)
def close_session(session_id: str, service: ServiceDep) -> Response:
    service.store.close(session_id)
    return Response(status_code=204)


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
    responses={200: {"content": {wire.MEDIA_TYPE: {}}, "description": "JSON step result, or a logits frame"}},
)
async def step(
    session_id: str,
    request: Request,
    service: ServiceDep,
    x_past_length: Annotated[int, Header(ge=0, description="positions the client believes are cached")],
    x_manifest_sha256: Annotated[str | None, Header()] = None,
    x_sample: Annotated[int, Header(ge=0, le=1)] = 1,
    x_return: Annotated[protocol.ReturnKind, Header()] = "token",
):
    check_manifest(service, x_manifest_sha256)
    session = service.store.get(session_id)
    hidden = validate_hidden(wire.decode(await read_body(request, service.settings.max_body_bytes)), service)
    async with session.lock:
        started = time.perf_counter()
        check_positions(session, x_past_length, hidden.shape[1])
        output = await service.scheduler.step(session.cache, hidden)
        result = protocol.StepResult(token=None, length=session.length)
        # Private-output bundles end before the final norm: no logits, no token here; the client samples.
        private = service.bundle.manifest.output_mode == "hidden"
        if x_return == "token" and x_sample and not private:
            choice = session.sampler.choose(output, session.generated, session.top_logprobs)
            session.generated.append(choice.token)
            result = protocol.StepResult(token=choice.token, logprob=choice.logprob, top_logprobs=choice.top,
                                         length=session.length)
            service.metrics.tokens.inc()
        elapsed = time.perf_counter() - started
    service.metrics.steps.observe(elapsed)
    service.metrics.positions.inc(hidden.shape[1])
    log.debug("step %s +%d -> %d in %.1f ms", session_id, hidden.shape[1], session.length, elapsed * 1000,
              extra={"session": session_id, "positions": hidden.shape[1], "ms": round(elapsed * 1000, 2)})
    if (private and x_sample) or x_return == "logits":
        frame = output[None, None, :] if private else output.astype(np.float32)
        return Response(wire.encode(frame), media_type=wire.MEDIA_TYPE,
                        headers={protocol.PAST_LENGTH_HEADER: str(session.length)})
    return result


def check_positions(session: Session, past: int, seq: int) -> None:
    if past != session.length:
        raise PositionMismatch(
            f"session holds {session.length} positions but the step continues from {past}; "
            f"send the hidden states of positions {session.length} onwards"
        )
    if past + seq > session.max_length:
        raise LengthExceeded(f"maximum length exceeded: prefix {past} + current {seq} > {session.max_length}")


def validate_hidden(hidden: np.ndarray, service: Service) -> np.ndarray:
    size = service.bundle.manifest.model.hidden_size
    if hidden.dtype not in (np.float16, np.float32):
        raise WireError(f"hidden states must be float16 or float32, got {hidden.dtype}")
    if hidden.ndim != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1 or hidden.shape[2] != size:
        raise WireError(f"hidden states must have shape [1, seq >= 1, {size}], got {list(hidden.shape)}")
    if not np.isfinite(hidden).all():
        raise WireError("hidden states contain NaN or infinity")
    return hidden


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
