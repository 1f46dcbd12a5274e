"""SAC (a ``probabilistic`` TanhNormal policy) and TD3 (a deterministic ``actor`` policy) for box
action spaces, with TorchRL's ``SACLoss`` and ``TD3Loss``.

``ActorCritic`` builds the policy from the same ``PolicySpec`` the registry serves, twin
Q-networks, the loss and its optimisers; ``update`` is one gradient step (TD3 delays the actor's).
The loop around it is ``common.train_offpolicy``, shared with DQN.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field
from tensordict import TensorDictBase
from tensordict.nn import TensorDictSequential
from torchrl.data import LazyTensorStorage, RandomSampler, TensorDictReplayBuffer
from torchrl.modules import MLP, AdditiveGaussianModule, ValueOperator
from torchrl.objectives import SACLoss, SoftUpdate, TD3Loss

from service.envs import env_specs
from service.registry.build import ACTIVATIONS, BuiltPolicy, build_policy
from service.registry.spec import PolicySpec
from service.training.common import (
    OffPolicyHyperparameters,
    Progress,
    StopCheck,
    TrainConfig,
    TrainedPolicy,
    train_offpolicy,
)
from service.training.imitation import Imitation, ImitationConfig


class ActorCriticHyperparameters(OffPolicyHyperparameters):
    """Knobs of SAC and TD3; defaults solve Pendulum-v1 in 20k frames."""

    tau: float = Field(0.005, gt=0, le=1, description="Soft target update rate.")
    alpha_init: float = Field(1.0, gt=0, description="SAC: initial entropy coefficient.")
    exploration_noise: float = Field(0.1, ge=0, description="TD3: action noise (action units).")
    policy_noise: float = Field(0.2, ge=0, description="TD3: target policy smoothing noise.")
    noise_clip: float = Field(0.5, ge=0, description="TD3: smoothing noise clip.")
    policy_delay: int = Field(2, ge=1, description="TD3: critic updates per actor update.")


class ActorCriticConfig(TrainConfig, ImitationConfig):
    algorithm: Literal["sac", "td3"] = "sac"
    hyperparameters: ActorCriticHyperparameters = Field(default_factory=ActorCriticHyperparameters)

    @classmethod
    def default_hyperparameters(cls, **kw: Any) -> dict[str, Any]:
        return {"lr": 1e-3} if kw.get("algorithm") == "td3" else {}


def policy_spec_for(config: ActorCriticConfig) -> PolicySpec:
    hp = config.hyperparameters
    specs = env_specs(config.env_id)
    if specs["action"]["type"] != "box":
        raise ValueError(f"{config.algorithm} needs a box action space; {config.env_id} is discrete")
    kind = (
        {"kind": "probabilistic", "distribution": "tanh_normal"}
        if config.algorithm == "sac"
        else {"kind": "actor", "exploration": {"noise_std": hp.exploration_noise}}
    )
    return PolicySpec.model_validate(
        {
            **kind,
            **specs,
            "env_id": config.env_id,
            "network": {"type": "mlp", "num_cells": hp.num_cells, "activation": hp.activation},
        }
    )


def _critic(spec: PolicySpec, hp: ActorCriticHyperparameters, device: torch.device):
    net = MLP(
        in_features=spec.observation.dim + spec.action.shape[0],
        out_features=1,
        num_cells=hp.num_cells,
        activation_class=ACTIVATIONS[hp.activation],
    )
    return ValueOperator(net, in_keys=["observation", "action"]).to(device)


class ActorCritic:
    """The parts of one SAC or TD3 run (implements ``common.OffPolicyAlgorithm``)."""

    def __init__(self, config: ActorCriticConfig) -> None:
        hp = self.hyperparameters = config.hyperparameters
        self.name = config.algorithm
        device = torch.device(config.device)
        self.spec = policy_spec_for(config)
        self.built: BuiltPolicy = build_policy(self.spec, device)
        self.stored_preprocess = []  # vector observations: nothing to preprocess
        self.act_policy = self.built.core
        critic = _critic(self.spec, hp, device)
        actor = self.built.core.module[0]  # the ProbabilisticActor / Actor itself (shares the weights)
        spec = self.built.action_spec
        if config.algorithm == "sac":
            self.loss_fn = SACLoss(
                actor,
                critic,
                num_qvalue_nets=2,
                loss_function="l2",
                alpha_init=hp.alpha_init,
                action_spec=spec,
            )
            self.collect_policy = self.built.core  # samples from the TanhNormal in RANDOM mode
        else:
            self.loss_fn = TD3Loss(
                actor,
                critic,
                action_spec=spec,
                num_qvalue_nets=2,
                policy_noise=hp.policy_noise,
                noise_clip=hp.noise_clip,
                loss_function="l2",
            )
            noise = AdditiveGaussianModule(
                spec, sigma_init=hp.exploration_noise, sigma_end=hp.exploration_noise, device=device
            )
            self.collect_policy = TensorDictSequential(self.built.core, noise)
        self.loss_fn.make_value_estimator(gamma=hp.gamma)
        self.target = SoftUpdate(self.loss_fn, tau=hp.tau)
        actor_params = list(self.loss_fn.actor_network_params.flatten_keys().values())
        critic_params = list(self.loss_fn.qvalue_network_params.flatten_keys().values())
        self.actor_optim = torch.optim.Adam(actor_params, lr=hp.lr)
        self.critic_optim = torch.optim.Adam(critic_params, lr=hp.lr)
        self.alpha_optim = (
            torch.optim.Adam([self.loss_fn.log_alpha], lr=hp.lr) if config.algorithm == "sac" else None
        )
        # no batch_size here: the loop draws sample_size x updates_per_batch at once
        self.buffer = TensorDictReplayBuffer(
            storage=LazyTensorStorage(hp.buffer_size, device=device), sampler=RandomSampler()
        )
        self.sample_size = hp.batch_size
        self.steps = 0
        self.imitation = None
        if config.imitation_dir is not None:  # the seed's custom_loss, on the actor's updates
            self.imitation = Imitation(
                config.imitation_dir, self.built, self.act_policy, self.spec, config.imitation_weight, device
            )

    def prepare(self, batch: TensorDictBase, index: int) -> TensorDictBase:
        return batch

    def update(self, sample: TensorDictBase) -> torch.Tensor:
        losses = self.loss_fn(sample)
        self.critic_optim.zero_grad(set_to_none=True)
        self.actor_optim.zero_grad(set_to_none=True)
        update_actor = self.name == "sac" or self.steps % self.hyperparameters.policy_delay == 0
        total = losses["loss_qvalue"] + (losses["loss_actor"] if update_actor else 0.0)
        if update_actor and self.imitation is not None:
            total = total + self.imitation.loss(sample.shape[0])
        if self.alpha_optim is not None:
            self.alpha_optim.zero_grad(set_to_none=True)
            total = total + losses["loss_alpha"]
        total.backward()
        self.critic_optim.step()
        if update_actor:
            self.actor_optim.step()
        if self.alpha_optim is not None:
            self.alpha_optim.step()
        if update_actor:
            self.target.step()
        self.steps += 1
        return losses["loss_qvalue"].detach()

    def after_batch(self, frames: int) -> dict[str, Any]:
        return {}


def train(
    config: ActorCriticConfig, on_progress: Progress | None = None, should_stop: StopCheck | None = None
) -> TrainedPolicy:
    """Train SAC or TD3 (``config.algorithm``) and return the policy ready to publish."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    return train_offpolicy(ActorCritic(config), config, on_progress, should_stop, start)
