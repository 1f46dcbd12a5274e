"""Training jobs as the API sees them: submit (with every check before anything is recorded),
list, inspect, metrics, cancel. Records and queue are ``service.training``'s."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import ValidationError

from service.config import Settings
from service.datasets.store import DatasetStore, check_id
from service.envs import check_env_id, env_specs
from service.errors import Busy, Conflict, InvalidInput, NotFound, check_limit, validation_sentence
from service.training.algorithms import (
    ACTION_SPACE,
    FROM_DATASET,
    RECURRENT,
    build_config,
    client_policy_spec,
)
from service.training.common import TrainConfig
from service.training.job import DatasetJob, Job, JobRequest, JobStatus, SessionsJob
from service.training.job_store import JobStore
from service.training.queue import JobQueue


class JobService:
    def __init__(
        self, store: JobStore, queue: JobQueue, settings: Settings, datasets: DatasetStore | None = None
    ) -> None:
        self.store = store
        self.queue = queue
        self.settings = settings
        self.datasets = datasets

    def check_request(self, request: JobRequest) -> TrainConfig:
        """Everything a job request must satisfy, checked before anything is recorded; the
        trainer's config it makes (stored with the job)."""
        check_limit("total_frames", request.total_frames, self.settings.max_total_frames)
        if isinstance(request, SessionsJob):
            return self._check_sessions_source(request)
        if isinstance(request, DatasetJob):
            return self._check_dataset_source(request)
        algorithm, env_id = request.algorithm, request.env_id
        check_env_id(env_id)
        space = env_specs(env_id)["action"]["type"]
        needs = ACTION_SPACE[algorithm]
        if space not in needs:
            raise InvalidInput(
                f"algorithm {algorithm!r} needs a {' or '.join(needs)} action space; "
                f"{env_id} has a {space} action space"
            )
        if request.recurrent and algorithm not in RECURRENT:
            raise InvalidInput(f"recurrent=true is available for {sorted(RECURRENT)} only, not {algorithm!r}")
        if request.imitation is not None:
            self._check_imitation(request.imitation.dataset, env_id)
        try:
            return build_config(request)
        except ValidationError as exc:
            raise InvalidInput(
                f"invalid hyperparameters: {validation_sentence(exc.errors(), skip=('hyperparameters',))}"
            ) from None

    def _check_imitation(self, dataset: str, env_id: str) -> None:
        """The expert dataset exists and its spaces are the env's."""
        from service.training.offline import space_specs

        if self.datasets is None or not self.datasets.exists(check_id(dataset)):
            raise InvalidInput(f"imitation dataset {dataset!r} not found (GET /v1/datasets lists them)")
        ds = self.datasets.open(dataset)
        try:
            observation, action = space_specs(ds.observation_space, ds.action_space)
        except ValueError as exc:
            raise InvalidInput(f"imitation dataset {dataset!r}: {exc}") from None
        env = env_specs(env_id)
        fits = env["observation"].get("shape") == observation.get("shape") and all(
            env["action"].get(k) == action.get(k) for k in ("type", "n", "shape")
        )
        if not fits:
            raise InvalidInput(
                f"imitation dataset {dataset!r} ({ds.observation_space} / {ds.action_space}) does not fit "
                f"{env_id} ({env['observation']} / {env['action']})"
            )

    def _check_dataset_source(self, request: DatasetJob) -> TrainConfig:
        """The dataset exists and its spaces fit the algorithm (and the env it is evaluated in)."""
        from service.training.offline import space_specs

        if request.algorithm not in FROM_DATASET:
            raise InvalidInput(f"source 'dataset' trains {list(FROM_DATASET)}, not {request.algorithm!r}")
        if self.datasets is None or not self.datasets.exists(check_id(request.dataset)):
            raise InvalidInput(f"dataset {request.dataset!r} not found (GET /v1/datasets lists them)")
        ds = self.datasets.open(request.dataset)
        try:
            observation, action = space_specs(ds.observation_space, ds.action_space)
        except ValueError as exc:
            raise InvalidInput(f"dataset {request.dataset!r}: {exc}") from None
        needs = ACTION_SPACE[request.algorithm]
        if action["type"] not in needs:
            raise InvalidInput(
                f"algorithm {request.algorithm!r} needs a {' or '.join(needs)} action space; "
                f"dataset {request.dataset!r} has {ds.action_space}"
            )
        if request.env_id is not None:
            check_env_id(request.env_id)
            env = env_specs(request.env_id)
            fits = env["observation"].get("shape") == observation.get("shape") and (
                env["action"].get("n"),
                env["action"].get("shape"),
            ) == (action.get("n"), action.get("shape"))
            if not fits:
                raise InvalidInput(
                    f"dataset {request.dataset!r} ({ds.observation_space} / {ds.action_space}) does not "
                    f"fit {request.env_id} ({env['observation']} / {env['action']})"
                )
        try:
            return build_config(request, observation=observation, action=action)
        except ValidationError as exc:
            raise InvalidInput(
                f"invalid hyperparameters: {validation_sentence(exc.errors(), skip=('hyperparameters',))}"
            ) from None

    def _check_sessions_source(self, request: SessionsJob) -> TrainConfig:
        if request.algorithm != "dqn":
            raise InvalidInput(f"source 'sessions' trains dqn only, not {request.algorithm!r}")
        if request.observation.get("type") == "dict":
            raise InvalidInput(
                "source 'sessions' takes a tensor or discrete observation; "
                "dict observations are not supported"
            )
        try:
            config = build_config(request)
            client_policy_spec(config)
        except ValidationError as exc:
            raise InvalidInput(
                f"invalid job: {validation_sentence(exc.errors(), skip=('hyperparameters',))}"
            ) from None
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        return config

    def check_experience_from(self, request: JobRequest) -> None:
        """Each job named in ``experience_from`` exists and recorded what this job learns from."""
        if not isinstance(request, SessionsJob):
            return
        same = ("observation", "action", "recurrent")
        for i, job_id in enumerate(request.experience_from):
            job = self.store.get(job_id)
            if job is None:
                raise InvalidInput(f"experience_from[{i}]: job {job_id} not found")
            if not isinstance(job.request, SessionsJob):
                raise InvalidInput(
                    f"experience_from[{i}]: job {job_id} trained in an env; only source-sessions jobs "
                    "record client experience"
                )
            differ = [k for k in same if getattr(job.request, k) != getattr(request, k)]
            if differ:
                raise InvalidInput(
                    f"experience_from[{i}]: job {job_id} has another {', '.join(differ)} than this job; "
                    "its transitions do not fit this job's network"
                )

    async def submit(self, request: JobRequest) -> Job:
        config = await asyncio.to_thread(self.check_request, request)  # a dataset's files are read
        await asyncio.to_thread(self.check_experience_from, request)
        limit = self.settings.max_queued_jobs
        if await asyncio.to_thread(self.store.count, JobStatus.queued) >= limit:
            raise Busy(f"{limit} jobs are already queued; retry later", retry_after_s=30)
        return await asyncio.to_thread(self.queue.submit, request, config.model_dump(mode="json"))

    async def list(self) -> list[Job]:
        return await asyncio.to_thread(self.store.list)

    async def get(self, job_id: str) -> Job:
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None:
            raise NotFound(f"job {job_id[:64]!r} not found")
        return job

    async def metrics(self, job_id: str) -> list[dict[str, Any]]:
        await self.get(job_id)
        return await asyncio.to_thread(self.store.points, job_id)

    async def cancel(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job.finished:
            raise Conflict(
                f"job {job_id} already {job.status.value}; only queued or running jobs can be cancelled"
            )
        return await asyncio.to_thread(self.queue.cancel, job_id) or job

    async def resume(self, job_id: str) -> Job:
        """Queue a failed ``source: sessions`` job again: its learner continues from its last
        published weights and position, with the transitions recorded on disk."""
        job = await self.get(job_id)
        if not isinstance(job.request, SessionsJob):
            raise Conflict(f"job {job_id} trains in an env; only source-sessions jobs can be resumed")
        if job.status is not JobStatus.failed:
            raise Conflict(f"job {job_id} is {job.status.value}; only a failed job can be resumed")
        resumed = await asyncio.to_thread(self.queue.resume, job_id)
        if resumed is None:
            raise Conflict(f"job {job_id} changed meanwhile; it is no longer failed")
        return resumed

    async def counts(self) -> tuple[dict[str, int], float]:
        """Jobs per status (counted by the store), and the summed fps of the running ones (for
        /metrics)."""

        def read() -> tuple[dict[str, int], float]:
            per_status = {s.value: self.store.count(s) for s in JobStatus}
            fps = sum((j.progress.fps or 0.0) for j in self.store.running() if j.progress)
            return per_status, fps

        return await asyncio.to_thread(read)
