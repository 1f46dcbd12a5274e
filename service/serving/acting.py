"""Acting on a policy: resolve the version, check the batch, decode, one forward pass, encode."""

from __future__ import annotations

from typing import Any

import torch

from service.config import Settings
from service.errors import check_limit
from service.exploration import ExplorationParams
from service.registry.registry import Registry
from service.runtime.batching import MicroBatcher
from service.runtime.call import ActCall, ActResult, Observations
from service.runtime.policy import PolicyRuntime
from service.serving.params import ActParams
from service.serving.shadow import Shadows
from service.serving.stats import PolicyStats


class ActService:
    """``act(ActParams) -> dict``: the stateless act call of the HTTP edge and the SDK."""

    def __init__(
        self,
        registry: Registry,
        batcher: MicroBatcher,
        settings: Settings,
        stats: PolicyStats | None = None,
    ) -> None:
        self.registry = registry
        self.batcher = batcher
        self.settings = settings
        self.stats = stats or PolicyStats()
        self.shadows = Shadows(self.forward, self.stats, settings.shadow_queue)

    async def act(self, p: ActParams) -> dict[str, Any]:
        loaded = self.registry.routed(p.policy, p.version, p.routing_key)
        check_limit("batch size", len(p.rows), self.settings.max_batch_size)
        runtime = loaded.runtime
        codec = runtime.codec
        obs, mask = codec.decode(p.rows, p.masks, p.single, p.policy)
        result = await self.forward(runtime, obs, mask, p.explore, p.seed, p.return_info)
        payload = codec.encode(result, p.single)
        payload["policy"] = p.policy
        payload["version"] = loaded.version
        self.stats.served(p.policy, loaded.version, len(p.rows))
        if p.version is None:  # routed traffic: a copy to the split's shadow, if any
            shadow = self.registry.shadow(p.policy)
            if shadow is not None:
                self.shadows.offer(shadow, p, payload)
        return payload

    async def forward(
        self,
        runtime: PolicyRuntime,
        obs: Observations,
        mask: torch.Tensor | None,
        explore: ExplorationParams,
        seed: int | None,
        return_info: bool,
    ) -> ActResult:
        """One decoded stateless call through the micro-batcher (any codec's)."""
        call = ActCall(
            obs,
            runtime.effective(explore.type),
            explore.epsilon,
            explore.noise_std,
            seed,
            return_info,
            mask=mask,
        )
        return await self.batcher.submit(runtime, call)
