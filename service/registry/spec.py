"""``PolicySpec``: the contents of ``policy.json``, validated before anything is built."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_PATTERN = NAME_RE.pattern


def is_valid_name(name: str) -> bool:
    """Policy and job names: letters, digits, ``_ . -``; never a path."""
    return bool(NAME_RE.match(name)) and ".." not in name


# The activations a spec (and a training job) may name; build.ACTIVATIONS maps each to its class.
Activation = Literal["relu", "tanh", "elu", "leaky_relu", "silu"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ObservationSpec(_Strict):
    """A float vector ``{shape: [d], dtype: float32}``."""

    shape: list[Annotated[int, Field(ge=1, le=65536)]] = Field(min_length=1, max_length=1)
    dtype: Literal["float32"] = "float32"

    @property
    def discrete(self) -> bool:
        return False

    @property
    def dim(self) -> int:
        """Features the network reads."""
        return self.shape[0]


class DiscreteObservationSpec(_Strict):
    """An integer in ``[0, n)`` (e.g. Taxi's state), one-hot encoded before the network."""

    type: Literal["discrete"]
    n: int = Field(ge=2, le=65536)

    @property
    def discrete(self) -> bool:
        return True

    @property
    def dim(self) -> int:
        return self.n


class DiscreteActionSpec(_Strict):
    type: Literal["discrete"]
    n: int = Field(ge=2, le=65536)
    mask_required: bool = Field(
        False, description="Every act call must send an action mask (any discrete policy accepts one)."
    )


class BoxActionSpec(_Strict):
    type: Literal["box"]
    shape: list[Annotated[int, Field(ge=1, le=4096)]] = Field(min_length=1, max_length=1)
    low: list[float]
    high: list[float]

    @model_validator(mode="after")
    def _bounds(self) -> BoxActionSpec:
        n = self.shape[0]
        if len(self.low) != n or len(self.high) != n:
            raise ValueError(f"low and high need {n} values each (action shape {self.shape})")
        for lo, hi in zip(self.low, self.high, strict=True):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError("box bounds must be finite with low < high")
        return self


ActionSpec = Annotated[DiscreteActionSpec | BoxActionSpec, Field(discriminator="type")]


class NetworkSpec(_Strict):
    type: Literal["mlp"] = "mlp"
    num_cells: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [64, 64], max_length=8
    )
    activation: Activation = "relu"


class RecurrentSpec(_Strict):
    type: Literal["lstm"] = "lstm"
    hidden_size: int = Field(ge=1, le=4096)
    num_layers: int = Field(1, ge=1, le=4)


class ExplorationDefaults(_Strict):
    """Defaults used when a request asks for ``random`` without its own parameters."""

    epsilon: float = Field(0.1, ge=0.0, le=1.0, description="Q-value epsilon-greedy.")
    noise_std: float = Field(0.1, ge=0.0, description="Actor additive Gaussian noise.")


class PolicySpec(_Strict):
    """What a policy is: enough to rebuild its TorchRL module and check its weights."""

    kind: Literal["actor", "probabilistic", "qvalue"]
    observation: ObservationSpec | DiscreteObservationSpec
    action: ActionSpec
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    recurrent: RecurrentSpec | None = None
    distribution: Literal["normal", "tanh_normal", "categorical"] | None = None
    env_id: str | None = Field(None, max_length=128)
    exploration: ExplorationDefaults = Field(default_factory=ExplorationDefaults)
    provenance: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _kind_fits(self) -> PolicySpec:
        discrete = self.action.type == "discrete"
        if self.kind == "qvalue" and not discrete:
            raise ValueError("kind 'qvalue' needs a discrete action space")
        if self.kind == "actor" and discrete:
            raise ValueError("kind 'actor' needs a box action space")
        if self.kind == "probabilistic":
            if self.distribution is None:
                raise ValueError("kind 'probabilistic' needs distribution")
            if (self.distribution == "categorical") != discrete:
                raise ValueError(
                    "distribution 'categorical' goes with discrete actions; "
                    "'normal' and 'tanh_normal' with box actions"
                )
        elif self.distribution is not None:
            raise ValueError(f"distribution applies to kind 'probabilistic' only, not {self.kind!r}")
        return self

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "recurrent": self.recurrent is not None,
            "observation": self.observation.model_dump(),
            "action": self.action.model_dump(),
            "env_id": self.env_id,
        }
