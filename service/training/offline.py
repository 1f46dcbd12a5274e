"""Offline jobs: learn from a Minari dataset, no env stepped. ``train(config, on_progress,
should_stop) -> TrainedPolicy``.

- ``bc``: behaviour cloning, the negative log-likelihood of the dataset's actions under a
  ``ProbabilisticActor`` (categorical for discrete actions, TanhNormal for box ones); published
  as a probabilistic policy (``deterministic`` takes the mode).
- ``dqn``: offline DQN, the ``discrete_cql`` setup with ``cql_weight`` 0 (its TD loss alone).
- ``discrete_cql``: TorchRL's ``DiscreteCQLLoss`` (TD loss plus the conservative term, weighted
  by ``cql_weight``) on the Q-network DQN serves, with its target network; published as a
  Q-value policy.

The dataset is read with Minari (``read_transitions``) into the replay buffer once
(``DatasetSource``), then the shared loop (``common.train_offpolicy``)
draws ``batch_size`` transitions per update; an offline job's ``total_frames`` counts the
transitions its updates draw (updates x ``batch_size``). With an allow-listed ``env_id`` the
weights are chosen on validation seeds and reported on held-out seeds as for online jobs;
without one, the final weights are published (``eval_mean_return`` null).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyTensorStorage, RandomSampler, TensorDictReplayBuffer
from torchrl.objectives import DiscreteCQLLoss, HardUpdate, SoftUpdate

from service.registry.build import build_policy
from service.registry.spec import PolicySpec
from service.training.common import (
    Batch,
    BatchSize,
    Chosen,
    EvalEpisodes,
    LearningRate,
    LoopResult,
    OffPolicyHyperparameters,
    PeriodicEvaluation,
    Progress,
    StopCheck,
    TrainConfig,
    TrainedPolicy,
    UpdatesPerBatch,
    state_of,
    train_offpolicy,
)
from service.training.imitation import inside_bounds, log_likelihood


class OfflineHyperparameters(OffPolicyHyperparameters):
    lr: LearningRate = 1e-3
    batch_size: BatchSize = 256
    updates_per_batch: UpdatesPerBatch = 100
    init_random_frames: int = Field(0, ge=0, description="Unused offline (the dataset is all there).")
    eval_episodes: EvalEpisodes = 20
    eval_every_frames: int = Field(
        100_000,
        ge=0,
        description="Transitions drawn between periodic evaluations (env_id given); 0 = at the end.",
    )
    cql_weight: float = Field(1.0, ge=0, le=100, description="discrete_cql: weight of the conservative term.")
    target_update: Literal["hard", "soft"] = Field("soft", description="discrete_cql: target network update.")
    target_update_interval: int = Field(500, ge=1, description="discrete_cql: steps between hard updates.")
    tau: float = Field(0.005, gt=0, le=1, description="discrete_cql: soft update rate.")
    max_grad_norm: float = Field(10.0, gt=0, description="Gradient clipping.")


# discrete_cql's own defaults: on the mixed CartPole dataset (benchmarks/offline.py) these, with
# 20,000 updates, gave 500 / 500 / 500 where BC's lr 1e-3 and soft targets gave 226-307
CQL_DEFAULTS: dict[str, Any] = {
    "lr": 3e-4,
    "cql_weight": 3.0,
    "target_update": "hard",
    "target_update_interval": 1000,
}


class OfflineConfig(TrainConfig):
    algorithm: Literal["bc", "discrete_cql", "dqn"]
    dataset: str
    dataset_dir: str | None = None  # the dataset's directory (set by the worker)
    observation: dict[str, Any]  # the dataset's spaces, as policy.json writes them
    action: dict[str, Any]
    hyperparameters: OfflineHyperparameters = Field(default_factory=OfflineHyperparameters)

    @classmethod
    def default_hyperparameters(cls, **kw: Any) -> dict[str, Any]:
        if kw.get("algorithm") == "dqn":  # offline DQN: CQL's setup without the conservative term
            return {**CQL_DEFAULTS, "cql_weight": 0.0}
        return dict(CQL_DEFAULTS) if kw.get("algorithm") == "discrete_cql" else {}


def space_specs(observation_space, action_space) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Minari dataset's gymnasium spaces as policy.json's ``observation`` and ``action``
    (ValueError for spaces a policy cannot act on)."""
    import gymnasium as gym

    if isinstance(observation_space, gym.spaces.Discrete):
        obs = {"type": "discrete", "n": int(observation_space.n)}
    elif isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 1:
        obs = {"shape": list(observation_space.shape), "dtype": "float32"}
    else:
        raise ValueError(f"offline jobs take vector or discrete observations, not {observation_space}")
    if isinstance(action_space, gym.spaces.Discrete):
        return obs, {"type": "discrete", "n": int(action_space.n)}
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        low, high = action_space.low.tolist(), action_space.high.tolist()
        if not all(math.isfinite(v) for v in low + high):
            raise ValueError("a box action space needs finite bounds")
        return obs, {"type": "box", "shape": list(action_space.shape), "low": low, "high": high}
    raise ValueError(f"offline jobs take discrete or box actions, not {action_space}")


