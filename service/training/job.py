"""The job record: what a training job is, as the store keeps it and the API shows it."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class JobStatus(str, Enum):
    """One-to-one with the API's ``status``."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINISHED = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

PROGRESS_FIELDS = ("frames", "total_frames", "episodes", "mean_return", "loss", "epsilon", "fps")
POINT_FIELDS = ("frames", "time_s", "mean_return", "loss", "epsilon", "fps", "eval_mean_return")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def this_worker() -> str:
    """``<host>:<pid>``: who runs a job (shown in the errors of jobs whose worker went away)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _JobRequest(BaseModel):
    """What every job request says (checked at the API by ``schemas.JobCreate``)."""

    model_config = ConfigDict(extra="ignore")  # records written by older releases still read

    algorithm: str
    policy_name: str
    recurrent: bool = False
    total_frames: int
    seed: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    hyperparameters: dict[str, Any] | None = None


class Imitation(BaseModel):
    """A supervised term on expert transitions (a dataset) added to an off-policy job's loss."""

    dataset: str
    weight: float


class EnvJob(_JobRequest):
    """A job that steps an allow-listed environment."""

    source: Literal["env"] = "env"
    env_id: str
    imitation: Imitation | None = None


class SessionsJob(_JobRequest):
    """A job that learns from what clients report through sessions bound to it."""

    source: Literal["sessions"] = "sessions"
    observation: dict[str, Any]
    action: dict[str, Any]
    experience_from: list[str] = Field(default_factory=list)


class DatasetJob(_JobRequest):
    """A job that learns from an offline (Minari) dataset, evaluated in ``env_id`` if given."""

    source: Literal["dataset"] = "dataset"
    dataset: str
    env_id: str | None = None


def _source(value: Any) -> str:
    source = value.get("source") if isinstance(value, dict) else getattr(value, "source", None)
    return source or "env"  # records of older releases may not say


JobRequest = Annotated[
    Annotated[EnvJob, Tag("env")]
    | Annotated[SessionsJob, Tag("sessions")]
    | Annotated[DatasetJob, Tag("dataset")],
    Discriminator(_source),
]


class JobProgress(BaseModel):
    frames: int | None = None
    total_frames: int | None = None
    episodes: int | None = None
    mean_return: float | None = None
    loss: float | None = None
    epsilon: float | None = None
    fps: float | None = None


class Job(BaseModel):
    """A training job. ``worker`` and ``lease_until`` are the store's own (not shown by the API):
    while it runs, its worker renews the lease; a running job whose lease has expired is failed
    by ``JobStore.expire_leases``."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    status: JobStatus
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    request: JobRequest
    config: dict[str, Any] | None = None  # the trainer's config, built once at submit
    progress: JobProgress | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    device: str | None = None
    worker: str | None = None
    lease_until: float | None = None  # seconds since the epoch

    @property
    def finished(self) -> bool:
        return self.status in FINISHED
