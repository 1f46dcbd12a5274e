"""What every off-policy trainer shares: the env, evaluation, the collect/learn loop, and the
choice and packaging of the published weights.

An algorithm (``dqn.DQN``, ``actor_critic.ActorCritic``) implements ``OffPolicyAlgorithm``: its
policy and replay buffer, the policy it collects with, and ``update`` (one gradient step);
``train_offpolicy`` runs the one loop below, the same for all, over a ``DataSource`` (a
collector over env copies, or the transitions clients report: ``from_sessions``) with a
``WeightChoice``:

    a batch from the source -> store it -> ``updates_per_batch`` x ``update(sample)`` -> report
    (-> the choice observes: every ``eval_every_frames`` an evaluation on validation seeds, or
    the clients' reported returns, and keeps the best weights)
    at the end: the choice picks final or best weights; ``package`` publishes them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.collectors import Collector
from torchrl.data import ReplayBuffer
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from service.envs import has_action_mask, make_env
from service.registry.build import BuiltPolicy, build_policy, state_bytes
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
SEGMENT = "segment"  # recurrent buffers: the SliceSampler's trajectory key (one id a stretch)


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
    weights: bytes | dict[str, bytes]  # safetensors, or a program policy's archives by file name
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
        sample_size: transitions (recurrent: steps of whole sequences) per update.
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
    sample_size: int
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
) -> EnvBase:
    """The allow-listed env with ``preprocess`` (a spec's TorchRL transforms, applied to
    ``"observation"``) and the LSTM primer (recurrent policies); with neither, the bare TorchRL
    wrapper (episode returns are ``EpisodeReturns``', not a ``RewardSum``'s: each transform costs
    every step)."""
    transforms = [make_transform(entry) for entry in preprocess or []]
    if built.lstm is not None:
        transforms.append(built.lstm.make_tensordict_primer())
    recurrent = built.lstm is not None
    env = make_env(env_id, device=str(device), trackers=recurrent, num_envs=num_envs, bare=not transforms)
    for transform in transforms:
        env.append_transform(transform)
    return env


class EpisodeReturns:
    """Each env copy's running return across collected batches, and the returns of the
    episodes a batch ends (env by env, in time order)."""

    def __init__(self) -> None:
        self.carry: np.ndarray | None = None

    def finished(self, data: TensorDictBase) -> list[float]:
        steps = data.shape[-1] if data.batch_dims else 1
        reward = data["next", "reward"].reshape(-1, steps).to(torch.float64).cpu().numpy()
        done = data["next", "done"].reshape(-1, steps).cpu().numpy()
        if self.carry is None:
            self.carry = np.zeros(reward.shape[0])
        out: list[float] = []
        for env, (r, d) in enumerate(zip(reward, done, strict=True)):
            total = self.carry[env] + np.cumsum(r)
            ends = np.flatnonzero(d)
            if ends.size:
                at = total[ends]
                out += (at - np.concatenate([[0.0], at[:-1]])).tolist()
                self.carry[env] = total[-1] - at[-1]
            else:
                self.carry[env] = total[-1]
        return out


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
    recent: list[float]  # returns of the last episodes (at most RECENT)


def state_of(built: BuiltPolicy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in built.core.state_dict().items()}


RECENT = 20  # episodes in the running mean of training returns


@dataclass
class Batch:
    """What a data source hands the loop: transitions to store (prepared, flat, in order), the
    frames the batch counts towards ``total_frames``, and the returns of the episodes it ended."""

    store: list[TensorDictBase]
    frames: int
    finished: list[float]


class DataSource(Protocol):
    """Where the loop's batches come from: a collector over env copies (``EnvSource``), or the
    transitions clients report through sessions (``from_sessions.SessionsSource``).

    Attributes:
        start_frames / start_updates: where a resumed run starts counting.
        seeded: transitions in the buffer before the first batch (an offline start); they count
            towards ``init_random_frames``, not towards ``total_frames``.
        min_buffer: transitions the buffer must hold before the first draw.
    """

    start_frames: int
    start_updates: int
    seeded: int
    min_buffer: int

    def batches(self, should_stop: StopCheck) -> Iterator[Batch]:
        """Batches until ``total_frames`` are counted (or ``should_stop``, while waiting)."""
        ...

    def after_updates(self, frames: int, updates: int, extra: dict[str, Any]) -> None:
        """The acting policy after a batch's updates (the collector's weights, or the weights
        and position the API's sessions act with)."""
        ...

    def close(self) -> None: ...


@dataclass
class Chosen:
    """The published weights: which, the return reported for them, provenance to add."""

    state: dict[str, torch.Tensor]
    label: str
    reported_return: float
    episodes: int
    provenance: dict[str, Any]


class WeightChoice(Protocol):
    """How the published weights are chosen: periodic evaluation on validation seeds then a
    held-out report (``PeriodicEvaluation``), or client-reported returns
    (``from_sessions.ClientReturns``)."""

    def observe(self, frames: int, point: dict[str, Any], recent: list[float]) -> None:
        """After each batch (may add ``eval_mean_return`` to the progress ``point``)."""
        ...

    def choose(self, loop: LoopResult) -> Chosen: ...


