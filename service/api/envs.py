"""Environments: the allow-list, and rollouts of a policy in one of them."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from service.api.deps import BatcherDep, Inference, PolicyName, RegistryDep, SettingsDep
from service.envs import ALLOWED, check_compatible, check_env_id, env_specs
from service.errors import Unprocessable
from service.runtime.policy import Exploration
from service.runtime.rollout import run_rollout
from service.schemas import EnvList, RolloutRequest, RolloutResponse

router = APIRouter(tags=["environments"])


@router.get("/v1/envs", response_model=EnvList)
def list_envs() -> dict:
    return {
        "envs": [
            {"env_id": e.env_id, "description": e.description, **env_specs(e.env_id)}
            for e in ALLOWED.values()
        ]
    }


@router.post(
    "/v1/policies/{name}/rollout", response_model=RolloutResponse, dependencies=[Inference], tags=["policies"]
)
async def rollout(
    name: PolicyName,
    body: RolloutRequest,
    request: Request,
    registry: RegistryDep,
    batcher: BatcherDep,
    settings: SettingsDep,
) -> dict:
    loaded = registry.resolve(name, body.version)
    env_id = body.env_id or loaded.spec.env_id
    if env_id is None:
        raise Unprocessable(f"policy {name} records no env_id; send env_id, one of {sorted(ALLOWED)}")
    check_env_id(env_id)
    if body.episodes > settings.max_rollout_episodes:
        raise Unprocessable(f"episodes={body.episodes} exceeds the limit of {settings.max_rollout_episodes}")
    if body.max_steps > settings.max_rollout_steps:
        raise Unprocessable(f"max_steps={body.max_steps} exceeds the limit of {settings.max_rollout_steps}")
    check_compatible(env_id, loaded.spec, name)
    with request.app.state.rollout_slots:
        result = await run_in_threadpool(
            run_rollout,
            loaded.runtime,
            env_id,
            call=batcher.act_blocking,
            episodes=body.episodes,
            max_steps=body.max_steps,
            exploration=body.exploration or Exploration.deterministic,
            epsilon=body.epsilon,
            noise_std=body.noise_std,
            seed=body.seed,
            return_trajectory=body.return_trajectory,
            timeout_s=settings.rollout_timeout_s,
        )
    return {"policy": name, "version": loaded.version, "env_id": env_id, **result}
