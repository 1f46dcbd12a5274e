"""What every off-policy trainer shares: the env, evaluation, the collect/learn loop, and the
choice and packaging of the published weights.

An algorithm (``dqn.DQN``, ``actor_critic.ActorCritic``) implements ``OffPolicyAlgorithm``: its
policy and replay buffer, the policy it collects with, and ``update`` (one gradient step);
``train_offpolicy`` runs the loop below, the same for all:

    collect a batch -> store it -> ``updates_per_batch`` x ``update(sample)`` -> report
    (-> every ``eval_every_frames``: evaluate on validation seeds, keep the best weights)
    at the end: choose final or best weights on validation seeds, report on held-out seeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.collectors import Collector
from torchrl.data import ReplayBuffer
from torchrl.envs import RewardSum, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type

from service.envs import has_action_mask, make_env
from service.registry.build import BuiltPolicy, build_policy, weights_bytes
from service.registry.preprocess import make_transform
from service.registry.spec import Activation, PolicySpec, PreprocessSpec

Progress = Callable[[dict[str, Any]], None]
StopCheck = Callable[[], bool]
# Evaluation episodes reset with seeds from two disjoint ranges. Validation seeds serve the
# periodic evaluations and the choice between final and best weights; the reported
# ``eval_mean_return`` comes from held-out seeds that nothing was chosen on.
VALIDATION_SEED = 10_000
HELDOUT_SEED = 20_000
PERIODIC_EPISODES = 5


# Constrained types shared by every trainer's hyperparameters; subclasses change only defaults.
LayerSizes = Annotated[list[int], Field(min_length=1, max_length=4, description="Hidden layers of the MLPs.")]
LearningRate = Annotated[float, Field(gt=0, le=1, description="Adam learning rate.")]
BatchSize = Annotated[int, Field(ge=1, le=4096, description="Transitions (or sequences) per update.")]
FramesPerBatch = Annotated[int, Field(ge=1, le=10_000, description="Frames collected per batch.")]
UpdatesPerBatch = Annotated[int, Field(ge=1, le=10_000, description="Gradient steps per batch.")]
NumEnvs = Annotated[
    int,
    Field(
        ge=1, le=64, description="Env copies stepped together in one process (frames_per_batch a multiple)."
    ),
]
EvalEpisodes = Annotated[int, Field(ge=1, le=200, description="Deterministic episodes at the end.")]


class OffPolicyHyperparameters(BaseModel):
    """What the shared loop (``train_offpolicy``) reads; each algorithm adds its own knobs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_cells: LayerSizes = [256, 256]
    activation: Activation = Field("relu", description="MLP activation.")
    lr: LearningRate = 3e-4
    gamma: float = Field(0.99, gt=0, le=1, description="Discount factor.")
    batch_size: BatchSize = 256
    buffer_size: int = Field(100_000, ge=100, le=2_000_000, description="Replay capacity (frames).")
    frames_per_batch: FramesPerBatch = 100
    updates_per_batch: UpdatesPerBatch = 100
    num_envs: NumEnvs = 1
    init_random_frames: int = Field(1000, ge=0, description="Uniform-random frames before learning.")
    eval_episodes: EvalEpisodes = 10
    eval_every_frames: int = Field(
        5000,
        ge=0,
        description="Periodic evaluation (5 episodes); the best weights are kept. 0 = only at the end.",
    )

    @model_validator(mode="after")
    def _whole_steps(self) -> OffPolicyHyperparameters:
        if self.frames_per_batch % self.num_envs:
            raise ValueError(
                f"frames_per_batch ({self.frames_per_batch}) must be a multiple of num_envs "
                f"({self.num_envs}): each batch steps every env copy the same number of times"
            )
        return self


