"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the status OpenAI would use."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.remote import ServiceError, TailUnreachable
from splitcore.errors import SplitError

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ContextLengthExceeded(SplitError):
    """The prompt plus the tokens asked for do not fit in the model's positions."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param  # the request field that holds the prompt: messages (chat) or prompt


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_exception(exc: BaseException) -> APIError:
    """What a client should see for an error raised while generating."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, TailUnreachable):
        return APIError(502, f"the tail service is unreachable: {exc}", type="server_error", code="tail_unreachable")
    if isinstance(exc, ServiceError):
        return APIError(502, f"the tail service refused the request: {exc}", type="server_error", code="tail_error")
    if isinstance(exc, SplitError):
        return APIError(500, str(exc), type="server_error")
    log.error("unexpected error while generating", exc_info=exc)
    return APIError(500, "internal error; the gateway log has the details", type="server_error")


def field_path(loc: tuple) -> str:
    """``messages.0.content`` from pydantic's location, without "body" and the tags of union members."""
    return ".".join(str(p) for p in loc if p != "body" and not (isinstance(p, str) and "[" in p))


def respond(error: APIError) -> Response:
    # ASCII JSON: a message that quotes what the client sent (a lone surrogate included) always encodes.
    body = json.dumps(error.body()).encode()
    return Response(body, status_code=error.status, headers=error.headers, media_type="application/json")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return respond(exc)

    @app.exception_handler(SplitError)
    async def split_error(request: Request, exc: SplitError) -> Response:
        error = from_exception(exc)
        log.info("%s %s -> %d: %s", request.method, request.url.path, error.status, error.message)
        return respond(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0]
        if first["type"] == "json_invalid":
            return respond(invalid(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})"))
        if not field_path(first["loc"]) and first["type"] in ("model_attributes_type", "dict_type"):
            return respond(invalid("the request body must be a JSON object, sent with Content-Type: application/json"))
        # A value refused by our own check says more than "not a list" from the other members of a union.
        errors = [e for e in errors if e["type"] == "value_error"] or errors
        problems = "; ".join(f"{field_path(e['loc']) or 'body'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in errors)
        return respond(invalid(problems, param=field_path(errors[0]["loc"]) or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return respond(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        return respond(from_exception(exc))