def read_transitions(dataset_dir: Path) -> TensorDictBase:
    """Every transition of a Minari dataset, in TorchRL's layout (``observation``, ``action``,
    ``("next", "observation" | "reward" | "terminated" | "truncated" | "done")``), read with
    Minari's own ``MinariDataset`` episode by episode.

    Not TorchRL's ``MinariExperienceReplay(load_from_local_minari=True)``: in torchrl 0.14.1 it
    fills a TensorDict with the episodes and then returns ``memmap_like`` of it, an empty copy
    (every observation, action and reward reads 0; found on this dataset format, see
    ``tests/test_offline.py``); it also finds local datasets only through the process-wide
    ``MINARI_DATASETS_PATH``."""
    from minari import MinariDataset

    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "next", "action", "reward", "term", "trunc")}
    for ep in MinariDataset(Path(dataset_dir) / "data").iterate_episodes():
        obs = np.asarray(ep.observations)
        parts["obs"].append(obs[:-1])
        parts["next"].append(obs[1:])
        parts["action"].append(np.asarray(ep.actions))
        parts["reward"].append(np.asarray(ep.rewards, dtype=np.float32))
        parts["term"].append(np.asarray(ep.terminations, dtype=bool))
        parts["trunc"].append(np.asarray(ep.truncations, dtype=bool))
    if not parts["obs"]:
        return TensorDict({}, batch_size=[0])
    cat = {k: torch.from_numpy(np.concatenate(v)) for k, v in parts.items()}
    n = cat["action"].shape[0]

    def typed(x: torch.Tensor) -> torch.Tensor:  # float32 values, int64 indices
        return x.float() if x.is_floating_point() else x.long()

    observation, next_observation, action = typed(cat["obs"]), typed(cat["next"]), typed(cat["action"])
    term, trunc = cat["term"].reshape(n, 1), cat["trunc"].reshape(n, 1)
    return TensorDict(
        {
            "observation": observation,
            "action": action,
            "next": {
                "observation": next_observation,
                "reward": cat["reward"].reshape(n, 1),
                "terminated": term,
                "truncated": trunc,
                "done": term | trunc,
            },
        },
        batch_size=[n],
    )


class _Offline:
    """What the shared loop reads of an offline algorithm (its policy, buffer and update)."""

    name: str

    def __init__(self, config: OfflineConfig, spec: PolicySpec) -> None:
        self.config = config
        self.hyperparameters = hp = config.hyperparameters
        self.device = torch.device(config.device)
        self.spec = spec
        self.built = build_policy(spec, self.device)
        self.stored_preprocess: list = []
        self.act_policy = self.built.core
        self.collect_policy = self.built.core
        self.sample_size = hp.batch_size
        self.buffer: TensorDictReplayBuffer | None = None

    def fill(self, data: TensorDictBase) -> None:
        self.buffer = TensorDictReplayBuffer(
            storage=LazyTensorStorage(max(1, data.numel()), device=self.device),
            sampler=RandomSampler(),
        )
        self.buffer.extend(data.to(self.device))

    def _step(self, loss: torch.Tensor, params: list) -> torch.Tensor:
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, self.hyperparameters.max_grad_norm, foreach=True)
        self.optim.step()
        return loss.detach()

    def prepare(self, batch: TensorDictBase, index: int) -> TensorDictBase:
        return batch

    def after_batch(self, frames: int) -> dict[str, Any]:
        return {}


