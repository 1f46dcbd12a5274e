"""Typed errors that carry their HTTP status; one handler in ``main`` turns them into JSON."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 400

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers


class NotFound(ServiceError, LookupError):
    status_code = 404


class Unprocessable(ServiceError, ValueError):
    status_code = 422


class Conflict(ServiceError):
    status_code = 409


class TooManyRequests(ServiceError):
    status_code = 429

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, int(retry_after_s)))})
