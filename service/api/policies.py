"""Policies: list, inspect, upload versions, choose the default, delete, and act."""

from __future__ import annotations

import json

from fastapi import APIRouter, File, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from service.api.deps import (
    Admin,
    BatcherDep,
    Inference,
    PolicyDep,
    PolicyName,
    RegistryDep,
    SettingsDep,
)
from service.api.responses import FastJSONResponse
from service.errors import Unprocessable
from service.registry.registry import Registry
from service.runtime.batching import MicroBatcher
from service.runtime.policy import Exploration
from service.schemas import (
    ActRequest,
    ActResponse,
    DefaultVersionIn,
    PolicyDetail,
    PolicyList,
    PublishedVersion,
)

router = APIRouter(prefix="/v1/policies", tags=["policies"])


@router.get("", response_model=PolicyList)
def list_policies(registry: RegistryDep) -> dict:
    return {"policies": [e.summary() for e in registry.entries()]}


@router.get("/{name}", response_model=PolicyDetail)
def get_policy(entry: PolicyDep) -> dict:
    details = [
        {
            "version": v,
            "spec": lv.spec.model_dump(mode="json"),
            "provenance": lv.spec.provenance,
            "error": None,
        }
        for v, lv in sorted(entry.versions.items())
    ]
    details += [
        {"version": v, "spec": None, "provenance": None, "error": err}
        for v, err in sorted(entry.errors.items())
    ]
    details.sort(key=lambda d: d["version"])
    return {**entry.summary(), "version_details": details}


async def _read_limited(upload: UploadFile, limit: int, what: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise Unprocessable(f"{what} is larger than the limit of {limit} bytes")
    return data


@router.post(
    "/{name}/versions",
    status_code=201,
    response_model=PublishedVersion,
    dependencies=[Admin],
)
async def upload_version(
    name: PolicyName,
    registry: RegistryDep,
    settings: SettingsDep,
    spec: UploadFile = File(description="policy.json"),
    weights: UploadFile = File(description="weights.safetensors"),
) -> dict:
    raw = await _read_limited(spec, 1024 * 1024, "spec")
    data = await _read_limited(weights, settings.max_upload_bytes, "weights")
    try:
        spec_json = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Unprocessable(f"spec is not valid JSON ({exc}); expected policy.json") from None
    if not isinstance(spec_json, dict):
        raise Unprocessable("spec must be a JSON object (policy.json)")
    version = await run_in_threadpool(registry.publish, name, spec_json, data)
    return {"name": name, "version": version}


@router.put("/{name}/default", dependencies=[Admin])
async def set_default(entry: PolicyDep, body: DefaultVersionIn, registry: RegistryDep) -> dict:
    await run_in_threadpool(registry.set_default, entry.name, body.version)
    return {"name": entry.name, "default_version": body.version}


@router.delete("/{name}/versions/{version}", status_code=204, dependencies=[Admin])
async def delete_version(entry: PolicyDep, version: int, registry: RegistryDep, request: Request) -> Response:
    await run_in_threadpool(registry.delete_version, entry.name, version)
    await request.app.state.sessions.close_version(entry.name, version)
    return Response(status_code=204)


def check_batch(n: int, limit: int) -> None:
    if n > limit:
        raise Unprocessable(f"batch of {n} observations exceeds the limit of {limit}")


async def act_on_policy(
    registry: Registry, batcher: MicroBatcher, max_batch: int, name: str, body: ActRequest
) -> dict:
    """The act call itself: resolve the version, check the batch, forward, build the answer."""
    loaded = registry.resolve(name, body.version)
    rows = body.rows
    check_batch(len(rows), max_batch)
    runtime = loaded.runtime
    obs = runtime.observation_batch(rows, "observation" if body.single else "observations", name)
    result = await batcher.act(
        runtime,
        obs,
        exploration=body.exploration or Exploration.deterministic,
        epsilon=body.epsilon,
        noise_std=body.noise_std,
        seed=body.seed,
        return_info=body.return_info,
    )
    payload = result.payload(body.single)
    payload["policy"] = name
    payload["version"] = loaded.version
    return payload


@router.post("/{name}/act", response_model=ActResponse, dependencies=[Inference])
async def act(
    name: PolicyName,
    body: ActRequest,
    registry: RegistryDep,
    batcher: BatcherDep,
    settings: SettingsDep,
) -> Response:
    """Documented here; served by ``service.api.fastpath`` ahead of the router (same code)."""
    return FastJSONResponse(await act_on_policy(registry, batcher, settings.max_batch_size, name, body))