def run_offpolicy(
    algo: OffPolicyAlgorithm,
    source: DataSource,
    choice: WeightChoice,
    *,
    total_frames: int,
    on_progress: Progress | None = None,
    should_stop: StopCheck | None = None,
) -> LoopResult:
    """The one off-policy loop: a batch from the source, stored; ``updates_per_batch`` updates
    once the buffer is ready; schedules stepped; the acting policy told; progress; until the
    source has counted ``total_frames`` or ``should_stop``."""
    hp, buffer = algo.hyperparameters, algo.buffer
    should_stop = should_stop or (lambda: False)
    start = time.perf_counter()
    frames, updates = source.start_frames, source.start_updates
    episodes = 0
    recent: list[float] = []
    last_loss: torch.Tensor | None = None  # read once per batch: a float() per update syncs
    cancelled = False
    for batch in source.batches(should_stop):
        frames += batch.frames
        if batch.finished:
            episodes += len(batch.finished)
            recent = (recent + batch.finished)[-RECENT:]
        for part in batch.store:
            buffer.extend(part)
        if frames + source.seeded >= hp.init_random_frames and len(buffer) >= source.min_buffer:
            # One draw for the whole batch of updates, cut into minibatches: the same
            # distribution as a draw per update (uniform, with replacement, from a buffer
            # that does not change until the next batch), one storage gather instead of many.
            size = algo.sample_size
            draw = buffer.sample(size * hp.updates_per_batch)
            for i in range(hp.updates_per_batch):
                last_loss = algo.update(draw[i * size : (i + 1) * size])
                updates += 1
        extra = algo.after_batch(batch.frames)
        source.after_updates(frames, updates, extra)
        now = time.perf_counter() - start
        point = progress_point(
            frames, total_frames, episodes, recent, last_loss, frames - source.start_frames, now
        )
        point.update(extra)
        choice.observe(frames, point, recent)
        if on_progress:
            on_progress(point)
        if should_stop():
            cancelled = True
            break
    else:
        cancelled = should_stop() and frames < total_frames  # stopped while waiting for data
    return LoopResult(frames, updates, cancelled, recent)


def progress_point(
    frames: int,
    total_frames: int,
    episodes: int,
    recent: list[float],
    loss: torch.Tensor | None,
    new_frames: int,
    now: float,
) -> dict[str, Any]:
    """One progress point of a training loop (what jobs record and the dashboard plots)."""
    return {
        "frames": frames,
        "total_frames": total_frames,
        "episodes": episodes,
        "mean_return": sum(recent) / len(recent) if recent else None,
        "loss": None if loss is None else float(loss),
        "epsilon": None,
        "fps": new_frames / now,
        "time_s": now,
    }


class EnvSource:
    """Batches collected by a TorchRL ``Collector`` over ``num_envs`` copies of the job's env
    (the part of the spec's preprocessing the buffer stores applied by the env)."""

    start_frames = start_updates = seeded = 0
    min_buffer = 1

    def __init__(self, algo: OffPolicyAlgorithm, config: TrainConfig) -> None:
        hp = algo.hyperparameters
        self.algo = algo
        device = torch.device(config.device)
        self.env = train_env(config.env_id, algo.built, device, hp.num_envs, algo.stored_preprocess)
        self.env.set_seed(config.seed)
        self.collector = Collector(
            self.env,
            algo.collect_policy,
            frames_per_batch=hp.frames_per_batch,
            total_frames=config.total_frames,
            init_random_frames=hp.init_random_frames,
            device=device,
            # train_env already has what the policy reads (InitTracker + primer when recurrent);
            # torchrl 0.15 would otherwise start appending transforms on its own.
            auto_register_policy_transforms=False,
        )
        self.returns = EpisodeReturns()

    def batches(self, should_stop: StopCheck) -> Iterator[Batch]:
        for index, data in enumerate(self.collector):
            finished = self.returns.finished(data)
            yield Batch([self.algo.prepare(data, index).reshape(-1)], data.numel(), finished)

    def after_updates(self, frames: int, updates: int, extra: dict[str, Any]) -> None:
        self.collector.update_policy_weights_()

    def close(self) -> None:
        try:
            self.collector.shutdown()
        finally:
            self.env.close()


