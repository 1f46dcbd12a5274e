"""DQN with TorchRL: ``train(config, on_progress, should_stop) -> TrainedPolicy``.

Read top to bottom: build env and Q-network from the same ``PolicySpec`` the registry serves,
collect with an annealed epsilon-greedy policy, learn from a replay buffer (sequences of the
recurrent variant, sampled with ``SliceSampler``), update the target network, evaluate
deterministically, and return spec + safetensors weights ready to publish.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tensordict.nn import TensorDictSequential
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, RandomSampler, SliceSampler, TensorDictReplayBuffer
from torchrl.envs import RewardSum, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import EGreedyModule
from torchrl.objectives import DQNLoss, HardUpdate, SoftUpdate

from service.envs import env_specs, make_env
from service.registry.build import BuiltPolicy, build_policy, weights_bytes
from service.registry.spec import PolicySpec

log = logging.getLogger(__name__)
SEGMENT = "segment"


class DQNHyperparameters(BaseModel):
    """DQN knobs; the defaults solve CartPole-v1 (see benchmarks/train_dqn.py)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_cells: list[int] = Field([256, 256], min_length=1, max_length=4,
                                 description="Hidden layers of the Q-network MLP.")
    activation: Literal["relu", "tanh", "elu"] = Field("relu", description="MLP activation.")
    hidden_size: int = Field(64, ge=4, le=1024, description="LSTM width (recurrent only).")
    lr: float = Field(2.3e-3, gt=0, le=1, description="Adam learning rate.")
    gamma: float = Field(0.99, gt=0, le=1, description="Discount factor.")
    batch_size: int = Field(64, ge=1, le=4096, description="Transitions (or sequences) per update.")
    buffer_size: int = Field(100_000, ge=100, le=2_000_000, description="Replay capacity (frames).")
    frames_per_batch: int = Field(256, ge=1, le=10_000, description="Frames collected per batch.")
    updates_per_batch: int = Field(128, ge=1, le=10_000, description="Gradient steps per batch.")
    init_random_frames: int = Field(1000, ge=0, description="Uniform-random frames before learning.")
    eps_start: float = Field(1.0, ge=0, le=1, description="Initial epsilon.")
    eps_end: float = Field(0.04, ge=0, le=1, description="Final epsilon.")
    exploration_fraction: float = Field(0.16, gt=0, le=1,
                                        description="Share of total_frames to anneal epsilon over.")
    target_update: Literal["hard", "soft"] = Field("hard", description="Target network update.")
    target_update_interval: int = Field(128, ge=1,
                                        description="Gradient steps between hard updates.")
    tau: float = Field(0.005, gt=0, le=1, description="Soft update rate.")
    double_dqn: bool = Field(False, description="Double DQN targets.")
    loss_function: Literal["l2", "smooth_l1"] = Field("l2", description="TD loss.")
    max_grad_norm: float = Field(10.0, gt=0, description="Gradient clipping.")
    slice_len: int = Field(16, ge=2, le=512, description="Sequence length (recurrent only).")
    eval_episodes: int = Field(20, ge=1, le=200, description="Deterministic episodes at the end.")
    eval_every_frames: int = Field(0, ge=0, description="Periodic evaluation; 0 = only at the end.")


RECURRENT_DEFAULTS: dict[str, Any] = {
    "num_cells": [64], "hidden_size": 64, "lr": 1e-3, "batch_size": 32, "frames_per_batch": 100,
    "updates_per_batch": 25, "init_random_frames": 1000, "target_update": "soft", "tau": 0.01,
    "exploration_fraction": 0.3, "eps_end": 0.02, "loss_function": "smooth_l1", "slice_len": 20,
}


class DQNConfig(BaseModel):
    """One training run."""

    model_config = ConfigDict(extra="forbid")

    env_id: str
    recurrent: bool = False
    total_frames: int = Field(50_000, ge=1)
    seed: int = 0
    device: str = "cpu"
    hyperparameters: DQNHyperparameters = Field(default_factory=DQNHyperparameters)
    job_id: str | None = None
    command: str | None = None

    @classmethod
    def with_defaults(cls, hyperparameters: dict | None = None, **kw: Any) -> DQNConfig:
        """Per-environment defaults (recurrent runs get theirs), overridden by ``hyperparameters``."""
        base = dict(RECURRENT_DEFAULTS) if kw.get("recurrent") else {}
        base.update(hyperparameters or {})
        return cls(hyperparameters=DQNHyperparameters(**base), **kw)


@dataclass
class TrainedPolicy:
    spec: dict[str, Any]
    weights: bytes
    eval_mean_return: float
    frames: int
    wall_time_s: float
    device: str
    cancelled: bool


Progress = Callable[[dict[str, Any]], None]


def policy_spec_for(config: DQNConfig) -> PolicySpec:
    hp = config.hyperparameters
    specs = env_specs(config.env_id)
    if specs["action"]["type"] != "discrete":
        raise ValueError(f"DQN needs a discrete action space; {config.env_id} has a box")
    return PolicySpec.model_validate({
        "kind": "qvalue",
        **specs,
        "network": {"type": "mlp", "num_cells": hp.num_cells, "activation": hp.activation},
        "recurrent": {"type": "lstm", "hidden_size": hp.hidden_size} if config.recurrent else None,
        "env_id": config.env_id,
        "exploration": {"epsilon": max(hp.eps_end, 0.01)},
    })


def _env(config: DQNConfig, built: BuiltPolicy, device: torch.device,
         max_steps: int | None = None) -> TransformedEnv:
    env = make_env(config.env_id, max_steps=max_steps, device=str(device))
    if built.lstm is not None:
        env.append_transform(built.lstm.make_tensordict_primer())
    env.append_transform(RewardSum())
    return env


