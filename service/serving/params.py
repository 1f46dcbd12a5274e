"""The parameter objects of the service layer: one per operation, built by the HTTP edge.

Plain slotted dataclasses (not frozen: a frozen one costs ~1 µs more to build, on every act call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.exploration import ExplorationParams

# a float vector, an integer (a discrete observation), or named entries (a dict observation)
# (and for images: nested lists, or runtime.arrays.EncodedArray, the raw bytes)
Row = Any


@dataclass(slots=True)
class ActParams:
    """A stateless act call: ``rows`` observations (one when ``single``)."""

    policy: str
    rows: list[Row]
    single: bool
    explore: ExplorationParams = field(default_factory=ExplorationParams)
    version: int | None = None
    seed: int | None = None
    return_info: bool = False
    masks: list[list[bool]] | None = None  # one action mask per row (discrete policies)
    routing_key: str | None = None  # X-Routing-Key: the same key, the same version of a split


@dataclass(slots=True)
class SessionCreateParams:
    policy: str
    version: int | None = None
    num_envs: int = 1
    explore: ExplorationParams = field(default_factory=ExplorationParams)
    ttl_s: float | None = None
    job: str | None = None  # bound to a source-sessions job instead of a served policy
    session_id: str | None = None  # chosen by the server's own protocols (a /v2 sequence); else new
    routing_key: str | None = None  # X-Routing-Key: the version of a split it lands on
    record: str | None = None  # a dataset id: the session's episodes are recorded into it


@dataclass(slots=True)
class SessionStepParams:
    """One step of a session: one observation per env, ``reset`` marking episode starts."""

    session_id: str
    rows: list[Row]
    single: bool
    reset: bool | list[bool] | None = None
    explore: ExplorationParams = field(default_factory=ExplorationParams)
    return_info: bool = False
    masks: list[list[bool]] | None = None  # one action mask per env (discrete policies)
    # job sessions: the previous action's outcome, one value or one per env
    reward: float | list[float | None] | None = None
    terminated: bool | list[bool] | None = None
    truncated: bool | list[bool] | None = None
    # job sessions, one env: the reward is what ``report`` accumulated since the previous step
    reported: bool = False
    # job sessions, one env: the action the client took instead of the one answered (recorded)
    taken: int | None = None


@dataclass(slots=True)
class RolloutParams:
    policy: str
    version: int | None = None
    env_id: str | None = None
    episodes: int = 1
    max_steps: int = 1000
    explore: ExplorationParams = field(default_factory=ExplorationParams)
    seed: int | None = None
    return_trajectory: bool = False