class PeriodicEvaluation:
    """Every ``eval_every_frames`` the policy plays ``PERIODIC_EPISODES`` deterministic episodes
    on validation seeds and the best evaluation's weights are kept (like SB3's EvalCallback
    ``best_model``; on a tie the later, trained longer). At the end the final and the best
    weights compete on validation seeds and the winner is reported on held-out seeds."""

    def __init__(self, algo: OffPolicyAlgorithm, config: TrainConfig) -> None:
        self.algo, self.config = algo, config
        self.device = torch.device(config.device)
        every = algo.hyperparameters.eval_every_frames
        self.every, self.next_eval = every, every or math.inf
        self.best_return, self.best_state, self.best_frames = -math.inf, None, None

    def observe(self, frames: int, point: dict[str, Any], recent: list[float]) -> None:
        if frames < self.next_eval:
            return
        algo = self.algo
        point["eval_mean_return"] = evaluate(
            self.config.env_id,
            algo.built,
            self.device,
            PERIODIC_EPISODES,
            VALIDATION_SEED,
            algo.stored_preprocess,
            algo.act_policy,
        )
        self.next_eval += self.every
        if point["eval_mean_return"] >= self.best_return:
            self.best_return, self.best_state, self.best_frames = (
                point["eval_mean_return"],
                state_of(algo.built),
                frames,
            )

    def choose(self, loop: LoopResult) -> Chosen:
        algo, episodes = self.algo, self.algo.hyperparameters.eval_episodes
        final = state_of(algo.built)
        if loop.cancelled:
            return Chosen(final, "final", float("nan"), episodes, {})
        candidates = {"final": final}
        if self.best_state is not None:
            candidates[f"best periodic evaluation at {self.best_frames}"] = self.best_state
        fresh = getattr(algo, "fresh_policy", None)  # an algorithm whose policy no spec builds
        scorer = fresh() if fresh is not None else None
        chosen = select_weights(algo.spec, self.config.env_id, self.device, candidates, episodes, scorer)
        provenance = {
            "validation_mean_return": chosen.validation,
            "validation_seeds": [VALIDATION_SEED, VALIDATION_SEED + episodes - 1],
            "eval_seeds": [HELDOUT_SEED, HELDOUT_SEED + episodes - 1],
        }
        return Chosen(chosen.state, chosen.label, chosen.heldout_return, episodes, provenance)


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
    scorer: BuiltPolicy | None = None,
) -> Selection:
    """Choose among ``candidates`` (label -> weights) on validation seeds; report the chosen one on
    held-out seeds. Works on a module of its own (``scorer``, default: built from ``spec``): the
    trained module is left as it is."""
    if scorer is None:
        scorer = build_policy(spec, device, action_mask=has_action_mask(env_id))
    validation = {}
    pre = spec.preprocess if spec is not None else []  # the whole preprocessing: as served
    for label, state in candidates.items():
        scorer.core.load_state_dict(state)
        validation[label] = evaluate(env_id, scorer, device, episodes, VALIDATION_SEED, pre)
    # the first candidate (the final weights) wins ties
    label = max(validation, key=lambda k: (validation[k], k == next(iter(candidates))))
    scorer.core.load_state_dict(candidates[label])
    heldout = evaluate(env_id, scorer, device, episodes, HELDOUT_SEED, pre)
    return Selection(candidates[label], label, validation, heldout)


def package(
    algo: OffPolicyAlgorithm, config: TrainConfig, loop: LoopResult, chosen: Chosen, start: float
) -> TrainedPolicy:
    """The spec with its provenance and the chosen weights as safetensors — or, from an
    algorithm with an ``export(state)`` (a policy no declarative spec describes), its program
    spec and archives; the trained module is not changed."""
    wall = time.perf_counter() - start
    export = getattr(algo, "export", None)
    if export is not None:
        spec, files = export(chosen.state)
    else:
        spec, files = algo.spec.model_copy(deep=True), state_bytes(chosen.state)
    spec.provenance = {
        "algorithm": algo.name,
        "job_id": config.job_id,
        "frames": loop.frames,
        "updates": loop.updates,
        "wall_time_s": round(wall, 2),
        "device": str(torch.device(config.device)),
        "seed": config.seed,
        "eval_mean_return": chosen.reported_return,
        "eval_episodes": chosen.episodes,
        **chosen.provenance,
        "hyperparameters": algo.hyperparameters.model_dump(),
        "command": config.command,
        "weights": chosen.label,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return TrainedPolicy(
        spec=spec,
        weights=files,
        eval_mean_return=chosen.reported_return,
        frames=loop.frames,
        wall_time_s=wall,
        device=str(torch.device(config.device)),
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
    source: DataSource | None = None,
    choice: WeightChoice | None = None,
    run: Callable[..., LoopResult] | None = None,
) -> TrainedPolicy:
    """The loop over ``source`` (default: a collector over the job's env), the weights
    ``choice`` picks (default: periodic evaluation, held-out report), packaged: the same for
    every algorithm and data source. ``run`` is the loop (default ``run_offpolicy``; PPO passes
    its on-policy loop)."""
    run = run or run_offpolicy
    start = time.perf_counter() if start is None else start
    with flushed_denormals():
        source = source or EnvSource(algo, config)
        choice = choice or PeriodicEvaluation(algo, config)
        try:
            loop = run(
                algo,
                source,
                choice,
                total_frames=config.total_frames,
                on_progress=on_progress,
                should_stop=should_stop,
            )
        finally:
            source.close()
        return package(algo, config, loop, choice.choose(loop), start)
