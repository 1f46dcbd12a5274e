"""PPO, from TorchRL's parts: a ``Collector`` over env copies (``common.EnvSource``), ``GAE``,
``ClipPPOLoss``, epochs of shuffled minibatches over each batch.

The policy: for a discrete or box action the ``probabilistic`` spec the registry serves
(``categorical`` — a ``MaskedCategorical`` where the env gives ``info["action_mask"]`` — or
``tanh_normal`` bounded by the box), over vector or discrete (one-hot) observations; for a
``MultiDiscrete``, ``Tuple`` or ``Dict`` action one head per part (``training/parts``:
independent, or ``autoregressive`` — each part's head reads the parts before it), published as
exported programs. The critic is a ``ValueOperator`` beside it, never published. Read top to
bottom: ``PPO`` (the parts), ``run_onpolicy`` (the loop), ``train``. Periodic evaluation on
validation seeds, the final/best choice and the held-out report are ``common``'s, as for DQN,
SAC and TD3.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.data import Composite, Unbounded
from torchrl.modules import MLP, ValueOperator
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from service.envs import action_parts, env_specs, has_action_mask, multi_part
from service.registry.build import ACTION_MASK, ACTIVATIONS, ENCODED, BuiltPolicy, build_policy, state_bytes
from service.registry.spec import Activation, PolicySpec
from service.registry.tracing import DECLARATIVE_ONLY, check_loaded, trace_programs
from service.training.common import (
    RECENT,
    EnvSource,
    EvalEpisodes,
    LayerSizes,
    LearningRate,
    LoopResult,
    NumEnvs,
    PeriodicEvaluation,
    Progress,
    StopCheck,
    TrainConfig,
    TrainedPolicy,
    progress_point,
    train_offpolicy,
)
from service.training.parts import PartHeads, parts_actor, served_module


class PPOHyperparameters(BaseModel):
    """Knobs of PPO; defaults as in TorchRL's and Stable-Baselines3's CartPole settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_cells: LayerSizes = [64, 64]
    activation: Activation = Field("tanh", description="MLP activation (policy and critic).")
    lr: LearningRate = 3e-4
    gamma: float = Field(0.99, gt=0, le=1, description="Discount factor.")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip_epsilon: float = Field(0.2, gt=0, le=1, description="PPO's ratio clip.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient.")
    critic_coef: float = Field(0.5, ge=0, description="Value loss coefficient.")
    max_grad_norm: float = Field(0.5, gt=0, description="Gradient norm clip.")
    epochs: int = Field(10, ge=1, le=100, description="Passes over each batch.")
    minibatch_size: int = Field(64, ge=1, le=65536, description="Transitions per gradient step.")
    frames_per_batch: int = Field(2048, ge=1, le=65536, description="Frames collected per batch.")
    num_envs: NumEnvs = 8
    autoregressive: bool = Field(
        False,
        description="Multi-part actions: each part's head reads the parts sampled before it "
        "(P(a2 | a1, obs)); false: independent heads.",
    )
    eval_episodes: EvalEpisodes = 10
    eval_every_frames: int = Field(
        10_000,
        ge=0,
        description="Periodic evaluation (5 episodes); the best weights are kept. 0 = only at the end.",
    )

    @property
    def init_random_frames(self) -> int:  # what EnvSource's collector reads: PPO acts from the start
        return 0

    @model_validator(mode="after")
    def _whole(self) -> PPOHyperparameters:
        if self.frames_per_batch % self.num_envs:
            raise ValueError(
                f"frames_per_batch ({self.frames_per_batch}) must be a multiple of num_envs ({self.num_envs})"
            )
        if self.minibatch_size > self.frames_per_batch:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must not exceed "
                f"frames_per_batch ({self.frames_per_batch})"
            )
        return self


