"""The consumer: the huey task that runs one job (start, progress, finish) and the loop that
takes jobs off the queue, one at a time.

``run_job(context, job_id)`` is a plain function; ``register_run_job`` binds it to a context
(store, publisher, stop event) and registers it with huey under ``TASK_NAME``. The embedded
worker thread of ``policy-server serve`` and a standalone ``policy-server worker`` both run
``JobWorker``; every outcome is written to the job's record.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huey.api import Huey, TaskWrapper

from service.config import resolve_device
from service.registry.spec import PolicySpec
from service.training.algorithms import stored_config, trainer_for
from service.training.common import TrainedPolicy
from service.training.job import (
    POINT_FIELDS,
    PROGRESS_FIELDS,
    DatasetJob,
    EnvJob,
    Job,
    JobStatus,
    SessionsJob,
    now_iso,
    this_worker,
)
from service.training.job_store import JobStore, resumable
from service.training.queue import TASK_NAME
from service.training.tracking import JobLog

log = logging.getLogger(__name__)

Publisher = Callable[[str, PolicySpec, bytes], int]


@dataclass
class JobContext:
    """What a running job needs from the process that runs it.

    ``lease_s``: how long a claim on a running job lasts unless renewed (every ``lease_s / 4``);
    ``timeout_s``: a job running longer is stopped at its next batch and failed (0: no limit);
    ``clock``: seconds, monotonic (tests pass their own to move time).
    """

    store: JobStore
    publish: Publisher
    lease_s: float = 120.0
    timeout_s: float = 0.0
    clock: Callable[[], float] = time.monotonic
    stopping: threading.Event = field(default_factory=threading.Event)  # set at shutdown
    log_dir: Path | None = None  # per-job CSV/TensorBoard scalars (tracking.JobLog) go under it
    experience_root: Path | None = None  # source "sessions" jobs: <root>/<job_id> (experience.py)
    dataset_root: Path | None = None  # source "dataset" jobs: <root>/<dataset id> (datasets.store)


# -- one job: start / progress / finish -----------------------------------------------------
def start_job(ctx: JobContext, job_id: str) -> Job | None:
    """Claim a queued job for this worker; ``None`` (and the record settled) if it must not run."""
    if ctx.store.cancel_requested(job_id):
        ctx.store.update(job_id, expect=JobStatus.queued, status=JobStatus.cancelled, finished_at=now_iso())
        return None
    return ctx.store.update(
        job_id,
        expect=JobStatus.queued,
        status=JobStatus.running,
        started_at=now_iso(),
        worker=this_worker(),
        lease_until=time.time() + ctx.lease_s,
    )


def record_progress(ctx: JobContext, job_id: str, point: dict[str, Any]) -> None:
    """A trainer's progress point: the record's ``progress`` and one metrics point."""
    ctx.store.update(
        job_id, progress={k: point.get(k) for k in PROGRESS_FIELDS}, lease_until=time.time() + ctx.lease_s
    )
    ctx.store.add_point(job_id, {k: point.get(k) for k in POINT_FIELDS})


def finish_job(ctx: JobContext, job: Job, trained: TrainedPolicy, timed_out: bool = False) -> None:
    """Publish a trained policy, or record why the job stopped early."""
    store, job_id = ctx.store, job.job_id
    if trained.cancelled:
        if timed_out:
            store.update(
                job_id,
                status=JobStatus.failed,
                finished_at=now_iso(),
                error=f"the job ran past its time limit of {ctx.timeout_s:g} s (JOB_TIMEOUT_S) and was "
                "stopped; ask for fewer total_frames or raise the limit" + resumable(job),
            )
        elif ctx.stopping.is_set() and not store.cancel_requested(job_id):
            store.update(
                job_id,
                status=JobStatus.failed,
                finished_at=now_iso(),
                error="interrupted: the worker shut down during training" + resumable(job),
            )
        else:
            store.update(job_id, status=JobStatus.cancelled, finished_at=now_iso())
        return
    name = job.request.policy_name
    version = ctx.publish(name, trained.spec, trained.weights)
    store.update(
        job_id,
        status=JobStatus.succeeded,
        finished_at=now_iso(),
        result={
            "policy": name,
            "version": version,
            "eval_mean_return": trained.eval_mean_return,
            "frames": trained.frames,
            "wall_time_s": round(trained.wall_time_s, 2),
        },
    )


@contextmanager
def leased(ctx: JobContext, job_id: str) -> Iterator[None]:
    """Renew the job's lease every ``ctx.lease_s / 4`` while it runs, also through long
    evaluations (a thread of its own); a store outage skips a renewal, the next one retries."""
    done = threading.Event()

    def renew() -> None:
        while not done.wait(ctx.lease_s / 4):
            try:
                ctx.store.update(job_id, expect=JobStatus.running, lease_until=time.time() + ctx.lease_s)
            except Exception:
                log.warning("renewing the lease of job %s failed", job_id, exc_info=True)

    t = threading.Thread(target=renew, name=f"lease-{job_id}", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def run_job(ctx: JobContext, job_id: str) -> None:
    """The huey task: start the job, train with progress reports, finish; every outcome recorded."""
    job = start_job(ctx, job_id)
    if job is None:
        return
    req = job.request
    try:
        device = resolve_device(req.device)
        ctx.store.update(job_id, device=device)
        extra: dict[str, Any] = {}
        if isinstance(req, SessionsJob):
            root = ctx.experience_root or Path("var") / "experience"
            extra["experience_dir"] = str(root / job_id)
        datasets = ctx.dataset_root or Path("var") / "datasets"
        if isinstance(req, DatasetJob):
            extra["dataset_dir"] = str(datasets / req.dataset)
        if isinstance(req, EnvJob) and req.imitation is not None:
            extra["imitation_dir"] = str(datasets / req.imitation.dataset)
        config = stored_config(
            job,
            device=device,
            job_id=job_id,
            command=f"POST /v1/jobs {json.dumps(req.model_dump(exclude_none=True), sort_keys=True)}",
            **extra,
        )
        tracker = JobLog(ctx.log_dir, job_id) if ctx.log_dir is not None else None

        def on_progress(point: dict[str, Any]) -> None:
            record_progress(ctx, job_id, point)
            if tracker is not None:
                tracker.log(point)

        deadline = ctx.clock() + ctx.timeout_s if ctx.timeout_s > 0 else None
        timed_out = False

        def should_stop() -> bool:
            nonlocal timed_out
            timed_out = timed_out or (deadline is not None and ctx.clock() > deadline)
            return timed_out or ctx.stopping.is_set() or ctx.store.cancel_requested(job_id)

        with leased(ctx, job_id):
            trained = trainer_for(req.algorithm, req.source)(config, on_progress, should_stop)
        finish_job(ctx, job, trained, timed_out)
    except Exception as exc:
        log.error("job %s failed: %s", job_id, traceback.format_exc())
        ctx.store.update(
            job_id, status=JobStatus.failed, finished_at=now_iso(), error=f"{type(exc).__name__}: {exc}"
        )


def register_run_job(huey: Huey, ctx: JobContext) -> TaskWrapper:
    """``run_job`` bound to ``ctx``, registered with ``huey`` as ``TASK_NAME``."""
    return huey.task(name=TASK_NAME)(functools.partial(run_job, ctx))


# -- the consumer loop ------------------------------------------------------------------------
class JobWorker:
    """Consumes the queue one job at a time (bounded concurrency: one training per worker)."""

    def __init__(self, huey: Huey, ctx: JobContext, poll_s: float = 0.2) -> None:
        self.huey = huey
        self.ctx = ctx
        self.poll_s = poll_s
        self._thread: threading.Thread | None = None

    def run_forever(self) -> None:
        stopping = self.ctx.stopping
        while not stopping.is_set():
            try:
                task = self.huey.dequeue()
            except Exception:
                log.warning("dequeue failed", exc_info=True)
                task = None
            if task is None:
                stopping.wait(self.poll_s)
                continue
            try:
                self.huey.execute(task)
            except Exception:  # the task records its own failure; keep taking jobs
                log.exception("task %s raised", task.id)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="job-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.ctx.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
