"""SAC (a ``probabilistic`` TanhNormal policy) and TD3 (a deterministic ``actor`` policy) for box
action spaces, with TorchRL's ``SACLoss`` and ``TD3Loss``.

Both build their policy from the same ``PolicySpec`` the registry serves, learn from a replay
buffer with twin Q-networks and soft target updates, and return spec + safetensors weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from tensordict.nn import TensorDictSequential
from torchrl.data import LazyTensorStorage, RandomSampler, TensorDictReplayBuffer
from torchrl.modules import MLP, AdditiveGaussianModule, ValueOperator
from torchrl.objectives import SACLoss, SoftUpdate, TD3Loss

from service.envs import env_specs
from service.registry.build import BuiltPolicy, build_policy
from service.registry.spec import PolicySpec
from service.training.common import (
    OffPolicyHyperparameters,
    Progress,
    TrainConfig,
    TrainedPolicy,
    train_offpolicy,
)


class ActorCriticHyperparameters(OffPolicyHyperparameters):
    """Knobs of SAC and TD3; defaults solve Pendulum-v1 in 20k frames."""

    tau: float = Field(0.005, gt=0, le=1, description="Soft target update rate.")
    alpha_init: float = Field(1.0, gt=0, description="SAC: initial entropy coefficient.")
    exploration_noise: float = Field(0.1, ge=0, description="TD3: action noise (action units).")
    policy_noise: float = Field(0.2, ge=0, description="TD3: target policy smoothing noise.")
    noise_clip: float = Field(0.5, ge=0, description="TD3: smoothing noise clip.")
    policy_delay: int = Field(2, ge=1, description="TD3: critic updates per actor update.")


class ActorCriticConfig(TrainConfig):
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
    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "elu": torch.nn.ELU}[hp.activation]
    net = MLP(
        in_features=spec.observation.dim + spec.action.shape[0],
        out_features=1,
        num_cells=hp.num_cells,
        activation_class=act,
    )
    return ValueOperator(net, in_keys=["observation", "action"]).to(device)


def train(
    config: ActorCriticConfig,
    on_progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainedPolicy:
    """Train SAC or TD3 (``config.algorithm``) and return the policy ready to publish."""
    hp = config.hyperparameters
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    spec = policy_spec_for(config)
    built: BuiltPolicy = build_policy(spec, device)
    critic = _critic(spec, hp, device)
    actor = built.core.module[0]  # the ProbabilisticActor / Actor itself (shares the weights)
    if config.algorithm == "sac":
        loss_fn = SACLoss(
            actor,
            critic,
            num_qvalue_nets=2,
            loss_function="l2",
            alpha_init=hp.alpha_init,
            action_spec=built.action_spec,
        )
        collect_policy = built.core  # samples from the TanhNormal in RANDOM mode
    else:
        loss_fn = TD3Loss(
            actor,
            critic,
            action_spec=built.action_spec,
            num_qvalue_nets=2,
            policy_noise=hp.policy_noise,
            noise_clip=hp.noise_clip,
            loss_function="l2",
        )
        collect_policy = TensorDictSequential(
            built.core,
            AdditiveGaussianModule(
                built.action_spec,
                sigma_init=hp.exploration_noise,
                sigma_end=hp.exploration_noise,
                device=device,
            ),
        )
    loss_fn.make_value_estimator(gamma=hp.gamma)
    target = SoftUpdate(loss_fn, tau=hp.tau)
    actor_params = list(loss_fn.actor_network_params.flatten_keys().values())
    critic_params = list(loss_fn.qvalue_network_params.flatten_keys().values())
    actor_optim = torch.optim.Adam(actor_params, lr=hp.lr)
    critic_optim = torch.optim.Adam(critic_params, lr=hp.lr)
    alpha_optim = torch.optim.Adam([loss_fn.log_alpha], lr=hp.lr) if config.algorithm == "sac" else None

    buffer = TensorDictReplayBuffer(
        storage=LazyTensorStorage(hp.buffer_size, device=device),
        sampler=RandomSampler(),
        batch_size=hp.batch_size,
    )
    step = 0

    def update(sample) -> torch.Tensor:
        nonlocal step
        losses = loss_fn(sample)
        critic_optim.zero_grad(set_to_none=True)
        actor_optim.zero_grad(set_to_none=True)
        update_actor = config.algorithm == "sac" or step % hp.policy_delay == 0
        total = losses["loss_qvalue"] + (losses["loss_actor"] if update_actor else 0.0)
        if alpha_optim is not None:
            alpha_optim.zero_grad(set_to_none=True)
            total = total + losses["loss_alpha"]
        total.backward()
        critic_optim.step()
        if update_actor:
            actor_optim.step()
        if alpha_optim is not None:
            alpha_optim.step()
        if update_actor:
            target.step()
        step += 1
        return losses["loss_qvalue"].detach()

    return train_offpolicy(
        algorithm=config.algorithm,
        config=config,
        hyperparameters=hp,
        spec=spec,
        built=built,
        collect_policy=collect_policy,
        buffer=buffer,
        update=update,
        start=start,
        on_progress=on_progress,
        should_stop=should_stop,
    )
