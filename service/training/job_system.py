"""The job system of one process, wired: record store, huey queue, the registered task, the
producer and the consumer (which runs only if started)."""

from __future__ import annotations

from service.config import Settings
from service.training.job_store import make_job_store
from service.training.queue import JobQueue, make_huey
from service.training.worker import JobContext, JobWorker, Publisher, register_run_job


def build_jobs(settings: Settings, publish: Publisher) -> tuple[JobQueue, JobWorker]:
    store = make_job_store(settings.queue_url, settings.data_dir)
    huey = make_huey(settings.queue_url, settings.data_dir)
    ctx = JobContext(
        store,
        publish,
        lease_s=settings.job_lease_s,
        timeout_s=settings.job_timeout_s,
        log_dir=settings.data_dir / "jobs",
        experience_root=settings.data_dir / "experience",
        dataset_root=settings.data_dir / "datasets",
    )
    task = register_run_job(huey, ctx)
    worker = JobWorker(huey, ctx)
    return JobQueue(store, task), worker
