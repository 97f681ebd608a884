"""The FastAPI application: lifespan loading, the SIGTERM drain, error mapping, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api import Service, ServiceDep, router
from services.engine import Engine
from services.guards import Guard
from services.metrics import Metrics
from services.settings import ServerSettings
from splitcore import errors
from splitcore.errors import ManifestError
from splitcore.graphs import TailRunner
from splitcore.manifest import Bundle, load_bundle
from splitcore.tail_drafts import TailDrafter

log = logging.getLogger(__name__)

STATUS = {
    errors.WireError: 422,
    errors.ShapeError: 422,
    errors.LengthExceeded: 422,
    errors.InvalidRequest: 422,
    errors.SessionNotFound: 404,
    errors.PositionMismatch: 409,
    errors.ManifestMismatch: 409,
    errors.PayloadTooLarge: 413,
    errors.RequestTimeout: 408,
    errors.Unauthorized: 401,
    errors.RetryLater: 503,
}


# What FastAPI says when json.loads raises something other than a decode error (RecursionError, bad UTF-8).
UNREADABLE_BODY = "There was an error parsing the body"


def load_service(settings: ServerSettings, bundle: Bundle | None = None,
                 clock: Callable[[], float] = time.monotonic) -> Service:
    """Load and check the tail graph of a bundle (verifying the bundle first unless the caller did) and size the
    KV pool; every problem is a SplitError with one line to say. ``clock``: for session idleness (tests)."""
    bundle = bundle or load_bundle(settings.bundle, "server")
    check_manifest_facts(bundle)
    tail = TailRunner(bundle, settings.providers or None, settings.intra_op_threads, cuda_graphs=settings.cuda_graphs)
    manifest = bundle.manifest
    slot_length = min(settings.slot_length, manifest.model.max_position_embeddings)
    per_slot = manifest.kv_bytes_per_token(manifest.tail) * (slot_length + 1)
    slots = min(settings.max_sessions, settings.max_kv_bytes // per_slot)
    if slots < 1:
        raise errors.SplitError(
            f"one KV slot of {slot_length} positions needs {per_slot} bytes, more than max_kv_bytes "
            f"({settings.max_kv_bytes}); raise SPLIT_SERVER_MAX_KV_BYTES or lower SPLIT_SERVER_SLOT_LENGTH"
        )
    if slots < settings.max_sessions:
        log.warning("max_kv_bytes %d holds %d slots of %d positions, not max_sessions %d", settings.max_kv_bytes,
                    slots, slot_length, settings.max_sessions)
    metrics = Metrics()
    drafter = None
    if settings.tail_drafts and manifest.tail_drafts is not None:
        drafter = TailDrafter(bundle, settings.providers or None, settings.intra_op_threads)
    engine = Engine(tail, settings, metrics, slots, slot_length, clock, drafter)
    log.info("serving %s layers [%d, %d) from %s on %s (manifest %s): %d KV slots of %d positions, %.1f MiB each",
             manifest.model.id, *manifest.tail.layers, settings.bundle, tail.providers[0],
             bundle.manifest_sha256[:12], slots, slot_length, engine.pool.bytes_per_slot / 2**20)
    return Service(settings, bundle, tail, engine, metrics)


def check_manifest_facts(bundle: Bundle) -> None:
    """The manifest's model facts must agree with its own tail spec (the graph is checked against the spec when
    onnxruntime loads it): a hand-edited or mismatched manifest is refused at start-up, not on the first step."""
    manifest, spec = bundle.manifest, bundle.manifest.tail
    model = manifest.model
    first = spec.inputs[0]
    if first.shape[-1] != model.hidden_size:
        raise ManifestError(f"{bundle.root}: the tail's {first.name} ends in {first.shape[-1]}, the manifest's "
                            f"hidden_size is {model.hidden_size}; re-run the export")
    if first.dtype != spec.dtype:
        raise ManifestError(f"{bundle.root}: the tail's {first.name} is {first.dtype}, its graph dtype "
                            f"{spec.dtype}; re-run the export")
    kv = next((t for t in spec.inputs if t.name == spec.past[0][0]), None) if spec.past else None
    if kv is None or kv.shape[1] != model.num_key_value_heads or kv.shape[3] != model.head_dim:
        raise ManifestError(f"{bundle.root}: the tail's KV inputs do not have {model.num_key_value_heads} heads of "
                            f"{model.head_dim} as the manifest's model says; re-run the export")


def create_app(settings: ServerSettings, bundle: Bundle | None = None, preloaded: Service | None = None,
               stop: Callable[[], None] | None = None) -> FastAPI:
    """``bundle``: an already verified server bundle; ``preloaded``: an already loaded service (the entry point loads
    it before uvicorn starts, so that a bundle or GPU problem ends the process with one clear line).

    ``stop``: how to end the server (the entry point's); given, SIGTERM starts the drain: /readyz answers 503 for
    ``drain_s`` while sessions keep working, then ``stop`` ends the server gracefully.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = preloaded or load_service(settings, bundle)
        app.state.service = loaded
        loaded.engine.start()
        if stop is not None:
            install_drain(loaded, settings.drain_s, stop)
        try:
            yield
        finally:
            loaded.engine.draining = True
            await loaded.engine.stop()

    app = FastAPI(
        title="split-inference tail service",
        version="2",
        summary="Runs layers [K, N) of a split Llama model on hidden states; text never reaches this server.",
        lifespan=lifespan,
        redirect_slashes=False,  # a path with a trailing slash is a 404 in JSON, not an empty redirect
    )
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(Guard, settings=settings)

    @app.get("/healthz", tags=["operations"])
    async def healthz(request: Request) -> JSONResponse:
        service = getattr(request.app.state, "service", None)
        failed = service.engine.failed if service is not None else None
        if failed is not None:
            return JSONResponse({"status": "failed", "detail": failed}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", tags=["operations"])
    async def readyz(service: ServiceDep) -> JSONResponse:
        engine = service.engine
        status = ("failed" if engine.failed else "draining" if engine.draining else "warming" if engine.warming
                  else "ready")
        body = {
            "status": status,
            "provider": service.tail.providers[0],
            "io_binding": True,
            "cuda_graphs": service.tail.graphs is not None,
            "model": service.bundle.manifest.model.id,
            "layers": list(service.bundle.manifest.tail.layers),
            "manifest_sha256": service.bundle.manifest_sha256,
            "output_mode": service.bundle.manifest.output_mode,
            "sessions": engine.sessions,
            "slots": engine.pool.slots,
            "slot_length": engine.pool.max_length,
            "kv_bytes_per_slot": engine.pool.bytes_per_slot,
        }
        return JSONResponse(body, status_code=200 if status == "ready" else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics(service: ServiceDep) -> Response:
        m, engine = service.metrics, service.engine
        m.sessions.set(engine.sessions)
        m.slots.set(engine.pool.slots)
        m.kv_reserved.set(engine.sessions * engine.pool.bytes_per_slot)
        m.kv_used.set(engine.table.used_positions * service.bundle.manifest.kv_bytes_per_token(
            service.bundle.manifest.tail))
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    return app


def install_drain(service: Service, drain_s: float, stop: Callable[[], None]) -> None:
    """SIGTERM (or SIGINT): report 503 on /readyz for ``drain_s`` while live sessions keep working, then ``stop``.
    A second signal stops at once."""
    loop = asyncio.get_running_loop()

    def drained() -> None:
        log.info("drained; shutting down")
        stop()

    def on_signal(sig: signal.Signals) -> None:
        if service.engine.draining or drain_s == 0:
            stop()
            return
        service.engine.draining = True
        log.info("%s: draining, /readyz reports 503 for %.0f s, then shutting down", sig.name, drain_s)
        loop.call_later(drain_s, drained)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def install_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, status: int, error: str, detail: str, headers: dict | None = None) -> JSONResponse:
        service = getattr(request.app.state, "service", None)
        if service is not None:
            service.metrics.errors.labels(str(status)).inc()
        log.info("%s %s -> %d: %s", request.method, request.url.path, status, detail,
                 extra={"status": status, "path": request.url.path})
        return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(errors.SplitError)
    async def split_error(request: Request, exc: errors.SplitError) -> JSONResponse:
        status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 400)
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, errors.RetryLater) else None
        return respond(request, status, type(exc).__name__, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return respond(request, 422, "InvalidRequest", problems[:2000])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == UNREADABLE_BODY:  # FastAPI's words for a body json.loads refused
            return respond(request, 422, "InvalidRequest", "the body is not readable JSON (invalid UTF-8, nested too "
                           "deep or a number too long); expected a JSON object, see /docs for its fields")
        return respond(request, exc.status_code, "HTTPError", str(exc.detail))
