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


class ActService:
    """``act(ActParams) -> dict``: the stateless act call of the HTTP edge and the SDK."""

    def __init__(self, registry: Registry, batcher: MicroBatcher, settings: Settings) -> None:
        self.registry = registry
        self.batcher = batcher
        self.settings = settings

    async def act(self, p: ActParams) -> dict[str, Any]:
        loaded = self.registry.resolve(p.policy, p.version)
        check_limit("batch size", len(p.rows), self.settings.max_batch_size)
        runtime = loaded.runtime
        codec = runtime.codec
        obs, mask = codec.decode(p.rows, p.masks, p.single, p.policy)
        result = await self.forward(runtime, obs, mask, p.explore, p.seed, p.return_info)
        payload = codec.encode(result, p.single)
        payload["policy"] = p.policy
        payload["version"] = loaded.version
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
