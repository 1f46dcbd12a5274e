"""Prometheus metrics and JSON-lines logs (the request middleware is ``service.api.middleware``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """The service's metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        # Which policy names may become label values; the lifespan sets the registry's check.
        self.known_policy: Callable[[str], bool] = lambda name: False
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
        self.session_state_bytes = Gauge(
            "policy_server_session_state_bytes",
            "Bytes of per-env state reserved by the live sessions of this process (memory store)",
            registry=self.registry,
        )
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