def evaluate(config: DQNConfig, built: BuiltPolicy, device: torch.device, episodes: int,
             seed: int) -> float:
    """Mean return of deterministic episodes (seeds ``seed``, ``seed+1``…)."""
    env = _env(config, built, device)
    returns = []
    try:
        for i in range(episodes):
            env.set_seed(seed + i)
            with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
                td = env.rollout(100_000, built.core, break_when_any_done=True)
            returns.append(float(td["next", "reward"].sum()))
    finally:
        env.close()
    return sum(returns) / len(returns)


def train(config: DQNConfig, on_progress: Progress | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainedPolicy:
    """Train a DQN policy and return it ready to publish (``cancelled`` if stopped early)."""
    hp = config.hyperparameters
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    spec = policy_spec_for(config)
    built = build_policy(spec, device)
    core = built.core
    egreedy = EGreedyModule(
        built.action_spec, eps_init=hp.eps_start, eps_end=hp.eps_end,
        annealing_num_steps=max(1, int(hp.exploration_fraction * config.total_frames)),
    ).to(device)
    explore_policy = TensorDictSequential(core, egreedy)

    env = _env(config, built, device)
    env.set_seed(config.seed)
    collector = Collector(
        env, explore_policy, frames_per_batch=hp.frames_per_batch,
        total_frames=config.total_frames, init_random_frames=hp.init_random_frames,
        device=device,
    )
    if config.recurrent:
        buffer = TensorDictReplayBuffer(
            storage=LazyTensorStorage(hp.buffer_size, device=device),
            # Slices are cut within one collected batch (a contiguous stretch of one env's
            # stream), not within one episode: episodes shorter than slice_len stay sampleable
            # and the LSTM resets at is_init inside a slice, as it does when acting.
            sampler=SliceSampler(slice_len=hp.slice_len, traj_key=SEGMENT, strict_length=True),
            batch_size=hp.batch_size * hp.slice_len,
        )
    else:
        buffer = TensorDictReplayBuffer(
            storage=LazyTensorStorage(hp.buffer_size, device=device),
            sampler=RandomSampler(), batch_size=hp.batch_size,
        )
    loss_fn = DQNLoss(core, action_space=built.action_spec, delay_value=True,
                      double_dqn=hp.double_dqn, loss_function=hp.loss_function)
    loss_fn.make_value_estimator(gamma=hp.gamma)
    if hp.target_update == "hard":
        target = HardUpdate(loss_fn, value_network_update_interval=hp.target_update_interval)
    else:
        target = SoftUpdate(loss_fn, tau=hp.tau)
    optim = torch.optim.Adam(loss_fn.parameters(), lr=hp.lr, fused=True)

    frames = episodes = updates = batches = 0
    recent: list[float] = []
    last_loss = float("nan")
    next_eval = hp.eval_every_frames or math.inf
    cancelled = False
    try:
        for data in collector:
            frames += data.numel()
            done = data["next", "done"].reshape(-1)
            if done.any():
                finished = data["next", "episode_reward"].reshape(-1)[done].tolist()
                episodes += len(finished)
                recent = (recent + finished)[-20:]
            data = data.reshape(-1)
            if config.recurrent:
                data[SEGMENT] = torch.full((data.numel(),), batches, device=data.device)
            batches += 1
            buffer.extend(data)
            egreedy.step(data.numel())
            if frames >= hp.init_random_frames:
                for _ in range(hp.updates_per_batch):
                    sample = buffer.sample()
                    if config.recurrent:
                        sample = _as_sequences(sample, hp.slice_len)
                    loss = loss_fn(sample)["loss"]
                    optim.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(loss_fn.parameters(), hp.max_grad_norm)
                    optim.step()
                    target.step()
                    updates += 1
                last_loss = float(loss.detach())
            collector.update_policy_weights_()
            point: dict[str, Any] = {
                "frames": frames, "total_frames": config.total_frames, "episodes": episodes,
                "mean_return": sum(recent) / len(recent) if recent else None,
                "loss": None if math.isnan(last_loss) else last_loss,
                "epsilon": float(egreedy.eps), "fps": frames / (time.perf_counter() - start),
                "time_s": time.perf_counter() - start,
            }
            if frames >= next_eval:
                point["eval_mean_return"] = evaluate(config, built, device, 5, 10_000)
                next_eval += hp.eval_every_frames
            if on_progress:
                on_progress(point)
            if should_stop and should_stop():
                cancelled = True
                break
    finally:
        collector.shutdown()
        env.close()
    eval_return = float("nan") if cancelled else evaluate(
        config, built, device, hp.eval_episodes, 10_000 + config.seed)
    wall = time.perf_counter() - start
    spec.provenance = {
        "algorithm": "dqn", "job_id": config.job_id, "frames": frames, "updates": updates,
        "wall_time_s": round(wall, 2), "device": str(device), "seed": config.seed,
        "eval_mean_return": eval_return, "eval_episodes": hp.eval_episodes,
        "hyperparameters": hp.model_dump(), "command": config.command,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return TrainedPolicy(spec=spec.model_dump(mode="json"), weights=weights_bytes(built),
                         eval_mean_return=eval_return, frames=frames, wall_time_s=wall,
                         device=str(device), cancelled=cancelled)


def _as_sequences(sample, slice_len: int):
    """SliceSampler returns flat slices; the recurrent loss wants ``[batch, time]``."""
    n = sample.numel() - sample.numel() % slice_len
    return sample[:n].reshape(-1, slice_len)
