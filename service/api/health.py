"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import JobsDep, RegistryDep, SessionsDep
from service.api.responses import FastJSONResponse
from service.errors import Unavailable

router = APIRouter(tags=["operations"])
log = logging.getLogger(__name__)


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(registry: RegistryDep) -> Response:
    if not registry.ready:
        return FastJSONResponse({"status": "loading"}, status_code=503)
    return FastJSONResponse({"status": "ready", "policies": len(registry.entries())})


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, sessions: SessionsDep, jobs: JobsDep) -> Response:
    """Prometheus exposition; gauges that live in stores are read at scrape time (and left as
    they were while a store is unreachable)."""
    m = request.app.state.metrics
    try:
        usage = await sessions.usage()
        m.live_sessions.set(usage["live"])
        m.session_state_bytes.set(usage["state_bytes"])
        counts, fps = await jobs.counts()
        m.training_fps.set(fps)
        for status, n in counts.items():
            m.jobs.labels(status).set(n)
    except Unavailable as exc:
        log.warning("metrics: %s", exc.detail)
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
