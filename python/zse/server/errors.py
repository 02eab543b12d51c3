"""Every error leaves the server as OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with the right status. Only real
bugs are 500s, and their detail goes to the log, never to the client."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .. import _core
from .schemas import ErrorResponse

log = logging.getLogger("zse.server")

#: The error statuses every generation route may answer, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in {
        400: "Invalid parameters, bad JSON, or a prompt over the context length",
        401: "Missing, wrong, revoked or expired API key",
        404: "Unknown model",
        413: "Request body too large",
        429: "A rate limit is reached (see Retry-After and the x-ratelimit-* headers)",
        503: "The engine's queue is full (see Retry-After) or the server is stopping",
    }.items()
}

#: How long a client told "overloaded" should wait before retrying, in seconds.
RETRY_AFTER_S = 1


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> str:
        """The error as one server-sent event, for failures after a stream began."""
        return f"data: {json.dumps(self.body())}\n\n"


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        type="authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def overloaded(message: str) -> APIError:
    return APIError(
        503,
        message,
        type="server_error",
        code="overloaded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def shutting_down() -> APIError:
    return APIError(
        503, "the server is shutting down", type="server_error", code="server_shutting_down"
    )


def internal() -> APIError:
    message = "internal server error (the detail is in the server's log)"
    return APIError(500, message, type="server_error")


_PARAM_IN_MESSAGE = re.compile(r"invalid value for '([^']+)'")


def from_engine(e: Exception, prompt_param: str) -> APIError:
    """Maps an exception raised by `zse.Engine` when a request is submitted;
    ``prompt_param`` names the prompt's field (``messages`` or ``prompt``)."""
    if isinstance(e, _core.ContextLengthExceededError):
        return invalid(str(e), param=prompt_param, code="context_length_exceeded")
    if isinstance(e, _core.EngineOverloadedError):
        return overloaded(str(e))
    if isinstance(e, _core.EngineStoppedError):
        return shutting_down()
    if isinstance(e, ValueError):  # a bad argument or a template that failed to render
        m = _PARAM_IN_MESSAGE.search(str(e))
        return invalid(str(e), param=m.group(1) if m else None)
    log.exception("engine failed on submission", exc_info=e)
    return internal()


def _param(loc: Sequence[str | int]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``messages[0].content``."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part.startswith(("function-", "json-")):
            continue  # pydantic's name for a union member, not a field
        else:
            out += f".{part}" if out else part
    return out or None


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return invalid("the request body is not valid JSON").response()
    param = _param(first.get("loc", ()))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:
        return invalid(f"invalid request body: {msg}").response()
    if first.get("type") == "missing":
        err = invalid(f"'{param}' is required", param=param, code="missing_required_field")
        return err.response()
    return invalid(f"invalid value for '{param}': {msg}", param=param).response()


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err = APIError(404, f"no route for {request.method} {request.url.path}", code="not_found")
    elif exc.status_code == 405:
        err = APIError(405, f"{request.method} is not allowed on {request.url.path}")
    else:
        err = APIError(exc.status_code, str(exc.detail))
    return err.response()


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return internal().response()


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _unexpected)
