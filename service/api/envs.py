"""Environments: the allow-list, and rollouts of a policy in one of them."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import Inference, PolicyName, RolloutsDep
from service.envs import ALLOWED, env_specs
from service.schemas import EnvList, RolloutRequest, RolloutResponse

router = APIRouter(tags=["environments"])


@router.get("/v1/envs", response_model=EnvList)
def list_envs() -> dict:
    return {
        "envs": [
            {
                "env_id": e.env_id,
                "description": e.description,
                "action_mask": e.action_mask,
                "pixels": e.pixels,
                **env_specs(e.env_id),
            }
            for e in ALLOWED.values()
        ]
    }


@router.post(
    "/v1/policies/{name}/rollout", response_model=RolloutResponse, dependencies=[Inference], tags=["policies"]
)
async def rollout(name: PolicyName, body: RolloutRequest, rollouts: RolloutsDep) -> dict:
    return await rollouts.rollout(body.params(name))
