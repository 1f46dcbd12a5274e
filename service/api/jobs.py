"""Training jobs: submit (admin), list, inspect, metrics, cancel, resume; a ``source: sessions``
job's reported experience exported as a dataset (admin)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import Admin, DatasetsDep, JobsDep
from service.schemas import (
    DatasetPublic,
    ExportExperienceIn,
    JobAccepted,
    JobCreate,
    JobList,
    JobMetrics,
    JobPublic,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobAccepted, dependencies=[Admin])
async def submit_job(body: JobCreate, jobs: JobsDep) -> dict:
    job = await jobs.submit(body.request())
    return {"job_id": job.job_id, "status": job.status}


@router.get("", response_model=JobList)
async def list_jobs(jobs: JobsDep) -> dict:
    return {"jobs": [j.model_dump() for j in await jobs.list()]}


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(job_id: str, jobs: JobsDep) -> dict:
    return (await jobs.get(job_id)).model_dump()


@router.get("/{job_id}/metrics", response_model=JobMetrics)
async def job_metrics(job_id: str, jobs: JobsDep) -> dict:
    return {"points": await jobs.metrics(job_id)}


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic, dependencies=[Admin])
async def cancel_job(job_id: str, jobs: JobsDep) -> dict:
    return (await jobs.cancel(job_id)).model_dump()


@router.post("/{job_id}/resume", status_code=202, response_model=JobPublic, dependencies=[Admin])
async def resume_job(job_id: str, jobs: JobsDep) -> dict:
    return (await jobs.resume(job_id)).model_dump()


@router.post("/{job_id}/dataset", status_code=201, response_model=DatasetPublic, dependencies=[Admin])
async def export_experience(job_id: str, body: ExportExperienceIn, datasets: DatasetsDep) -> dict:
    """The whole episodes a ``source: sessions`` job's clients reported, as a new Minari dataset
    (no propensities: a client may report the action it took)."""
    return await datasets.export_job(job_id, body.dataset)
