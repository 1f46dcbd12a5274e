"""The one list of training algorithms: what each needs, its config, its trainer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from service.training.common import TrainConfig, TrainedPolicy
from service.training.job import DatasetJob, EnvJob, Job, JobRequest, SessionsJob

Algorithm = Literal["dqn", "sac", "td3", "ppo", "bc", "discrete_cql"]
ALGORITHMS: tuple[str, ...] = ("dqn", "sac", "td3", "ppo")  # trained in an env
OFFLINE: tuple[str, ...] = ("bc", "discrete_cql")  # trained from a dataset (source "dataset") only
FROM_DATASET: tuple[str, ...] = (*OFFLINE, "dqn")  # what a dataset can train (dqn: offline DQN)
# the action spaces each trains
ACTION_SPACE: dict[str, tuple[str, ...]] = {
    "dqn": ("discrete",),
    "sac": ("box",),
    "td3": ("box",),
    "ppo": ("discrete", "box", "multi_discrete", "composite"),
    "bc": ("discrete", "box"),
    "discrete_cql": ("discrete",),
}
RECURRENT: frozenset[str] = frozenset({"dqn"})


def build_config(request: JobRequest, **extra: Any) -> TrainConfig:
    """The trainer's config for a job request, defaults resolved (raises pydantic's
    ValidationError on bad input). Built once at submit and kept in the job's record."""
    common = {"env_id": None, "total_frames": request.total_frames, "seed": request.seed or 0, **extra}
    if isinstance(request, EnvJob | DatasetJob):
        common["env_id"] = request.env_id
    if isinstance(request, DatasetJob):
        from service.training.offline import OfflineConfig

        common.setdefault("dataset", getattr(request, "dataset", None))
        return OfflineConfig.with_defaults(request.hyperparameters, algorithm=request.algorithm, **common)
    if request.algorithm == "dqn":
        from service.training.dqn import DQNConfig

        if isinstance(request, EnvJob) and request.imitation is not None:
            common.update(
                imitation_dataset=request.imitation.dataset, imitation_weight=request.imitation.weight
            )
        if isinstance(request, SessionsJob):
            common.update(
                source="sessions",
                observation=request.observation,
                action=request.action,
                experience_from=request.experience_from,
            )
        return DQNConfig.with_defaults(request.hyperparameters, recurrent=request.recurrent, **common)
    if request.algorithm == "ppo":
        from service.training.ppo import PPOConfig

        return PPOConfig.with_defaults(request.hyperparameters, **common)
    from service.training.actor_critic import ActorCriticConfig

    if isinstance(request, EnvJob) and request.imitation is not None:
        common.update(imitation_dataset=request.imitation.dataset, imitation_weight=request.imitation.weight)

    return ActorCriticConfig.with_defaults(request.hyperparameters, algorithm=request.algorithm, **common)


def stored_config(job: Job, **extra: Any) -> TrainConfig:
    """The config stored with ``job`` at submit, with this run's ``extra`` fields (device, job
    id…); for records of older releases, built from the request."""
    if job.config is None:
        return build_config(job.request, **extra)
    if isinstance(job.request, DatasetJob):
        from service.training.offline import OfflineConfig as cls
    elif job.request.algorithm == "dqn":
        from service.training.dqn import DQNConfig as cls
    elif job.request.algorithm == "ppo":
        from service.training.ppo import PPOConfig as cls
    else:
        from service.training.actor_critic import ActorCriticConfig as cls
    return cls.model_validate({**job.config, **extra})


Trainer = Callable[..., TrainedPolicy]


def trainer_for(algorithm: str, source: str = "env") -> Trainer:
    """``train(config, on_progress, should_stop) -> TrainedPolicy`` of ``algorithm`` (learning
    from ``source``)."""
    if source == "dataset":
        from service.training.offline import train
    elif algorithm == "dqn":
        from service.training.dqn import train
    elif algorithm == "ppo":
        from service.training.ppo import train
    else:
        from service.training.actor_critic import train
    return train


def client_policy_spec(config: TrainConfig):
    """The PolicySpec a ``source: sessions`` job learns (and its sessions act with)."""
    from service.training.dqn import policy_spec_for

    return policy_spec_for(config)
