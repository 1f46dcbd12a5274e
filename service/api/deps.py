"""Typed dependencies: handlers read like their signature, and 404/401 are raised once, here."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Path
from starlette.requests import HTTPConnection

from service.config import Settings
from service.registry.registry import PolicyEntry, Registry
from service.registry.spec import NAME_PATTERN
from service.runtime.batching import MicroBatcher


async def get_settings(request: HTTPConnection) -> Settings:
    return request.app.state.settings


async def get_registry(request: HTTPConnection) -> Registry:
    return request.app.state.registry


async def get_batcher(request: HTTPConnection) -> MicroBatcher:
    return request.app.state.batcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
PolicyName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=64, description="Policy name")]


async def get_policy_entry(name: PolicyName, registry: RegistryDep) -> PolicyEntry:
    return registry.entry(name)  # PolicyNotFound -> 404 by the ServiceError handler


PolicyDep = Annotated[PolicyEntry, Depends(get_policy_entry)]


def check_key(request: HTTPConnection, key: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(
            401,
            "missing credentials: send 'Authorization: Bearer <POLICY_SERVER_API_KEY>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise HTTPException(403, "invalid API key")


async def require_admin(request: HTTPConnection, settings: SettingsDep) -> None:
    if settings.api_key:
        check_key(request, settings.api_key)


async def require_inference(request: HTTPConnection, settings: SettingsDep) -> None:
    if settings.api_key and settings.protect_inference:
        check_key(request, settings.api_key)


Admin = Depends(require_admin)
Inference = Depends(require_inference)
