"""The ASGI middlewares around every HTTP request: body limits, and request context (request
id, timeout, metrics, access log). Both classify the route with ``asgi.classify``."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time

from service.api.asgi import RouteKind, header, route_of, send_json
from service.errors import too_large
from service.observability import Metrics

log = logging.getLogger("service.access")

# Prometheus label values fed from requests must come from a fixed set: anything else would
# grow /metrics (and the process) with every new value a client makes up.
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
UNKNOWN = "unknown"


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for bodies over the limit, by Content-Length or while streaming; uploads get their own."""

    def __init__(self, app, max_body: int, max_upload: int) -> None:
        self.app, self.max_body, self.max_upload = app, max_body, max_upload

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = route_of(scope).kind is RouteKind.upload
        limit = self.max_upload if is_upload else self.max_body
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._too_large(send, limit)
            return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._too_large(send, limit)

    @staticmethod
    async def _too_large(send, limit: int) -> None:
        await send_json(send, 413, {"detail": too_large("request body", limit)})


class RequestContextMiddleware:
    """Request id (``X-Request-ID``, echoed or made up), timeout, access log line, metrics.

    The ``policy`` label is a name ``metrics.known_policy`` accepts (the registry's, set by the
    lifespan), else ``unknown``: metric labels stay bounded whatever clients send.
    """

    def __init__(self, app, metrics: Metrics, timeout_s: float | None = None) -> None:
        self.app, self.metrics, self.timeout_s = app, metrics, timeout_s
        # unique per process and cheap: a random prefix and a counter
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_id = header(scope, b"x-request-id")
        request_id = raw_id.decode("latin-1")[:128] if raw_id else f"{self._prefix}-{next(self._counter):x}"
        status = 500
        start = time.perf_counter()
        started = False

        async def send_with_id(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        kind = route_of(scope).kind
        timed = self.timeout_s is not None and kind not in (RouteKind.rollout, RouteKind.upload)
        try:
            if timed:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        await self.app(scope, receive, send_with_id)
                except TimeoutError:
                    if started:  # nothing more can be sent on this response
                        raise
                    await send_json(
                        send_with_id, 504, {"detail": f"the request took longer than {self.timeout_s:g} s"}
                    )
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, status, request_id, time.perf_counter() - start)

    def _record(self, scope, status: int, request_id: str, elapsed: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        name = (scope.get("path_params") or {}).get("name", "")
        policy = name if not name or self.metrics.known_policy(name) else UNKNOWN
        method = scope["method"] if scope["method"] in METHODS else UNKNOWN
        self.metrics.requests.labels(route, method, str(status), policy).inc()
        self.metrics.latency.labels(route, policy).observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "request",
                extra={
                    "fields": {
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                    }
                },
            )