class PPOConfig(TrainConfig):
    algorithm: Literal["ppo"] = "ppo"
    hyperparameters: PPOHyperparameters = Field(default_factory=PPOHyperparameters)

    @classmethod
    def default_hyperparameters(cls, **kw: Any) -> dict[str, Any]:
        env_id = kw.get("env_id")  # an env with action masks steps one copy (envs.make_env)
        return {"num_envs": 1} if env_id is not None and has_action_mask(env_id) else {}

    @model_validator(mode="after")
    def _fits_the_env(self) -> PPOConfig:
        """Refused at submit, not when the job runs."""
        if self.env_id is None:
            return self
        hp, specs = self.hyperparameters, env_specs(self.env_id)
        obs, action = specs["observation"], specs["action"]
        vector = obs.get("type") is None and len(obs.get("shape", [])) == 1
        if multi_part(action):
            if not vector:
                raise ValueError(
                    f"ppo trains multi-part actions on vector observations; {self.env_id} has {obs}"
                )
        else:
            if hp.autoregressive:
                raise ValueError(
                    f"autoregressive heads need an action of several parts, not {action['type']}"
                )
            if not vector and obs.get("type") != "discrete":
                raise ValueError(f"ppo trains on vector or discrete observations; {self.env_id} has {obs}")
        if has_action_mask(self.env_id) and hp.num_envs != 1:
            raise ValueError(f"{self.env_id} gives action masks: train it with num_envs=1")
        return self


def policy_spec_for(config: PPOConfig) -> PolicySpec:
    """The served spec of a one-part action: a categorical or tanh-normal
    ``ProbabilisticActor`` over an MLP. (Multi-part actions are served as programs.)"""
    hp = config.hyperparameters
    specs = env_specs(config.env_id)
    if multi_part(specs["action"]):
        raise ValueError(f"{config.env_id}'s action has several parts: ppo publishes it as programs")
    distribution = "categorical" if specs["action"]["type"] == "discrete" else "tanh_normal"
    return PolicySpec.model_validate(
        {
            "kind": "probabilistic",
            "distribution": distribution,
            **specs,
            "env_id": config.env_id,
            "network": {"type": "mlp", "num_cells": hp.num_cells, "activation": hp.activation},
        }
    )


