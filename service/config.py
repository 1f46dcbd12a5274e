"""Service settings, read from the environment (prefix ``POLICY_SERVER_``) or a ``.env`` file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_state_budget() -> int:
    """An eighth of this machine's physical memory, at most 4 GiB."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = 8 * 2**30
    return min(4 * 2**30, physical // 8)


class Settings(BaseSettings):
    """Every knob of the service. Each field maps to ``POLICY_SERVER_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="POLICY_SERVER_", env_file=".env", extra="ignore")

    model_dir: Path | str = Field(
        Path("models"), description="The model repository: a directory, or s3://bucket/prefix."
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="An S3-compatible server for an s3:// model_dir (credentials: the AWS variables).",
    )
    data_dir: Path = Field(Path("var"), description="Job records, queue and scratch space.")
    api_key: str | None = Field(None, description="Bearer key for admin endpoints.")
    protect_inference: bool = Field(False, description="Also require the key for act/sessions.")
    device: str = Field("cpu", description="Device that serves policies (cpu | cuda | auto).")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads for serving.")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="Port of the Open Inference Protocol over gRPC; 0 = off."
    )
    grpc_host: str = Field("0.0.0.0", description="Address the gRPC service binds.")
    http_server: Literal["uvicorn", "granian"] = Field(
        "granian", description="The HTTP server `serve` runs the app on (`serve --http` overrides)."
    )
    rllib_compat: bool = Field(
        False, description="Answer RLlib PolicyClient's pickled commands at POST /rllib/{policy}."
    )

    # limits
    max_body_bytes: int = Field(
        40 * 1024 * 1024,
        ge=1024,
        description="Largest JSON body (413): a batch of 32 base64 400x600x3 frames (31 MB) fits.",
    )
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest upload (413).")
    max_batch_size: int = Field(4096, ge=1, description="Most observations in one act call.")
    max_forward_batch: int = Field(
        1024, ge=1, description="Most observations micro-batched into one forward pass."
    )
    max_sessions: int = Field(10_000, ge=1, description="Live sessions before 429.")
    max_session_state_bytes: int = Field(
        default_factory=lambda: default_state_budget(),
        ge=0,
        description="Bytes of per-env state (LSTM h/c, frame history) live sessions of this process "
        "may hold together, 429 beyond; default: an eighth of physical memory, at most 4 GiB.",
    )
    session_ttl_s: float = Field(900.0, gt=0, description="Default idle time before expiry.")
    max_session_ttl_s: float = Field(86_400.0, gt=0, description="Largest ttl_s a client may ask.")
    max_session_envs: int = Field(1024, ge=1, description="Largest num_envs of one session.")
    max_rollout_episodes: int = Field(100, ge=1)
    max_rollout_steps: int = Field(10_000, ge=1)
    max_dataset_bytes: int = Field(
        1024**3, ge=1024, description="Largest offline dataset on disk; recording past it is refused (422)."
    )
    max_datasets: int = Field(100, ge=1, description="Datasets recording sessions may create (422 beyond).")
    shadow_queue: int = Field(
        256, ge=1, description="Act calls waiting for a shadow version; a full queue drops copies (counted)."
    )
    max_concurrent_rollouts: int = Field(2, ge=1, description="Rollouts at once (429 beyond).")
    rollout_timeout_s: float = Field(120.0, gt=0)
    max_total_frames: int = Field(2_000_000, ge=1, description="Largest training job.")
    max_queued_jobs: int = Field(100, ge=1, description="Jobs waiting in the queue (429 beyond).")
    request_timeout_s: float = Field(
        30.0, gt=0, description="HTTP requests other than rollouts and uploads are answered 504 past this."
    )

    access_log_sample: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of successful requests written to the access log (at log level info); "
        "errors (status >= 400) are always written. 0 = errors only.",
    )

    # stores and queue
    session_store: str = Field("memory", description="memory | redis://host:port/db")
    queue_url: str | None = Field(None, description="None: SQLite queue; redis://… for RedisHuey.")
    embedded_worker: bool = Field(True, description="serve also consumes training jobs.")
    registry_poll_s: float = Field(2.0, ge=0, description="Rescan of the model repository; 0=off.")
    job_lease_s: float = Field(
        120.0,
        gt=0,
        description="A running job's lease: its worker renews it; one not renewed this long fails.",
    )
    job_sweep_s: float = Field(
        30.0, ge=0, description="How often serve fails jobs whose lease expired; 0 = never."
    )
    job_timeout_s: float = Field(
        86400.0,
        ge=0,
        description="A job running longer is stopped at its next batch and failed; 0 = no limit.",
    )


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was asked for but no CUDA device is available")
    return requested
