"""The HTTP edge: what every request goes through, in one ASGI layer.

``ServiceApp`` is the FastAPI application with one change: its ``__call__`` first does the
service's per-request work (request id, body limits, timeout, metrics, access log) here, once,
and hands the hot routes (``api/hot``: the two act routes and the session WebSocket, whose
FastAPI WebSocket wrapper and middleware senders cost ~15% of a step; ``api/oip.answer``: the
Open Inference Protocol's infer, where FastAPI's routing cost more than the call) to their one
implementation. Everything else goes on to FastAPI. Subclassing is the one place this works
around the framework; ``openapi`` adds the hot routes' declarations to the schema.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api import hot, oip
from service.api.asgi import (
    ACT_ROUTE,
    INFER_ROUTE,
    INFER_VERSION_ROUTE,
    SESSION_ACT_ROUTE,
    Route,
    RouteKind,
    classify,
    dumps,
    header,
    send_bytes,
    send_json,
    stream_session_id,
)
from service.api.auth import check_bearer, inference_key
from service.api.errors import INTERNAL_ERROR, error_answer
from service.config import Settings
from service.errors import ServiceError, too_large
from service.observability import AccessLog, Metrics

log = logging.getLogger(__name__)

# Prometheus label values fed from requests must come from a fixed set: anything else would
# grow /metrics (and the process) with every new value a client makes up.
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
UNKNOWN = "unknown"
_HOT = (RouteKind.act, RouteKind.session_act)
# rollouts have their own timeout; evaluations run one at a time (429 beyond)
_UNTIMED = (RouteKind.rollout, RouteKind.upload, RouteKind.evaluate)


class BodyTooLarge(Exception):
    pass


class _Exchange:
    """One request's response side: status and whether it started, ``x-request-id`` added."""

    __slots__ = ("send", "request_id", "status", "started")

    def __init__(self, send, request_id: bytes) -> None:
        self.send, self.request_id, self.status, self.started = send, request_id, 500, False

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
            message["headers"] = [*message.get("headers", ()), (b"x-request-id", self.request_id)]
        await self.send(message)

    async def json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        await send_json(self, status, payload, headers)