class CategoricalDraw(nn.Module):
    """The collector's policy for an unmasked categorical actor over a vector observation: the
    actor's own logits network, one draw and its log-prob, as ``ProbabilisticActor`` +
    ``Categorical`` would give them (RANDOM exploration, which the collector runs) without the
    TensorDict machinery around one small MLP (0.28 vs 0.08 ms a step for 8 CartPoles)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(observation).log_softmax(-1)
        action = torch.multinomial(logits.exp().reshape(-1, logits.shape[-1]), 1, True)
        action = action.reshape(logits.shape[:-1])
        return action, logits.gather(-1, action.unsqueeze(-1)).squeeze(-1)


class LeanClipPPOLoss(ClipPPOLoss):
    """TorchRL's ``ClipPPOLoss`` without its per-call diagnostics: the same clipped objective,
    critic loss and entropy term, from its own ``_log_weight``, ``loss_critic`` and
    ``_get_entropy``.

    The one workaround of TorchRL's losses here: ``ClipPPOLoss.forward`` also computes, on every
    minibatch, the effective sample size, the ratio's max and mean, the clip fraction, the KL
    estimate and the explained variance, and assembles them in TensorDicts — about 40% of a
    64-transition gradient step on a CPU (0.5 of 1.3 ms), which nothing here reads. Only the
    default configuration PPO uses is taken (no delayed actor, importance-ratio cap, value
    clipping or per-head entropy coefficients; ``tests/test_ppo.py`` checks the losses equal
    ``ClipPPOLoss``'s)."""

    def forward(self, tensordict: TensorDictBase) -> dict[str, torch.Tensor]:
        advantage = tensordict.get(self.tensor_keys.advantage)
        log_weight, dist, _, _ = self._log_weight(tensordict, adv_shape=advantage.shape[:-1])
        gain = torch.minimum(
            log_weight.exp() * advantage, log_weight.clamp(*self._clip_bounds).exp() * advantage
        )
        out = {"loss_objective": -gain.mean(), "loss_critic": self.loss_critic(tensordict)[0].mean()}
        if self.entropy_bonus:
            entropy = self._get_entropy(dist, adv_shape=advantage.shape[:-1])
            out["loss_entropy"] = self._weighted_loss_entropy(entropy).mean()
        return out


class PPO:
    """The parts of one PPO run: the served policy, its critic, GAE, the loss and the optimiser
    (what ``common.EnvSource`` and ``common.PeriodicEvaluation`` read of an algorithm)."""

    name = "ppo"

    def __init__(self, config: PPOConfig) -> None:
        hp = self.hyperparameters = config.hyperparameters
        self.config, self.device = config, torch.device(config.device)
        specs = env_specs(config.env_id)
        self.stored_preprocess = []
        self.encoder = None  # a discrete observation's one-hot, run before the loss and the critic
        if multi_part(specs["action"]):
            self.spec, self.action = None, specs["action"]
            self.built = self.fresh_policy()
            actor = self.built.core.module[0]
            features, feature_key = specs["observation"]["shape"][0], "observation"
        else:
            self.spec, self.action = policy_spec_for(config), None
            self.built = build_policy(self.spec, self.device, action_mask=has_action_mask(config.env_id))
            *front, actor = self.built.core.module  # front: the observation's encoder, if any
            if front:
                self.encoder, feature_key = TensorDictSequential(*front), ENCODED
            else:
                feature_key = "observation"
            features = self.spec.observation.dim
        self.act_policy = self.built.core
        self.collect_policy = self.built.core  # samples in the collector's RANDOM mode
        if self.spec is not None and self.encoder is None and actor.in_keys == ["observation"]:
            if self.spec.distribution == "categorical":  # a plain network: ~0.2 ms less a step
                net = actor.module[0].module
                self.collect_policy = TensorDictModule(
                    CategoricalDraw(net), in_keys=["observation"], out_keys=["action", "action_log_prob"]
                )
        self.loss_keys = [feature_key, "action", "action_log_prob", "advantage", "value_target"]
        if has_action_mask(config.env_id):
            self.loss_keys.append(ACTION_MASK)
        critic = ValueOperator(
            MLP(
                in_features=features,
                out_features=1,
                num_cells=hp.num_cells,
                activation_class=ACTIVATIONS[hp.activation],
            ),
            in_keys=[feature_key],
        ).to(self.device)
        self.advantage = GAE(gamma=hp.gamma, lmbda=hp.gae_lambda, value_network=critic, average_gae=True)
        self.loss_fn = LeanClipPPOLoss(
            actor,
            critic,
            clip_epsilon=hp.clip_epsilon,
            entropy_bonus=hp.entropy_coef > 0,
            entropy_coeff=hp.entropy_coef if hp.entropy_coef > 0 else None,
            critic_coeff=hp.critic_coef,
            loss_critic_type="l2",
            log_explained_variance=False,
            # the modules as they are, not functionalised copies: PPO needs no target networks,
            # and loading the parameters into the modules on every call costs ~1 ms a step
            functional=False,
        )
        self.params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        self.optim = torch.optim.Adam(self.params, lr=hp.lr, fused=True)
        self.generator = torch.Generator().manual_seed(config.seed)

    def fresh_policy(self) -> BuiltPolicy:
        """A new policy of this run's architecture (a multi-part action's: no spec builds it)."""
        if self.spec is not None:
            return build_policy(self.spec, self.device, action_mask=has_action_mask(self.config.env_id))
        hp = self.hyperparameters
        heads = PartHeads(
            action_parts(self.action),
            env_specs(self.config.env_id)["observation"]["shape"][0],
            hp.num_cells,
            ACTIVATIONS[hp.activation],
            hp.autoregressive,
        )
        actor = parts_actor(heads)
        core = TensorDictSequential(actor).to(self.device)
        return BuiltPolicy(core=core, explore=None, lstm=None, action_spec=actor.spec)

    def export(self, state: dict[str, torch.Tensor]) -> tuple[PolicySpec, dict[str, bytes]]:
        """A multi-part action's policy with weights ``state`` as the server's programs (each
        leaf's action and log-prob, the joint), checked as the server loads them."""
        if self.spec is not None:
            return self.spec.model_copy(deep=True), state_bytes(state)
        policy = self.fresh_policy()
        policy.core.load_state_dict(state)
        heads = policy.core.module[0].module[0].module  # the actor's TensorDictModule's PartHeads
        module = served_module(heads.to("cpu")).eval()
        obs = Composite(
            observation=Unbounded(shape=tuple(env_specs(self.config.env_id)["observation"]["shape"]))
        )
        spec, files, wrapper = trace_programs(module, obs, self.action, env_id=self.config.env_id)
        check_loaded(spec, files, wrapper)
        return PolicySpec.model_validate(spec.model_dump(mode="json", exclude=DECLARATIVE_ONLY)), files

    def prepare(self, batch: TensorDictBase, index: int) -> TensorDictBase:
        """GAE over the batch as collected (``[envs, time]``): advantages and value targets (a
        discrete observation one-hot first, as the critic reads it)."""
        with torch.no_grad():
            if self.encoder is not None:
                batch = self.encoder(batch)
                batch["next"] = self.encoder(batch["next"])
            return self.advantage(batch)

    def update(self, batch: TensorDictBase) -> tuple[torch.Tensor, int]:
        """``epochs`` passes of shuffled minibatches over one batch; the last loss and the steps."""
        hp = self.hyperparameters
        # only what the loss reads: each minibatch indexes these few tensors, not the whole batch
        batch = batch.select(*self.loss_keys)
        n = batch.shape[0]
        steps, loss = 0, torch.zeros(())
        for _ in range(hp.epochs):
            shuffled = batch[torch.randperm(n, generator=self.generator)]  # one gather an epoch
            for start in range(0, n - hp.minibatch_size + 1, hp.minibatch_size):
                parts = self.loss_fn(shuffled[start : start + hp.minibatch_size])
                loss = parts["loss_objective"] + parts["loss_critic"]
                if "loss_entropy" in parts:
                    loss = loss + parts["loss_entropy"]
                self.optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, hp.max_grad_norm, foreach=True)
                self.optim.step()
                steps += 1
        return loss.detach(), steps

    def after_batch(self, frames: int) -> dict[str, Any]:
        return {}


