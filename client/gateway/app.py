"""The gateway's FastAPI app: OpenAI-compatible routes over an Engine loaded in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from client.gateway.engine import Engine, Finished, Job
from client.gateway.errors import APIError, from_exception, install_error_handlers, invalid
from client.gateway.formats import DONE, Reply, sse
from client.gateway.limits import BodyLimit
from client.gateway.runs import Run, collect
from client.gateway.schemas import ChatRequest, CompletionRequest, OpenAIRequest
from client.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def create_app(settings: GatewaySettings, load_engine: Callable[[], Engine]) -> FastAPI:
    """``load_engine`` runs in the lifespan (the CLI hands in one it already loaded, to fail before binding)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = load_engine()
        app.state.executor = ThreadPoolExecutor(settings.max_concurrent, thread_name_prefix="generate")
        log.info("gateway serving %s (context %d)", app.state.engine.model_id, app.state.engine.context)
        try:
            yield
        finally:
            app.state.executor.shutdown(wait=False, cancel_futures=True)
            app.state.engine.close()

    def require_key(authorization: Annotated[str | None, Header()] = None) -> None:
        if settings.api_key is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        expected = settings.api_key.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected):
            raise APIError(401, "this gateway needs 'Authorization: Bearer <key>' with its API key "
                           "(OPENAI_API_KEY on the client side)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="split-inference OpenAI-compatible gateway", version="1", lifespan=lifespan,
                  dependencies=[Depends(require_key)])
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.get("/v1/models")
    def models(engine: EngineDep) -> dict:
        return {"object": "list", "data": [model_card(engine)]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str, engine: EngineDep) -> dict:
        check_model(model_id, engine)
        return model_card(engine)

    # Rendering and encoding a prompt take time in proportion to its length: on a worker thread, so one long prompt
    # does not hold up every other request on the event loop.
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request, engine: EngineDep):
        check_request(body, engine)
        messages = [m.for_template() for m in body.messages]
        try:
            text = await run_in_threadpool(engine.tokenizer.render, messages, add_generation_prompt=True)
        except Exception as e:  # the template's own raise_exception, or a template that cannot render these
            raise invalid(f"the model's chat template rejected these messages: {e}", param="messages") from None
        job = await run_in_threadpool(engine.job, text, body.limit,
                                      engine.sampling(body.temperature, body.top_p, body.seed),
                                      body.stops(settings.max_stop), "messages")
        return await answer(request, engine, job, body, Reply(engine.model_id, chat=True))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, engine: EngineDep):
        check_request(body, engine)
        spec = engine.tokenizer.spec
        # A raw prompt starts with BOS where the model wants one, as `python -m client --raw` encodes it.
        bos = spec.bos_token if spec.add_bos_token and spec.bos_token else ""
        job = await run_in_threadpool(engine.job, bos + body.text(), body.limit,
                                      engine.sampling(body.temperature, body.top_p, body.seed),
                                      body.stops(settings.max_stop), "prompt")
        return await answer(request, engine, job, body, Reply(engine.model_id, chat=False))

    return app


def model_card(engine: Engine) -> dict:
    return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "splitllm"}


def check_model(model_id: str, engine: Engine) -> None:
    if model_id != engine.model_id:
        raise APIError(404, f"the model {model_id!r} does not exist here; this gateway serves {engine.model_id!r}",
                       param="model", code="model_not_found")


def check_request(body: OpenAIRequest, engine: Engine) -> None:
    check_model(body.model, engine)
    body.check_supported()


async def answer(request: Request, engine: Engine, job: Job, body: OpenAIRequest, reply: Reply):
    run = Run(engine, job, request.app.state.executor)
    if not body.stream:
        watch = asyncio.create_task(cancel_when_gone(request, run))
        try:
            text, finished = await collect(run)
        finally:
            watch.cancel()
        return reply.whole(text, finished.reason, finished.usage)
    events = run.events()
    try:
        first = await anext(events)  # errors before the first token still get their HTTP status
    except BaseException:
        run.cancelled.set()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(stream(reply, first, events, run, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def cancel_when_gone(request: Request, run: Run, every_s: float = 0.2) -> None:
    """Stop a non-streaming run when its client disconnects: nobody would read the answer.

    (A streaming run notices by itself: its next write fails and the response generator is closed.)
    """
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    log.info("client gone; stopping its generation")
    run.cancelled.set()


async def stream(reply: Reply, first: str | Finished, events: AsyncIterator, run: Run, include_usage: bool):
    try:
        if reply.chat:
            yield reply.chunk(first=True)
        event = first
        while True:
            if isinstance(event, Finished):
                yield reply.chunk(reason=event.reason)
                if include_usage:
                    yield reply.usage_chunk(event.usage)
                yield DONE
                return
            yield reply.chunk(event)
            event = await anext(events)
    except Exception as e:  # the status line is gone: the error travels as an event, as OpenAI's does
        yield sse(from_exception(e).body())
    finally:
        run.cancelled.set()
