"""Offline datasets as the API sees them: upload, list, describe, download, delete, and a
``source: sessions`` job's experience exported as one. Every call reads or writes files, so each
runs on a thread (``service.datasets.store`` does the work)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.datasets.store import DatasetStore, check_id, episode_bytes
from service.errors import InvalidInput, NotFound
from service.serving.recording import spaces_of
from service.training.algorithms import client_policy_spec, stored_config
from service.training.experience import ExperienceDir, episodes
from service.training.job import SessionsJob
from service.training.job_store import JobStore


class DatasetService:
    def __init__(
        self,
        store: DatasetStore,
        jobs: JobStore | None = None,
        experience_root: Path | None = None,
        flush: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.jobs, self.experience_root = jobs, experience_root
        self.flush = flush  # writes this process's reported transitions not yet on disk

    async def upload(self, blob: bytes) -> dict[str, Any]:
        dataset_id = await asyncio.to_thread(self.store.import_archive, blob)
        return await self.describe(dataset_id)

    async def list(self) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            return [self.store.describe(i) for i in self.store.ids()]

        return await asyncio.to_thread(read)

    async def describe(self, dataset_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.store.describe, check_id(dataset_id))

    async def download(self, dataset_id: str) -> tuple[bytes, str]:
        blob = await asyncio.to_thread(self.store.archive, check_id(dataset_id))
        return blob, dataset_id.replace("/", "_") + ".tar.gz"

    async def delete(self, dataset_id: str) -> None:
        await asyncio.to_thread(self.store.delete, check_id(dataset_id))

    async def export_job(self, job_id: str, dataset_id: str) -> dict[str, Any]:
        """A new dataset of the whole episodes a ``source: sessions`` job's clients reported
        (its experience on disk, every chunk; ``episodes`` says what is left out). No
        propensities: a client may report the action it took instead of the answered one."""
        check_id(dataset_id)
        job = await asyncio.to_thread(self.jobs.get, job_id)
        if job is None:
            raise NotFound(f"job {job_id[:64]!r} not found")
        if not isinstance(job.request, SessionsJob):
            raise InvalidInput(
                f"job {job_id} trained on {job.request.source} data; only a job with source "
                "'sessions' holds reported experience to export"
            )
        if self.flush is not None:
            self.flush()
        spec = client_policy_spec(stored_config(job))
        obs_space, action_space = spaces_of(spec)

        def export() -> None:
            from minari.data_collector import EpisodeBuffer

            found, left_out = episodes(ExperienceDir(self.experience_root / job_id).read_new())
            if not found:
                raise InvalidInput(
                    f"job {job_id} has no whole episode to export ({left_out} transition(s) that are "
                    "not part of one: an episode ends with terminated or truncated)"
                )
            buffers = [
                EpisodeBuffer(
                    observations=np.concatenate(
                        [ep["observation"].numpy(), ep["next", "observation"][-1:].numpy()]
                    ).astype(obs_space.dtype),
                    actions=ep["action"].numpy().astype(action_space.dtype),
                    rewards=ep["next", "reward"].reshape(-1).tolist(),
                    terminations=ep["next", "terminated"].reshape(-1).tolist(),
                    truncations=ep["next", "truncated"].reshape(-1).tolist(),
                )
                for ep in found
            ]
            size = sum(episode_bytes(b) for b in buffers)
            if size > self.store.max_bytes:  # checked before the dataset is made
                raise InvalidInput(
                    f"job {job_id}'s {len(buffers)} episodes take ~{size} bytes, past a dataset's limit "
                    f"of {self.store.max_bytes} bytes (MAX_DATASET_BYTES)"
                )
            self.store.create(
                dataset_id,
                obs_space,
                action_space,
                env_id=spec.env_id,
                algorithm_name=f"policy-server source-sessions job {job_id} ({job.request.algorithm})",
                description=f"{len(buffers)} whole episodes; {left_out} transitions outside one left out",
            )
            self.store.append(dataset_id, buffers)

        await asyncio.to_thread(export)
        return await self.describe(dataset_id)
