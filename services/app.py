"""The FastAPI application: lifespan loading, error mapping, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api import Service, ServiceDep, router
from services.metrics import Metrics
from services.scheduler import TailScheduler
from services.sessions import SessionStore
from services.settings import ServerSettings
from splitcore import errors
from splitcore.device_runner import DeviceTailRunner
from splitcore.graphs import TailRunner
from splitcore.manifest import Bundle, load_bundle
from splitcore.providers import choose_providers

log = logging.getLogger(__name__)

STATUS = {
    errors.WireError: 422,
    errors.ShapeError: 422,
    errors.LengthExceeded: 422,
    errors.SessionNotFound: 404,
    errors.PositionMismatch: 409,
    errors.ManifestMismatch: 409,
    errors.PayloadTooLarge: 413,
    errors.Unauthorized: 401,
    errors.CapacityExceeded: 503,
}
SWEEP_INTERVAL_S = 10.0


def load_service(settings: ServerSettings, bundle: Bundle | None = None) -> Service:
    """Load the tail graph of a bundle, verifying the bundle first unless the caller already did."""
    bundle = bundle or load_bundle(settings.bundle, "server")
    tail = load_tail(settings, bundle)
    log.info("serving %s layers [%d, %d) from %s on %s (manifest %s)", bundle.manifest.model.id,
             *bundle.manifest.tail.layers, settings.bundle, tail.providers[0], bundle.manifest_sha256[:12])
    metrics = Metrics()
    # Batching pads numpy caches on the host; device-bound caches (IO binding) run one session per step for now.
    max_batch = 1 if isinstance(tail, DeviceTailRunner) else settings.max_batch
    scheduler = TailScheduler(tail, max_batch, settings.prefill_chunk, settings.batch_gather_ms / 1000,
                              metrics.batch_size.observe)
    store = SessionStore(tail, settings.max_sessions, settings.max_kv_bytes, settings.session_ttl_s,
                         settings.evict_idle_s, on_close=scheduler.forget)
    return Service(settings, bundle, tail, store, scheduler, metrics)


def load_tail(settings: ServerSettings, bundle: Bundle) -> TailRunner:
    """The tail runner: with IO binding (KV caches stay on the device) when asked, or by default on CUDA."""
    requested = settings.providers or None
    binding = settings.io_binding == "on"
    if settings.io_binding == "auto":
        binding = choose_providers(requested)[0] == "CUDAExecutionProvider"
    runner = DeviceTailRunner if binding else TailRunner
    return runner(bundle, requested, settings.intra_op_threads)


def create_app(settings: ServerSettings, bundle: Bundle | None = None, preloaded: Service | None = None) -> FastAPI:
    """``bundle``: an already verified server bundle; ``preloaded``: an already loaded service (the entry point loads
    it before uvicorn starts, so that a bundle or GPU problem ends the process with one clear line)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = preloaded or load_service(settings, bundle)
        app.state.service = loaded
        tasks = [asyncio.create_task(sweep(loaded)), asyncio.create_task(loaded.scheduler.run())]
        try:
            yield
        finally:
            loaded.draining = True
            for task in tasks:
                task.cancel()

    app = FastAPI(
        title="split-inference tail service",
        version="1",
        summary="Runs layers [K, N) of a split Llama model on hidden states; text never reaches this server.",
        lifespan=lifespan,
    )
    app.include_router(router)
    install_error_handlers(app)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    def readyz(service: ServiceDep) -> JSONResponse:
        body = {
            "status": "draining" if service.draining else "ready",
            "provider": service.tail.providers[0],
            "io_binding": isinstance(service.tail, DeviceTailRunner),
            "model": service.bundle.manifest.model.id,
            "layers": list(service.bundle.manifest.tail.layers),
            "manifest_sha256": service.bundle.manifest_sha256,
            "output_mode": service.bundle.manifest.output_mode,
            "sessions": len(service.store.sessions),
        }
        return JSONResponse(body, status_code=503 if service.draining else 200)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    def metrics(service: ServiceDep) -> Response:
        m = service.metrics
        m.sessions.set(len(service.store.sessions))
        m.kv_reserved.set(service.store.reserved_bytes)
        m.kv_used.set(service.store.used_bytes)
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    return app


async def sweep(service: Service) -> None:
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        service.store.sweep()


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
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, errors.CapacityExceeded) else None
        if isinstance(exc, errors.Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        return respond(request, status, type(exc).__name__, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return respond(request, 422, "InvalidRequest", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return respond(request, exc.status_code, "HTTPError", str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return respond(request, 500, "InternalError", "internal error; the server log has the details")
