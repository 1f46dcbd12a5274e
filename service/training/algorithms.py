"""The one list of training algorithms: what each needs, its config, its trainer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from service.training.common import TrainConfig, TrainedPolicy

Algorithm = Literal["dqn", "sac", "td3"]
ALGORITHMS: tuple[str, ...] = ("dqn", "sac", "td3")
ACTION_SPACE: dict[str, str] = {"dqn": "discrete", "sac": "box", "td3": "box"}
RECURRENT: frozenset[str] = frozenset({"dqn"})


def build_config(request: dict[str, Any], **extra: Any) -> TrainConfig:
    """The trainer's config for a job request (raises pydantic's ValidationError on bad input)."""
    common = {
        "env_id": request.get("env_id"),
        "total_frames": request["total_frames"],
        "seed": request.get("seed") or 0,
        **extra,
    }
    if request["algorithm"] == "dqn":
        from service.training.dqn import DQNConfig

        if request.get("source") == "sessions":
            common.update(
                source="sessions",
                observation=request.get("observation"),
                action=request.get("action"),
                experience_from=request.get("experience_from") or [],
            )
        return DQNConfig.with_defaults(
            request.get("hyperparameters"), recurrent=request.get("recurrent", False), **common
        )
    from service.training.actor_critic import ActorCriticConfig

    return ActorCriticConfig.with_defaults(
        request.get("hyperparameters"), algorithm=request["algorithm"], **common
    )


Trainer = Callable[..., TrainedPolicy]


def trainer_for(algorithm: str) -> Trainer:
    """``train(config, on_progress, should_stop) -> TrainedPolicy`` of ``algorithm``."""
    if algorithm == "dqn":
        from service.training.dqn import train
    else:
        from service.training.actor_critic import train
    return train


def client_policy_spec(config: TrainConfig):
    """The PolicySpec a ``source: sessions`` job learns (and its sessions act with)."""
    from service.training.dqn import policy_spec_for

    return policy_spec_for(config)
