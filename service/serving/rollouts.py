"""Rollouts: a policy run in an allow-listed environment, off the event loop, with its limits."""

from __future__ import annotations

import asyncio
from typing import Any

from service.config import Settings
from service.envs import ALLOWED, check_compatible, check_env_id
from service.errors import InvalidInput, check_limit
from service.registry.registry import Registry
from service.runtime.batching import MicroBatcher
from service.runtime.rollout import RolloutSlots, run_rollout
from service.serving.params import RolloutParams


class RolloutService:
    """``rollout(RolloutParams) -> dict``: every policy step goes through the micro-batcher."""

    def __init__(self, registry: Registry, batcher: MicroBatcher, settings: Settings) -> None:
        self.registry = registry
        self.batcher = batcher
        self.settings = settings
        self.slots = RolloutSlots(settings.max_concurrent_rollouts)

    async def rollout(self, p: RolloutParams) -> dict[str, Any]:
        s = self.settings
        loaded = self.registry.resolve(p.policy, p.version)
        env_id = p.env_id or loaded.spec.env_id
        if env_id is None:
            raise InvalidInput(f"policy {p.policy} records no env_id; send env_id, one of {sorted(ALLOWED)}")
        check_env_id(env_id)
        check_limit("episodes", p.episodes, s.max_rollout_episodes)
        check_limit("max_steps", p.max_steps, s.max_rollout_steps)
        check_compatible(env_id, loaded.spec, p.policy)
        with self.slots:
            result = await asyncio.to_thread(
                run_rollout,
                loaded.runtime,
                env_id,
                submit=self.batcher.submit_blocking,
                episodes=p.episodes,
                max_steps=p.max_steps,
                explore=p.explore,
                seed=p.seed,
                return_trajectory=p.return_trajectory,
                timeout_s=s.rollout_timeout_s,
            )
        return {"policy": p.policy, "version": loaded.version, "env_id": env_id, **result}
