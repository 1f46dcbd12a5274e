"""Policies: list, inspect, upload versions, choose the default, delete, export (act:
``api/hot``)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, File, Query, Response, UploadFile

from service.api.deps import (
    Admin,
    EvaluationDep,
    Inference,
    PoliciesDep,
    PolicyDep,
    PolicyName,
    SettingsDep,
)
from service.errors import InvalidInput, too_large
from service.registry.store import MAX_SPEC_BYTES
from service.schemas import (
    DefaultVersionIn,
    EvaluateIn,
    EvaluateOut,
    PolicyDetail,
    PolicyList,
    PublishedVersion,
    RoutingIn,
    RoutingOut,
    VersionStatsOut,
)

router = APIRouter(prefix="/v1/policies", tags=["policies"])


@router.get("", response_model=PolicyList)
def list_policies(policies: PoliciesDep) -> dict:
    return {"policies": policies.list()}


@router.get("/{name}", response_model=PolicyDetail)
def get_policy(entry: PolicyDep, policies: PoliciesDep) -> dict:
    return policies.detail(entry.name)


async def _read_limited(upload: UploadFile, limit: int, what: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise InvalidInput(too_large(what, limit))
    return data


@router.post("/{name}/versions", status_code=201, response_model=PublishedVersion, dependencies=[Admin])
async def upload_version(
    name: PolicyName,
    policies: PoliciesDep,
    settings: SettingsDep,
    spec: UploadFile = File(description="policy.json"),
    weights: UploadFile | None = File(None, description="weights.safetensors (a declarative policy)"),
    programs: list[UploadFile] = File(
        [], description="the PT2 archives policy.json's program.files names, each under its file name"
    ),
) -> dict:
    raw = await _read_limited(spec, MAX_SPEC_BYTES, "spec")
    if weights is not None and programs:
        raise InvalidInput("send weights (a declarative policy) or programs (exported programs), not both")
    if weights is None and not programs:
        raise InvalidInput(
            "send weights (weights.safetensors) or programs (the PT2 archives policy.json names)"
        )
    if weights is not None:
        return await policies.publish(
            name, raw, await _read_limited(weights, settings.max_upload_bytes, "weights")
        )
    files: dict[str, bytes] = {}
    for upload in programs:
        filename = upload.filename or ""
        if filename in files:
            raise InvalidInput(f"program {filename[:40]!r} sent twice")
        files[filename] = await _read_limited(upload, settings.max_upload_bytes, f"program {filename[:40]!r}")
    return await policies.publish(name, raw, files)


@router.put("/{name}/default", dependencies=[Admin])
async def set_default(entry: PolicyDep, body: DefaultVersionIn, policies: PoliciesDep) -> dict:
    return await policies.set_default(entry.name, body.version)


@router.post("/{name}/evaluate", response_model=EvaluateOut, dependencies=[Inference])
async def evaluate(entry: PolicyDep, body: EvaluateIn, evaluation: EvaluationDep) -> dict:
    """An off-policy estimate of the version's return on a logged dataset, with its bootstrap
    95% interval: how it would have done on that traffic, before it goes live."""
    return await evaluation.evaluate(entry.name, body.params())


@router.get("/{name}/stats", response_model=VersionStatsOut)
def get_stats(entry: PolicyDep, policies: PoliciesDep) -> dict:
    """Per version: act calls, sessions, episodes and the mean, std and 95% interval of the
    episode returns clients reported in sessions; the shadow's agreement with the primary."""
    return policies.version_stats(entry.name)


@router.get("/{name}/routing", response_model=RoutingOut)
def get_routing(entry: PolicyDep, policies: PoliciesDep) -> dict:
    return policies.routing(entry.name)


@router.put("/{name}/routing", response_model=RoutingOut, dependencies=[Admin])
async def set_routing(entry: PolicyDep, body: RoutingIn, policies: PoliciesDep) -> dict:
    """Split the traffic of calls without ``version`` (and new sessions) between versions by
    weight, sticky per ``X-Routing-Key``; ``shadow`` gets a copy of it. ``PUT …/default`` or
    ``DELETE …/routing`` ends the split."""
    return await policies.set_routing(entry.name, body.model_dump())


@router.delete("/{name}/routing", status_code=204, dependencies=[Admin])
async def clear_routing(entry: PolicyDep, policies: PoliciesDep) -> Response:
    await policies.set_routing(entry.name, None)
    return Response(status_code=204)


@router.delete("/{name}/versions/{version}", status_code=204, dependencies=[Admin])
async def delete_version(entry: PolicyDep, version: int, policies: PoliciesDep) -> Response:
    await policies.delete_version(entry.name, version)
    return Response(status_code=204)


@router.get("/{name}/versions/{version}/export", dependencies=[Admin])
async def export_version(
    entry: PolicyDep,
    version: int,
    policies: PoliciesDep,
    format: Literal["onnx", "pt2"] = Query("onnx", description="onnx (onnxruntime) or pt2 (torch.export)"),
) -> Response:
    """The version as a file that runs without this server (the deterministic policy,
    preprocessing and recurrent state included)."""
    content, filename = await policies.export(entry.name, version, format)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
