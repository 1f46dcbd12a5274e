"""Training jobs: submit (admin), list, inspect, metrics, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from service.api.deps import Admin, SettingsDep
from service.envs import check_env_id, env_specs
from service.errors import Conflict, NotFound, TooManyRequests, Unprocessable
from service.schemas import JobAccepted, JobCreate, JobList, JobMetrics, JobPublic
from service.training.jobs import FINISHED, Jobs, JobStatus, build_config

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


async def get_jobs(request: Request) -> Jobs:
    return request.app.state.jobs


JobsDep = Annotated[Jobs, Depends(get_jobs)]


def _job(jobs: Jobs, job_id: str) -> dict:
    doc = jobs.store.get(job_id)
    if doc is None:
        raise NotFound(f"job {job_id[:64]!r} not found")
    return doc


@router.post("", status_code=202, response_model=JobAccepted, dependencies=[Admin])
async def submit_job(body: JobCreate, jobs: JobsDep, settings: SettingsDep) -> dict:
    check_env_id(body.env_id)
    space = env_specs(body.env_id)["action"]["type"]
    needs = "discrete" if body.algorithm == "dqn" else "box"
    if space != needs:
        raise Unprocessable(
            f"algorithm {body.algorithm!r} needs a {needs} action space; "
            f"{body.env_id} has a {space} action space"
        )
    if body.recurrent and body.algorithm != "dqn":
        raise Unprocessable(f"recurrent=true is available for 'dqn' only, not {body.algorithm!r}")
    if body.total_frames > settings.max_total_frames:
        raise Unprocessable(
            f"total_frames={body.total_frames} exceeds the limit of {settings.max_total_frames}"
        )
    queued = await run_in_threadpool(jobs.store.list, 10_000)
    if sum(j["status"] == JobStatus.queued.value for j in queued) >= settings.max_queued_jobs:
        raise TooManyRequests(
            f"{settings.max_queued_jobs} jobs are already queued; retry later", retry_after_s=30
        )
    try:
        build_config(body.model_dump())
    except ValidationError as exc:
        raise Unprocessable(
            "invalid hyperparameters: "
            + "; ".join(
                f"{'.'.join(str(p) for p in e['loc'] if p != 'hyperparameters')}: {e['msg']}"
                for e in exc.errors()
            )
        ) from None
    doc = await run_in_threadpool(jobs.submit, body.model_dump())
    return {"job_id": doc["job_id"], "status": doc["status"]}


@router.get("", response_model=JobList)
async def list_jobs(jobs: JobsDep, settings: SettingsDep) -> dict:
    await run_in_threadpool(jobs.store.fail_stale, settings.job_heartbeat_timeout_s)
    return {"jobs": await run_in_threadpool(jobs.store.list)}


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(job_id: str, jobs: JobsDep, settings: SettingsDep) -> dict:
    await run_in_threadpool(jobs.store.fail_stale, settings.job_heartbeat_timeout_s)
    return await run_in_threadpool(_job, jobs, job_id)


@router.get("/{job_id}/metrics", response_model=JobMetrics)
async def job_metrics(job_id: str, jobs: JobsDep) -> dict:
    await run_in_threadpool(_job, jobs, job_id)
    return {"points": await run_in_threadpool(jobs.store.points, job_id)}


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic, dependencies=[Admin])
async def cancel_job(job_id: str, jobs: JobsDep) -> dict:
    doc = await run_in_threadpool(_job, jobs, job_id)
    if JobStatus(doc["status"]) in FINISHED:
        raise Conflict(f"job {job_id} already {doc['status']}; only queued or running jobs can be cancelled")
    return await run_in_threadpool(jobs.cancel, job_id)