class TrainConfig(BaseModel):
    """One training run (the algorithm's hyperparameters are in the subclass)."""

    model_config = ConfigDict(extra="forbid")

    env_id: str | None = None  # None: a job fed by client sessions (dqn, source "sessions")
    total_frames: int = Field(50_000, ge=1)
    seed: int = 0
    device: str = "cpu"
    job_id: str | None = None
    command: str | None = None

    @classmethod
    def default_hyperparameters(cls, **kw: Any) -> dict[str, Any]:
        """Defaults that depend on the run (e.g. recurrent or not); overridden by the request."""
        return {}

    @classmethod
    def with_defaults(cls, hyperparameters: dict | None = None, **kw: Any):
        """The config with the run's defaults, overridden by ``hyperparameters``."""
        values = {**cls.default_hyperparameters(**kw), **(hyperparameters or {})}
        hp_class = cls.model_fields["hyperparameters"].annotation
        return cls(hyperparameters=hp_class(**values), **kw)


@dataclass
class TrainedPolicy:
    spec: PolicySpec  # with its provenance, as published
    weights: bytes
    eval_mean_return: float
    frames: int
    wall_time_s: float
    device: str
    cancelled: bool


class OffPolicyAlgorithm(Protocol):
    """What ``train_offpolicy`` needs from an algorithm.

    Attributes:
        name: the algorithm's name in provenance (``dqn``, ``sac``, ``td3``).
        spec: the served policy's spec; ``built`` its modules (the weights that get published).
        hyperparameters: the shared loop's knobs (and the algorithm's own).
        collect_policy: the exploring policy the collector runs.
        buffer: the replay buffer the loop fills and samples.
        stored_preprocess: the part of the spec's preprocessing the training env applies (the
            observation the buffer stores); the rest runs inside ``act_policy``.
        act_policy: the deterministic policy on the env's observation (``built.core`` after the
            rest of the preprocessing).
    """

    name: str
    spec: PolicySpec
    built: BuiltPolicy
    hyperparameters: OffPolicyHyperparameters
    collect_policy: TensorDictModuleBase
    buffer: ReplayBuffer
    stored_preprocess: list[PreprocessSpec]
    act_policy: TensorDictModuleBase

    def prepare(self, batch: TensorDictBase, index: int) -> TensorDictBase:
        """A collected batch (``[*envs, time]``) made ready to store (e.g. sequence ids)."""
        ...

    def update(self, sample: TensorDictBase) -> torch.Tensor:
        """One gradient step on ``sample``; returns the (detached) loss."""
        ...

    def after_batch(self, frames: int) -> dict[str, Any]:
        """Schedules stepped by ``frames`` collected frames; extra progress fields."""
        ...


def train_env(
    env_id: str,
    built: BuiltPolicy,
    device: torch.device,
    num_envs: int = 1,
    preprocess: list[PreprocessSpec] | None = None,
) -> TransformedEnv:
    """The allow-listed env with ``preprocess`` (a spec's TorchRL transforms, applied to
    ``"observation"``), the LSTM primer (recurrent policies) and episode returns."""
    env = make_env(env_id, device=str(device), trackers=built.lstm is not None, num_envs=num_envs)
    for entry in preprocess or []:
        env.append_transform(make_transform(entry))
    if built.lstm is not None:
        env.append_transform(built.lstm.make_tensordict_primer())
    env.append_transform(RewardSum())
    return env


def evaluate(
    env_id: str,
    built: BuiltPolicy,
    device: torch.device,
    episodes: int,
    seed: int = VALIDATION_SEED,
    preprocess: list[PreprocessSpec] | None = None,
    policy: TensorDictModuleBase | None = None,
) -> float:
    """Mean return of deterministic episodes (seeds ``seed``, ``seed+1``…) of ``policy``
    (``built.core`` unless given) in the env with ``preprocess`` applied."""
    env = train_env(env_id, built, device, preprocess=preprocess)
    policy = built.core if policy is None else policy
    returns = []
    try:
        for i in range(episodes):
            env.set_seed(seed + i)
            with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
                td = env.rollout(100_000, policy, break_when_any_done=True)
            returns.append(float(td["next", "reward"].sum()))
    finally:
        env.close()
    return sum(returns) / len(returns)


@dataclass
class LoopResult:
    frames: int
    updates: int
    cancelled: bool
    best_state: dict[str, torch.Tensor] | None = None  # weights at the best periodic evaluation
    best_frames: int | None = None


