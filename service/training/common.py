"""What every off-policy trainer shares: env, evaluation, the collect/learn loop, the artifact."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tensordict import TensorDictBase
from torchrl.collectors import Collector
from torchrl.data import ReplayBuffer
from torchrl.envs import RewardSum, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type

from service.envs import make_env
from service.registry.build import BuiltPolicy, weights_bytes
from service.registry.spec import PolicySpec

Progress = Callable[[dict[str, Any]], None]
EVAL_SEED = 10_000


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
    activation: Literal["relu", "tanh", "elu"] = Field("relu", description="MLP activation.")
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

    env_id: str
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
    spec: dict[str, Any]
    weights: bytes
    eval_mean_return: float
    frames: int
    wall_time_s: float
    device: str
    cancelled: bool


def train_env(env_id: str, built: BuiltPolicy, device: torch.device, num_envs: int = 1) -> TransformedEnv:
    """The allow-listed env with the LSTM primer (recurrent policies) and episode returns."""
    env = make_env(env_id, device=str(device), trackers=built.lstm is not None, num_envs=num_envs)
    if built.lstm is not None:
        env.append_transform(built.lstm.make_tensordict_primer())
    env.append_transform(RewardSum())
    return env


def evaluate(
    env_id: str, built: BuiltPolicy, device: torch.device, episodes: int, seed: int = EVAL_SEED
) -> float:
    """Mean return of deterministic episodes (seeds ``seed``, ``seed+1``…)."""
    env = train_env(env_id, built, device)
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


@dataclass
class LoopResult:
    frames: int
    updates: int
    cancelled: bool
    best_state: dict[str, torch.Tensor] | None = None  # weights at the best periodic evaluation
    best_frames: int | None = None


def run_offpolicy(
    *,
    collector: Collector,
    buffer: ReplayBuffer,
    total_frames: int,
    init_random_frames: int,
    updates_per_batch: int,
    update: Callable[[TensorDictBase], torch.Tensor],
    start: float,
    prepare: Callable[[TensorDictBase, int], TensorDictBase] | None = None,
    after_batch: Callable[[int], dict[str, Any]] | None = None,
    eval_fn: Callable[[], float] | None = None,
    eval_every_frames: int = 0,
    on_progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    snapshot: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> LoopResult:
    """Collect a batch, store it, learn ``updates_per_batch`` times, report; until done/stopped.

    With ``eval_every_frames`` and ``snapshot``, the weights of the best periodic evaluation are
    kept (like SB3's EvalCallback ``best_model``; on a tie the later weights, trained longer);
    ``artifact`` publishes them if they beat the final weights on the final evaluation.
    """
    frames = episodes = updates = batches = 0
    best_return, best_state, best_frames = -math.inf, None, None
    recent: list[float] = []
    last_loss: torch.Tensor | None = None  # read once per batch: a float() per update syncs
    next_eval = eval_every_frames or math.inf
    cancelled = False
    try:
        for data in collector:
            frames += data.numel()
            done = data["next", "done"].reshape(-1)
            if done.any():
                finished = data["next", "episode_reward"].reshape(-1)[done].tolist()
                episodes += len(finished)
                recent = (recent + finished)[-20:]
            if prepare is not None:
                data = prepare(data, batches)  # still [*envs, time]
            data = data.reshape(-1)
            batches += 1
            buffer.extend(data)
            if frames >= init_random_frames:
                # One draw for the whole batch of updates, cut into minibatches: the same
                # distribution as a draw per update (uniform, with replacement, from a buffer
                # that does not change until the next batch), one storage gather instead of many.
                size = buffer.batch_size
                draw = buffer.sample(size * updates_per_batch)
                for i in range(updates_per_batch):
                    last_loss = update(draw[i * size : (i + 1) * size])
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
            }
            if after_batch is not None:
                point.update(after_batch(data.numel()))
            if eval_fn is not None and frames >= next_eval:
                point["eval_mean_return"] = eval_fn()
                next_eval += eval_every_frames
                if snapshot is not None and point["eval_mean_return"] >= best_return:
                    best_return, best_state = point["eval_mean_return"], snapshot()
                    best_frames = frames
            if on_progress:
                on_progress(point)
            if should_stop and should_stop():
                cancelled = True
                break
    finally:
        collector.shutdown()
    return LoopResult(frames, updates, cancelled, best_state, best_frames)


def snapshot_of(built: BuiltPolicy) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {k: v.detach().clone() for k, v in built.core.state_dict().items()}


def artifact(
    *,
    algorithm: str,
    spec: PolicySpec,
    built: BuiltPolicy,
    config: TrainConfig,
    hyperparameters: BaseModel,
    eval_episodes: int,
    loop: LoopResult,
    start: float,
) -> TrainedPolicy:
    """Evaluate (unless cancelled) and package spec + provenance + safetensors weights."""
    device = torch.device(config.device)
    eval_return = (
        float("nan")
        if loop.cancelled
        else evaluate(config.env_id, built, device, eval_episodes, EVAL_SEED + config.seed)
    )
    selected = "final"
    if loop.best_state is not None and not loop.cancelled:
        final_state = {k: v.detach().clone() for k, v in built.core.state_dict().items()}
        built.core.load_state_dict(loop.best_state)
        best_return = evaluate(config.env_id, built, device, eval_episodes, EVAL_SEED + config.seed)
        if best_return > eval_return:
            eval_return, selected = best_return, f"best periodic evaluation at {loop.best_frames}"
        else:
            built.core.load_state_dict(final_state)
    wall = time.perf_counter() - start
    spec.provenance = {
        "algorithm": algorithm,
        "job_id": config.job_id,
        "frames": loop.frames,
        "updates": loop.updates,
        "wall_time_s": round(wall, 2),
        "device": str(device),
        "seed": config.seed,
        "eval_mean_return": eval_return,
        "eval_episodes": eval_episodes,
        "hyperparameters": hyperparameters.model_dump(),
        "command": config.command,
        "weights": selected,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return TrainedPolicy(
        spec=spec.model_dump(mode="json"),
        weights=weights_bytes(built),
        eval_mean_return=eval_return,
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
    *,
    algorithm: str,
    config: TrainConfig,
    hyperparameters: OffPolicyHyperparameters,
    spec: PolicySpec,
    built: BuiltPolicy,
    collect_policy: Callable,
    buffer: ReplayBuffer,
    update: Callable[[TensorDictBase], torch.Tensor],
    start: float,
    on_progress: Progress | None,
    should_stop: Callable[[], bool] | None,
    prepare: Callable[[TensorDictBase, int], TensorDictBase] | None = None,
    after_batch: Callable[[int], dict[str, Any]] | None = None,
) -> TrainedPolicy:
    """Env + collector, the loop, and the artifact: what every trainer does the same way."""
    with flushed_denormals():
        hp = hyperparameters
        device = torch.device(config.device)
        env = train_env(config.env_id, built, device, hp.num_envs)
        env.set_seed(config.seed)
        collector = Collector(
            env,
            collect_policy,
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
                collector=collector,
                buffer=buffer,
                total_frames=config.total_frames,
                init_random_frames=hp.init_random_frames,
                updates_per_batch=hp.updates_per_batch,
                update=update,
                start=start,
                prepare=prepare,
                after_batch=after_batch,
                eval_fn=lambda: evaluate(config.env_id, built, device, 5, EVAL_SEED),
                eval_every_frames=hp.eval_every_frames,
                on_progress=on_progress,
                should_stop=should_stop,
                snapshot=snapshot_of(built),
            )
        finally:
            env.close()
        return artifact(
            algorithm=algorithm,
            spec=spec,
            built=built,
            config=config,
            hyperparameters=hyperparameters,
            eval_episodes=hp.eval_episodes,
            loop=loop,
            start=start,
        )
