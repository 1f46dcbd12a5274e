"""The HTTP edge of errors: domain error -> status code, in one table, and the JSON bodies.

Every error answer is ``{"detail": "sentence"}``, except validation errors, which are
``{"detail": [{"loc", "msg", "type"}]}`` (FastAPI's shape, produced by ``validation_detail``
for the FastAPI routes, the ASGI edge (api/edge.py) and the WebSocket alike).
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.responses import FastJSONResponse
from service.errors import (
    Busy,
    Conflict,
    InvalidInput,
    NotFound,
    ServiceError,
    TimedOut,
    Unavailable,
    Unreadable,
)

log = logging.getLogger(__name__)

STATUS: dict[type[ServiceError], int] = {
    NotFound: 404,
    InvalidInput: 422,
    Unreadable: 400,
    Conflict: 409,
    Busy: 429,
    Unavailable: 503,
    TimedOut: 504,
}


class HTTPAuthError(ServiceError):
    """401 (no credentials) or 403 (wrong key): the only errors born at the HTTP edge."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


def status_of(exc: ServiceError) -> int:
    if isinstance(exc, HTTPAuthError):
        return exc.status
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


def error_headers(exc: ServiceError) -> dict[str, str]:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if isinstance(exc, HTTPAuthError) and exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return headers


# the one 500 answer, of the FastAPI routes and the edge alike (the cause is logged, not sent)
INTERNAL_ERROR: tuple[int, dict, dict[str, str] | None] = (500, {"detail": "internal error"}, None)


def error_answer(exc: ServiceError) -> tuple[int, dict, dict[str, str]]:
    """``(status, body, headers)`` of a domain error."""
    return status_of(exc), {"detail": exc.detail}, error_headers(exc)


def validation_detail(errors: list[dict], prefix: tuple = ()) -> list[dict]:
    """pydantic/FastAPI errors as ``[{"loc", "msg", "type"}]`` (the one formatter)."""
    return [
        {"loc": [*prefix, *e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in errors
    ]


def invalid_body(exc: ValidationError) -> dict:
    """The 422 body of a request body that failed its schema (``loc`` starts at ``body``)."""
    return {"detail": validation_detail(exc.errors(include_url=False), ("body",))}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> FastJSONResponse:
        status, body, headers = error_answer(exc)
        return FastJSONResponse(body, status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> FastJSONResponse:
        return FastJSONResponse({"detail": validation_detail(exc.errors())}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> FastJSONResponse:
        return FastJSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> FastJSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        status, body, _ = INTERNAL_ERROR
        return FastJSONResponse(body, status)