class BC(_Offline):
    """Behaviour cloning: maximise log pi(a | s) of the dataset's actions.

    Not TorchRL's ``BCLoss``: in torchrl 0.14 it takes a discrete expert action's cross-entropy
    against the actor's sampled action instead of its logits (a dtype error for categorical
    actors); the NLL below is what it computes for Gaussian actors, for both."""

    name = "bc"

    def __init__(self, config: OfflineConfig) -> None:
        hp = config.hyperparameters
        discrete = config.action["type"] == "discrete"
        spec = PolicySpec.model_validate(
            {
                "kind": "probabilistic",
                "observation": config.observation,
                "action": config.action,
                "network": {"type": "mlp", "num_cells": hp.num_cells, "activation": hp.activation},
                "distribution": "categorical" if discrete else "tanh_normal",
                "env_id": config.env_id,
            }
        )
        super().__init__(config, spec)
        self.params = list(self.built.core.parameters())
        self.optim = torch.optim.Adam(self.params, lr=hp.lr)
        self.bounds = inside_bounds(spec, self.device)

    def update(self, sample: TensorDictBase) -> torch.Tensor:
        obs = sample.select("observation").copy()
        nll = -log_likelihood(self.built, obs, sample["action"], self.bounds).mean()
        return self._step(nll, self.params)


class DiscreteCQL(_Offline):
    """TorchRL's ``DiscreteCQLLoss`` on DQN's Q-network (the policy DQN jobs serve)."""

    name = "discrete_cql"

    def __init__(self, config: OfflineConfig) -> None:
        hp = config.hyperparameters
        if config.action["type"] != "discrete":
            raise ValueError("discrete_cql needs a discrete action space")
        spec = PolicySpec.model_validate(
            {
                "kind": "qvalue",
                "observation": config.observation,
                "action": config.action,
                "network": {"type": "mlp", "num_cells": hp.num_cells, "activation": hp.activation},
                "env_id": config.env_id,
                "exploration": {"epsilon": 0.05},
            }
        )
        super().__init__(config, spec)
        self.name = config.algorithm  # "dqn" from a dataset: cql_weight 0
        self.loss_fn = DiscreteCQLLoss(self.built.core, action_space="categorical", delay_value=True)
        self.loss_fn.make_value_estimator(gamma=hp.gamma)
        if hp.target_update == "hard":
            self.target = HardUpdate(self.loss_fn, value_network_update_interval=hp.target_update_interval)
        else:
            self.target = SoftUpdate(self.loss_fn, tau=hp.tau)
        self.params = list(self.loss_fn.parameters())
        self.optim = torch.optim.Adam(self.params, lr=hp.lr)

    def update(self, sample: TensorDictBase) -> torch.Tensor:
        out = self.loss_fn(sample)
        loss = out["loss_qvalue"] + self.hyperparameters.cql_weight * out["loss_cql"]
        loss = self._step(loss, self.params)
        self.target.step()
        return loss


class DatasetSource:
    """The dataset, stored once; then batches of no new transitions that count the draws of
    ``updates_per_batch`` updates towards ``total_frames``."""

    start_frames = start_updates = 0
    min_buffer = 1

    def __init__(self, algo: _Offline, config: OfflineConfig) -> None:
        data = read_transitions(Path(config.dataset_dir))
        if data.numel() == 0:
            raise ValueError(f"dataset {config.dataset} holds no transitions")
        algo.fill(data)
        self.seeded = data.numel()
        self.per_batch = algo.hyperparameters.updates_per_batch * algo.sample_size
        self.total = config.total_frames

    def batches(self, should_stop: StopCheck) -> Iterator[Batch]:
        counted = 0
        while counted < self.total and not should_stop():
            counted += self.per_batch
            yield Batch([], self.per_batch, [])

    def after_updates(self, frames: int, updates: int, extra: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class FinalWeights:
    """Without an env to evaluate in: the final weights, no return reported."""

    def __init__(self, algo: _Offline) -> None:
        self.algo = algo

    def observe(self, frames: int, point: dict[str, Any], recent: list[float]) -> None:
        pass

    def choose(self, loop: LoopResult) -> Chosen:
        return Chosen(state_of(self.algo.built), "final", math.nan, 0, {"evaluated": False})


def train(
    config: OfflineConfig, on_progress: Progress | None = None, should_stop: StopCheck | None = None
) -> TrainedPolicy:
    start = time.perf_counter()
    algo = BC(config) if config.algorithm == "bc" else DiscreteCQL(config)  # dqn: cql_weight 0
    source = DatasetSource(algo, config)
    choice = PeriodicEvaluation(algo, config) if config.env_id else FinalWeights(algo)
    trained = train_offpolicy(algo, config, on_progress, should_stop, start, source=source, choice=choice)
    trained.spec.provenance["dataset"] = config.dataset
    trained.spec.provenance["dataset_transitions"] = source.seeded
    return trained