class _Deadlines:
    """Request timeouts with one loop timer for all requests.

    ``asyncio.timeout`` arms a timer per request (with uvloop a libuv timer: ~20 µs of each act
    call under load, a fifth of its cost). Here a request registers its deadline in a dict and
    one sweep, every tenth of the timeout (at most 1 s), cancels the tasks past theirs, marked so
    that the edge answers 504 rather than propagating the cancellation: a request is answered
    between ``timeout_s`` and ``1.1 * timeout_s``.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.period_s = min(1.0, timeout_s / 10)
        self._tasks: dict[asyncio.Task, float] = {}
        self.expired: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def enter(self, task: asyncio.Task) -> None:
        loop = task.get_loop()
        if self._loop is not loop:  # the first request on this loop starts the sweep
            self._loop = loop
            loop.call_later(self.period_s, self._sweep, loop)
        self._tasks[task] = loop.time() + self.timeout_s

    def leave(self, task: asyncio.Task) -> None:
        self._tasks.pop(task, None)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop or loop.is_closed():
            return  # a later loop took over (tests run several)
        now = loop.time()
        late = [t for t, deadline in self._tasks.items() if deadline <= now]
        for task in late:
            del self._tasks[task]
            self.expired.add(task)
            task.cancel()
        loop.call_later(self.period_s, self._sweep, loop)


class ServiceApp(FastAPI):
    """FastAPI behind the service's edge; ``configure_edge`` before serving."""

    def configure_edge(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.access_log = AccessLog(settings.access_log_sample)
        self._flush_scheduled = False
        self._deadlines = _Deadlines(settings.request_timeout_s)
        self._inference_key = inference_key(settings)  # None: the hot routes are open
        # unique per process and cheap: a random prefix and a counter
        self._id_prefix = os.urandom(6).hex()
        self._ids = itertools.count()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            session_id = stream_session_id(scope["path"]) if scope["type"] == "websocket" else None
            if session_id is not None:
                await self._stream(scope, receive, send, session_id)
            else:
                await super().__call__(scope, receive, send)
            return
        start = time.perf_counter()
        raw_id = header(scope, b"x-request-id")
        request_id = raw_id.decode("latin-1")[:128] if raw_id else f"{self._id_prefix}-{next(self._ids):x}"
        exchange = _Exchange(send, request_id.encode("latin-1"))
        route = classify(scope["method"], scope["path"])
        settings = self.settings
        limit = settings.max_upload_bytes if route.kind is RouteKind.upload else settings.max_body_bytes
        try:
            length = header(scope, b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise BodyTooLarge
            if route.kind in _UNTIMED:
                await self._route(scope, receive, exchange, route, limit)
            else:
                await self._timed(scope, receive, exchange, route, limit)
        except BodyTooLarge:
            if not exchange.started:
                await exchange.json(413, {"detail": too_large("request body", limit)})
        except TimeoutError:
            if exchange.started:  # nothing more can be sent on this response
                raise
            detail = f"the request took longer than {settings.request_timeout_s:g} s"
            await exchange.json(504, {"detail": detail})
        finally:
            self._record(scope, route, exchange, request_id, time.perf_counter() - start)

    async def _timed(self, scope, receive, exchange: _Exchange, route: Route, limit: int) -> None:
        task = asyncio.current_task()
        deadlines = self._deadlines
        deadlines.enter(task)
        try:
            await self._route(scope, receive, exchange, route, limit)
        except asyncio.CancelledError:
            if task not in deadlines.expired:
                raise  # not ours: the server shutting down, the client gone
            deadlines.expired.discard(task)
            task.uncancel()
            raise TimeoutError from None
        finally:
            deadlines.leave(task)
            deadlines.expired.discard(task)

    async def _route(self, scope, receive, exchange: _Exchange, route: Route, limit: int) -> None:
        if route.kind is RouteKind.infer:
            body = await _read_body(receive, limit)
            try:
                status, content, kind, headers = await oip.answer(
                    self.state,
                    route,
                    body,
                    header(scope, b"authorization"),
                    header(scope, b"inference-header-content-length"),
                )
            except Exception:  # as the other routes answer an unexpected error
                log.exception("unhandled error on %s %s", scope["method"], scope["path"])
                status, content, kind, headers = 500, b'{"error":"internal error"}', oip.JSON, None
                if exchange.started:
                    return
            await send_bytes(exchange, status, content, kind, headers)
            return
        if route.kind in _HOT:
            try:
                self._check_key(scope)
                body = await _read_body(receive, limit)
                key = header(scope, b"x-routing-key") if route.kind is RouteKind.act else None
                status, payload, headers = await hot.answer(self.state, route, body, key)
            except (BodyTooLarge, TimeoutError):
                raise
            except ServiceError as exc:  # the key
                status, payload, headers = error_answer(exc)
            except Exception:  # as the FastAPI routes' handler of unexpected errors answers them
                log.exception("unhandled error on %s %s", scope["method"], scope["path"])
                status, payload, headers = INTERNAL_ERROR
                if exchange.started:
                    return
            await exchange.json(status, payload, headers)
            return
        # The body is read here, within the limit, before FastAPI runs: a BodyTooLarge raised
        # from inside its stack would be answered 500 by Starlette's error middleware.
        body = await _read_body(receive, limit)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # what follows the body: a disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await super().__call__(scope, replay, exchange)

    def _check_key(self, scope) -> None:
        """The inference key of the hot routes and the stream, when inference is protected."""
        if self._inference_key:
            auth = header(scope, b"authorization")
            check_bearer(auth.decode("latin-1") if auth is not None else None, self._inference_key)

    def openapi(self) -> dict:
        """FastAPI's schema of the mounted routes, plus the hot routes' declarations."""
        if self.openapi_schema is None:
            self.openapi_schema = get_openapi(
                title=self.title,
                version=self.version,
                description=self.description,
                routes=[*self.routes, *hot.DOCUMENTED.routes, *oip.DOCUMENTED.routes],
            )
        return self.openapi_schema

    async def _stream(self, scope, receive, send, session_id: str) -> None:
        """``/v1/sessions/{session_id}/stream``: each message (text or bytes) an act body, each
        reply (text) an act response or ``{"status", "detail"}``; the connection stays open."""
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            self._check_key(scope)
        except ServiceError as exc:
            status, payload, headers = error_answer(exc)
            if "websocket.http.response" in scope.get("extensions", {}):  # a denial response
                await send_json(_Denial(send), status, payload, headers)
            else:
                await send({"type": "websocket.close", "code": 1008, "reason": payload["detail"][:120]})
            return
        await send({"type": "websocket.accept"})
        state, route = self.state, hot.stream_route(session_id)
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return  # websocket.disconnect
            text = message.get("text")
            body = text if text is not None else message.get("bytes") or b""
            reply = await hot.stream_reply(state, route, body)
            await send({"type": "websocket.send", "text": dumps(reply).decode()})

    def _record(self, scope, route: Route, exchange: _Exchange, request_id: str, seconds: float) -> None:
        if route.kind is RouteKind.act:
            template, name = ACT_ROUTE, route.policy
        elif route.kind is RouteKind.session_act:
            template, name = SESSION_ACT_ROUTE, ""
        elif route.kind is RouteKind.infer:
            template, name = (INFER_ROUTE if route.version is None else INFER_VERSION_ROUTE), route.policy
        else:
            template = getattr(scope.get("route"), "path", "unmatched")
            name = (scope.get("path_params") or {}).get("name", "")
        policy = name if not name or self.metrics.known_policy(name) else UNKNOWN
        method = scope["method"] if scope["method"] in METHODS else UNKNOWN
        self.metrics.observe_request(template, method, exchange.status, policy, seconds)
        if (
            self.access_log.record(request_id, scope["method"], scope["path"], exchange.status, seconds)
            and not self._flush_scheduled
        ):
            # lines reach the log within a second, also when traffic stops
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(1.0, self._flush_access_log)

    def _flush_access_log(self) -> None:
        self._flush_scheduled = False
        self.access_log.flush()


class _Denial:
    """``send_json``'s HTTP messages as a WebSocket denial response (the ASGI extension)."""

    __slots__ = ("send",)

    def __init__(self, send) -> None:
        self.send = send

    async def __call__(self, message) -> None:
        await self.send({**message, "type": "websocket." + message["type"]})


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
