"""Supervised terms on a dataset's actions: behaviour cloning's log-likelihood, and the RLlib
seed's ``custom_loss`` — "imitation losses on expert experience" — added to an off-policy job's
loss (``imitation: {dataset, weight}``), each in the form that fits the policy it trains:

- a Q-value policy (DQN): the cross-entropy of the expert's actions under the Q-values taken
  as logits;
- a probabilistic policy (SAC): the negative log-likelihood of the expert's actions under the
  policy's distribution (a TanhNormal: just inside the action bounds, where it is finite);
- a deterministic actor (TD3): the squared distance of the actor's action to the expert's,
  per action dimension scaled to the action range (TD3+BC's term).
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, Field
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from service.registry.build import BuiltPolicy
from service.registry.spec import PolicySpec


class ImitationConfig(BaseModel):
    """A trainer config's imitation fields (DQN, SAC, TD3 in an env)."""

    imitation_dataset: str | None = None  # the dataset of expert transitions
    imitation_weight: float = Field(0.0, ge=0, le=100)  # the weight of their supervised term
    imitation_dir: str | None = None  # the dataset's directory (set by the worker)


def inside_bounds(spec: PolicySpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A box action's bounds moved in by 1e-4 of its range (a TanhNormal's log-prob is infinite
    at the bounds); None for discrete actions."""
    if spec.action.type != "box":
        return None
    low = torch.tensor(spec.action.low, dtype=torch.float32, device=device)
    high = torch.tensor(spec.action.high, dtype=torch.float32, device=device)
    margin = 1e-4 * (high - low)
    return low + margin, high - margin


def log_likelihood(
    built: BuiltPolicy, observation: TensorDictBase, action: torch.Tensor, bounds: tuple | None
) -> torch.Tensor:
    """log pi(action | observation) per row under a probabilistic policy's distribution."""
    modules = list(built.core.module)
    td = observation
    for module in modules[:-1]:
        td = module(td)
    dist = modules[-1].get_dist(td)
    if bounds is not None:
        action = action.clamp(*bounds)
    return dist.log_prob(action)


class Imitation:
    """The expert's transitions (observation, action) on the device, and the weighted
    supervised term on ``size`` of them drawn uniformly, for the policy ``built`` of ``spec``
    (``act_policy``: its deterministic module on the env's observation, as the trainer acts)."""

    def __init__(
        self,
        dataset_dir: Path,
        built: BuiltPolicy,
        act_policy: TensorDictModuleBase,
        spec: PolicySpec,
        weight: float,
        device: torch.device,
    ) -> None:
        from service.training.offline import read_transitions

        self.expert = read_transitions(Path(dataset_dir)).select("observation", "action").to(device)
        self.built, self.act_policy, self.kind, self.weight = built, act_policy, spec.kind, weight
        self.bounds = inside_bounds(spec, device)

    def loss(self, size: int) -> torch.Tensor:
        idx = torch.randint(0, self.expert.shape[0], (size,), device=self.expert.device)
        expert = self.expert[idx]
        obs = expert.select("observation").copy()
        if self.kind == "qvalue":
            values = self.act_policy(obs)["action_value"]
            term = torch.nn.functional.cross_entropy(values, expert["action"])
        elif self.kind == "probabilistic":
            term = -log_likelihood(self.built, obs, expert["action"], self.bounds).mean()
        else:  # a deterministic actor
            low, high = self.bounds
            scale = (high - low) / 2
            term = (((self.act_policy(obs)["action"] - expert["action"]) / scale) ** 2).mean()
        return self.weight * term