def run_onpolicy(
    algo: PPO,
    source: EnvSource,
    choice: PeriodicEvaluation,
    *,
    total_frames: int,
    on_progress: Progress | None = None,
    should_stop: StopCheck | None = None,
) -> LoopResult:
    """The on-policy loop: a batch (advantages computed), ``update`` on it, the collector told,
    progress, evaluation; until ``total_frames`` or ``should_stop``. The progress points are
    the off-policy loop's."""
    should_stop = should_stop or (lambda: False)
    start = time.perf_counter()
    frames = updates = episodes = 0
    recent: list[float] = []
    cancelled = False
    for batch in source.batches(should_stop):
        frames += batch.frames
        if batch.finished:
            episodes += len(batch.finished)
            recent = (recent + batch.finished)[-RECENT:]
        loss, steps = algo.update(batch.store[0])
        updates += steps
        source.after_updates(frames, updates, {})
        point = progress_point(
            frames, total_frames, episodes, recent, loss, frames, time.perf_counter() - start
        )
        choice.observe(frames, point, recent)
        if on_progress:
            on_progress(point)
        if should_stop():
            cancelled = True
            break
    return LoopResult(frames, updates, cancelled, recent)


def train(
    config: PPOConfig, on_progress: Progress | None = None, should_stop: StopCheck | None = None
) -> TrainedPolicy:
    """Train PPO and return the policy ready to publish (``common.train_offpolicy``'s source,
    evaluation and packaging around the on-policy loop)."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    return train_offpolicy(PPO(config), config, on_progress, should_stop, start, run=run_onpolicy)