def state_of(built: BuiltPolicy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in built.core.state_dict().items()}


def run_offpolicy(
    algo: OffPolicyAlgorithm,
    collector: Collector,
    *,
    total_frames: int,
    evaluate_now: Callable[[], float],
    on_progress: Progress | None = None,
    should_stop: StopCheck | None = None,
) -> LoopResult:
    """Collect a batch, store it, learn ``updates_per_batch`` times, report; until done/stopped.

    Every ``eval_every_frames`` the policy is evaluated (``evaluate_now``) and the weights of
    the best evaluation are kept (like SB3's EvalCallback ``best_model``; on a tie the later
    weights, trained longer).
    """
    hp, buffer = algo.hyperparameters, algo.buffer
    start = time.perf_counter()
    frames = episodes = updates = batches = 0
    best_return, best_state, best_frames = -math.inf, None, None
    recent: list[float] = []
    last_loss: torch.Tensor | None = None  # read once per batch: a float() per update syncs
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
            data = algo.prepare(data, batches).reshape(-1)
            batches += 1
            buffer.extend(data)
            if frames >= hp.init_random_frames:
                # One draw for the whole batch of updates, cut into minibatches: the same
                # distribution as a draw per update (uniform, with replacement, from a buffer
                # that does not change until the next batch), one storage gather instead of many.
                size = buffer.batch_size
                draw = buffer.sample(size * hp.updates_per_batch)
                for i in range(hp.updates_per_batch):
                    last_loss = algo.update(draw[i * size : (i + 1) * size])
                    updates += 1
            collector.update_policy_weights_()
            now = time.perf_counter() - start
            point: dict[str, Any] = {
                "frames": frames,
                "total_frames": total_frames,
                "episodes": episodes,
                "mean_return": sum(recent) / len(recent) if recent else None,
                "loss": None if last_loss is None else float(last_loss),
                "epsilon": None,
                "fps": frames / now,
                "time_s": now,
                **algo.after_batch(data.numel()),
            }
            if frames >= next_eval:
                point["eval_mean_return"] = evaluate_now()
                next_eval += hp.eval_every_frames
                if point["eval_mean_return"] >= best_return:
                    best_return, best_state, best_frames = (
                        point["eval_mean_return"],
                        state_of(algo.built),
                        frames,
                    )
            if on_progress:
                on_progress(point)
            if should_stop and should_stop():
                cancelled = True
                break
    finally:
        collector.shutdown()
    return LoopResult(frames, updates, cancelled, best_state, best_frames)


@dataclass(frozen=True)
class Selection:
    """The published weights: which candidate, its validation and held-out returns."""

    state: dict[str, torch.Tensor]
    label: str
    validation: dict[str, float]  # candidate label -> validation mean return
    heldout_return: float


def select_weights(
    spec: PolicySpec,
    env_id: str,
    device: torch.device,
    candidates: dict[str, dict[str, torch.Tensor]],
    episodes: int,
) -> Selection:
    """Choose among ``candidates`` (label -> weights) on validation seeds; report the chosen one on
    held-out seeds. Works on a module of its own: the trained module is left as it is."""
    scorer = build_policy(spec, device, action_mask=has_action_mask(env_id))
    validation = {}
    pre = spec.preprocess  # the served module, after the spec's whole preprocessing: as served
    for label, state in candidates.items():
        scorer.core.load_state_dict(state)
        validation[label] = evaluate(env_id, scorer, device, episodes, VALIDATION_SEED, pre)
    # the first candidate (the final weights) wins ties
    label = max(validation, key=lambda k: (validation[k], k == next(iter(candidates))))
    scorer.core.load_state_dict(candidates[label])
    heldout = evaluate(env_id, scorer, device, episodes, HELDOUT_SEED, pre)
    return Selection(candidates[label], label, validation, heldout)


