"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

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
