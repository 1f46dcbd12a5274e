"""Prometheus metrics, request ids and JSON-lines logs."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("service.access")


class Metrics:
    """The service's metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "policy_server_requests_total",
            "HTTP requests",
            ["route", "method", "status", "policy"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "policy_server_request_seconds",
            "HTTP request latency",
            ["route", "policy"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "policy_server_forward_batch_size",
            "Observations per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096),
            registry=self.registry,
        )
        self.live_sessions = Gauge("policy_server_live_sessions", "Live sessions", registry=self.registry)
        self.jobs = Gauge("policy_server_jobs", "Training jobs by status", ["status"], registry=self.registry)
        self.training_fps = Gauge(
            "policy_server_training_fps", "Frames per second of running training jobs", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_json_logging(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RequestContextMiddleware:
    """Request id (``X-Request-ID``, echoed or made up), access log line, metrics per route."""

    def __init__(self, app, metrics: Metrics, timeout_s: float | None = None) -> None:
        self.app, self.metrics, self.timeout_s = app, metrics, timeout_s
        # unique per process and cheap: a random prefix and a counter
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        status = 500
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                request_id = v.decode("latin-1")[:128]
                break
        request_id = request_id or f"{self._prefix}-{next(self._counter):x}"
        start = time.perf_counter()

        started = False

        async def send_with_id(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        timed = self.timeout_s is not None and not _long_running(scope)
        try:
            if timed:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        await self.app(scope, receive, send_with_id)
                except TimeoutError:
                    if started:  # nothing more can be sent on this response
                        raise
                    await _send_json(
                        send_with_id, 504, {"detail": f"the request took longer than {self.timeout_s:g} s"}
                    )
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            policy = (scope.get("path_params") or {}).get("name", "")
            self.metrics.requests.labels(path, scope["method"], str(status), policy).inc()
            self.metrics.latency.labels(path, policy).observe(elapsed)
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


def _long_running(scope) -> bool:
    """Rollouts (their own ROLLOUT_TIMEOUT_S) and uploads are not held to the request timeout."""
    path = scope["path"]
    return path.endswith("/rollout") or path.endswith("/versions")


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
