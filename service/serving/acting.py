"""Acting on a policy: resolve the version, check the batch, one forward pass, the answer."""

from __future__ import annotations

from typing import Any

from service.config import Settings
from service.errors import check_limit
from service.registry.registry import Registry
from service.runtime.batching import MicroBatcher
from service.runtime.policy import Exploration
from service.serving.params import ActParams


class ActService:
    """``act(ActParams) -> dict``: the stateless act call of the HTTP route, the edge and the SDK."""

    def __init__(self, registry: Registry, batcher: MicroBatcher, settings: Settings) -> None:
        self.registry = registry
        self.batcher = batcher
        self.settings = settings

    async def act(self, p: ActParams) -> dict[str, Any]:
        loaded = self.registry.resolve(p.policy, p.version)
        check_limit("batch size", len(p.rows), self.settings.max_batch_size)
        runtime = loaded.runtime
        obs = runtime.observation_batch(p.rows, "observation" if p.single else "observations", p.policy)
        mask = runtime.mask_batch(
            p.masks, len(p.rows), "action_mask" if p.single else "action_masks", p.policy
        )
        result = await self.batcher.act(
            runtime,
            obs,
            exploration=p.explore.exploration or Exploration.deterministic,
            epsilon=p.explore.epsilon,
            noise_std=p.explore.noise_std,
            seed=p.seed,
            return_info=p.return_info,
            mask=mask,
        )
        payload = result.payload(p.single)
        payload["policy"] = p.policy
        payload["version"] = loaded.version
        return payload
