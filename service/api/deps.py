"""Typed dependencies: handlers read like their signature; auth is checked once, here."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path
from starlette.requests import HTTPConnection

from service.api.auth import check_admin, check_inference
from service.config import Settings
from service.registry.registry import PolicyEntry, Registry
from service.registry.spec import NAME_PATTERN
from service.serving.datasets import DatasetService
from service.serving.evaluation import EvaluationService
from service.serving.jobs import JobService
from service.serving.policies import PolicyService
from service.serving.rollouts import RolloutService
from service.serving.sessions import SessionService


def _state(attr: str):
    async def get(conn: HTTPConnection):
        return getattr(conn.app.state, attr)

    get.__name__ = f"get_{attr}"
    return Depends(get)


SettingsDep = Annotated[Settings, _state("settings")]
RegistryDep = Annotated[Registry, _state("registry")]
SessionsDep = Annotated[SessionService, _state("session_service")]
RolloutsDep = Annotated[RolloutService, _state("rollout_service")]
PoliciesDep = Annotated[PolicyService, _state("policy_service")]
JobsDep = Annotated[JobService, _state("job_service")]
DatasetsDep = Annotated[DatasetService, _state("dataset_service")]
EvaluationDep = Annotated[EvaluationService, _state("evaluation_service")]
PolicyName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=64, description="Policy name")]


async def get_policy_entry(name: PolicyName, registry: RegistryDep) -> PolicyEntry:
    return registry.entry(name)  # PolicyNotFound -> 404 at the edge


PolicyDep = Annotated[PolicyEntry, Depends(get_policy_entry)]


async def require_admin(conn: HTTPConnection, settings: SettingsDep) -> None:
    check_admin(settings, conn.headers.get("authorization"))


async def require_inference(conn: HTTPConnection, settings: SettingsDep) -> None:
    check_inference(settings, conn.headers.get("authorization"))


Admin = Depends(require_admin)
Inference = Depends(require_inference)
