"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import RegistryDep
from service.api.responses import FastJSONResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(registry: RegistryDep) -> Response:
    if not registry.ready:
        return FastJSONResponse({"status": "loading"}, status_code=503)
    return FastJSONResponse({"status": "ready", "policies": len(registry.entries())})


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus exposition; gauges that live in stores are read at scrape time."""
    state = request.app.state
    m = state.metrics
    m.live_sessions.set(await state.sessions.count())
    jobs = await run_in_threadpool(state.jobs.store.list, 1000)
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        m.jobs.labels(status).set(sum(j["status"] == status for j in jobs))
    m.training_fps.set(
        sum((j.get("progress") or {}).get("fps") or 0.0 for j in jobs if j["status"] == "running")
    )
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
