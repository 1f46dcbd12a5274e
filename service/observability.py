"""Prometheus metrics and JSON-lines logs (what records them per request is ``service.api.edge``)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TextIO

import orjson
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)


class RequestMetrics:
    """``policy_server_requests_total`` and ``policy_server_request_seconds``, counted in plain
    Python per label set and turned into Prometheus families only when scraped.

    Why not prometheus_client's Counter and Histogram: each ``inc``/``observe`` takes a lock and
    costs ~1.5 µs, twice on every act call; here a request is a dict lookup and three additions.
    Called from the event loop only (the edge); a scrape reads copies of the dicts.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int, str], int] = {}
        # (route, policy) -> count per bucket (the last one +Inf), then the sum of seconds
        self._latency: dict[tuple[str, str], list] = {}

    def observe(self, route: str, method: str, status: int, policy: str, seconds: float) -> None:
        key = (route, method, status, policy)
        self._counts[key] = self._counts.get(key, 0) + 1
        h = self._latency.get((route, policy))
        if h is None:
            h = self._latency[(route, policy)] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        h[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le is inclusive: the first bound >= seconds
        h[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "policy_server_requests", "HTTP requests", labels=["route", "method", "status", "policy"]
        )
        for (route, method, status, policy), n in dict(self._counts).items():
            requests.add_metric([route, method, str(status), policy], n)
        yield requests
        latency = HistogramMetricFamily(
            "policy_server_request_seconds", "HTTP request latency", labels=["route", "policy"]
        )
        for labels, h in dict(self._latency).items():
            counts, total, cumulative, buckets = h[:-1], h[-1], 0, []
            for bound, n in zip((*LATENCY_BUCKETS, math.inf), counts, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            latency.add_metric(list(labels), buckets, total)
        yield latency


class Metrics:
    """The service's metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        # Which policy names may become label values; the lifespan sets the registry's check.
        self.known_policy: Callable[[str], bool] = lambda name: False
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics()
        self.registry.register(self.requests)
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

    def observe_request(self, route: str, method: str, status: int, policy: str, seconds: float) -> None:
        """One HTTP request; its labels come from bounded sets (the edge's job)."""
        self.requests.observe(route, method, status, policy, seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class AccessLog:
    """One JSON line per request, as the ``service.access`` logger's lines were, written in
    blocks instead of one ``logging`` call and one write per request.

    On when the ``service.access`` logger is enabled for INFO (``serve --log-level info``, the
    default). ``sample`` is the share of successful requests written (deterministically: every
    ``1/sample``-th); errors (status >= 400) are always written. Lines are buffered and written
    in blocks of at most ``BLOCK`` bytes (a write that size to a pipe is atomic, so the workers
    of one server do not interleave lines) when the block is full or ``flush`` is called; the
    edge calls it within 1 s of the first buffered line.
    """

    BLOCK = 4096

    def __init__(self, sample: float = 1.0, stream: TextIO | None = None, clock=time.time) -> None:
        self.sample = sample
        self.stream = stream
        self.clock = clock
        self._logger = logging.getLogger("service.access")
        self._seen = 0
        self._lines: list[str] = []
        self._size = 0

    def record(self, request_id: str, method: str, path: str, status: int, seconds: float) -> bool:
        """Buffer the line of one request; True when it starts a new buffer (flush it later)."""
        if not self._logger.isEnabledFor(logging.INFO):
            return False
        if status < 400:
            seen, self._seen = self._seen, self._seen + 1
            if int((seen + 1) * self.sample) == int(seen * self.sample):
                return False
        line = orjson.dumps(
            {
                "ts": round(self.clock(), 3),
                "level": "INFO",
                "logger": "service.access",
                "msg": "request",
                "request_id": request_id,
                "method": method,
                "path": path[:256],
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
            }
        ).decode()
        if self._size + len(line) + 1 > self.BLOCK:
            self.flush()
        first = not self._lines
        self._lines.append(line)
        self._size += len(line) + 1
        return first

    def flush(self) -> None:
        if not self._lines:
            return
        block = "\n".join(self._lines) + "\n"
        self._lines.clear()
        self._size = 0
        stream = self.stream or sys.stderr
        stream.write(block)
        stream.flush()


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