def package(algo: OffPolicyAlgorithm, config: TrainConfig, loop: LoopResult, start: float) -> TrainedPolicy:
    """Choose the published weights (unless cancelled) and package spec + provenance + weights.

    Pure with respect to ``algo``: its module and spec are not changed.
    """
    device = torch.device(config.device)
    episodes = algo.hyperparameters.eval_episodes
    final = state_of(algo.built)
    provenance: dict[str, Any] = {}
    if loop.cancelled:
        state, label, heldout = final, "final", float("nan")
    else:
        candidates = {"final": final}
        if loop.best_state is not None:
            candidates[f"best periodic evaluation at {loop.best_frames}"] = loop.best_state
        chosen = select_weights(algo.spec, config.env_id, device, candidates, episodes)
        state, label, heldout = chosen.state, chosen.label, chosen.heldout_return
        provenance["validation_mean_return"] = chosen.validation
        provenance["validation_seeds"] = [VALIDATION_SEED, VALIDATION_SEED + episodes - 1]
        provenance["eval_seeds"] = [HELDOUT_SEED, HELDOUT_SEED + episodes - 1]
    wall = time.perf_counter() - start
    published = build_policy(algo.spec, device)
    published.core.load_state_dict(state)
    spec = algo.spec.model_copy(deep=True)
    spec.provenance = {
        "algorithm": algo.name,
        "job_id": config.job_id,
        "frames": loop.frames,
        "updates": loop.updates,
        "wall_time_s": round(wall, 2),
        "device": str(device),
        "seed": config.seed,
        "eval_mean_return": heldout,
        "eval_episodes": episodes,
        **provenance,
        "hyperparameters": algo.hyperparameters.model_dump(),
        "command": config.command,
        "weights": label,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return TrainedPolicy(
        spec=spec,
        weights=weights_bytes(published),
        eval_mean_return=heldout,
        frames=loop.frames,
        wall_time_s=wall,
        device=str(device),
        cancelled=loop.cancelled,
    )


@contextmanager
def flushed_denormals():
    """Denormal floats flushed to zero in this thread, and the thread's setting restored after.

    Denormals (Adam's moments of dead ReLU units decaying toward zero) are ~100x slower on x86
    CPUs: without this, fused Adam took 0.5 ms of a 1.9 ms DQN update. Flushing changes values
    below ~1e-38 only. The flag is CPU state of the calling thread (the worker thread or the
    CLI), so it never reaches the server's event loop, and it is put back because a library
    caller's thread may rely on IEEE denormals (hypothesis refuses to run without them).
    """
    was_on = bool((torch.tensor([1e-40]) * 1.0)[0] == 0)  # a denormal reads as zero when on
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def train_offpolicy(
    algo: OffPolicyAlgorithm,
    config: TrainConfig,
    on_progress: Progress | None = None,
    should_stop: StopCheck | None = None,
    start: float | None = None,
) -> TrainedPolicy:
    """Env + collector, the loop, and the published weights: the same for every algorithm."""
    start = time.perf_counter() if start is None else start
    with flushed_denormals():
        hp = algo.hyperparameters
        device = torch.device(config.device)
        stored = algo.stored_preprocess  # applied by the env: what the replay buffer stores
        env = train_env(config.env_id, algo.built, device, hp.num_envs, stored)
        env.set_seed(config.seed)
        collector = Collector(
            env,
            algo.collect_policy,
            frames_per_batch=hp.frames_per_batch,
            total_frames=config.total_frames,
            init_random_frames=hp.init_random_frames,
            device=device,
            # train_env already has what the policy reads (InitTracker + primer when recurrent);
            # torchrl 0.15 would otherwise start appending transforms on its own.
            auto_register_policy_transforms=False,
        )
        try:
            loop = run_offpolicy(
                algo,
                collector,
                total_frames=config.total_frames,
                evaluate_now=lambda: evaluate(
                    config.env_id,
                    algo.built,
                    device,
                    PERIODIC_EPISODES,
                    VALIDATION_SEED,
                    stored,
                    algo.act_policy,
                ),
                on_progress=on_progress,
                should_stop=should_stop,
            )
        finally:
            env.close()
        return package(algo, config, loop, start)
