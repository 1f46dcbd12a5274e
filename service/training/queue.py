"""The job queue and its producer: huey with JSON messages (huey's default is pickle).

``make_huey`` builds the queue (SQLite in the data dir, or Redis with ``QUEUE_URL``);
``JobQueue`` creates a job's record and enqueues it, or cancels it. The task it enqueues is the
worker's ``run_job`` (``service.training.worker``), registered on the same huey instance by the
process that wires both (``create_app``, ``policy-server worker``).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from huey import RedisHuey, SqliteHuey
from huey.api import Huey, TaskWrapper
from huey.registry import Message
from huey.serializer import Serializer

from service.redis_outage import redis_available
from service.training.job import Job, JobRequest, JobStatus, now_iso
from service.training.job_store import JobStore

TASK_NAME = "run_job"


class JSONMessageSerializer(Serializer):
    """huey messages as JSON; a message that is not JSON is refused, never unpickled."""

    def _serialize(self, message: Message) -> bytes:
        d = message._asdict()
        if d.get("on_complete") or d.get("on_error"):
            raise ValueError("pipelines are not supported by the JSON serializer")
        for k in ("eta", "expires_resolved"):
            if isinstance(d[k], datetime):
                d[k] = {"__datetime__": d[k].isoformat()}
        d["args"] = list(d["args"] or ())
        return json.dumps(d).encode()

    def _deserialize(self, data: bytes) -> Message:
        d = json.loads(data)
        for k in ("eta", "expires_resolved"):
            if isinstance(d.get(k), dict):
                d[k] = datetime.fromisoformat(d[k]["__datetime__"])
        d["args"] = tuple(d["args"])
        return Message(**{f: d.get(f) for f in Message._fields})


def make_huey(queue_url: str | None, data_dir: Path) -> Huey:
    serializer = JSONMessageSerializer()
    if queue_url:
        return RedisHuey("policy-server", url=queue_url, results=False, serializer=serializer)
    data_dir.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(
        "policy-server", filename=str(data_dir / "queue.db"), results=False, serializer=serializer
    )


class JobQueue:
    """The producer: a record per job, then one message on the queue."""

    def __init__(self, store: JobStore, task: TaskWrapper) -> None:
        self.store = store
        self.task = task

    def submit(self, request: JobRequest, config: dict[str, Any] | None = None) -> Job:
        """Record a job (its request, and the trainer's config made from it) and queue it."""
        job = Job(
            job_id=uuid.uuid4().hex[:16],
            status=JobStatus.queued,
            created_at=now_iso(),
            request=request,
            config=config,
        )
        self.store.create(job)
        with redis_available("the job queue"):
            self.task(job.job_id)
        return job

    def resume(self, job_id: str) -> Job | None:
        """A failed job queued again (same id, same record); ``None`` if it is no longer failed."""
        job = self.store.update(
            job_id, expect=JobStatus.failed, status=JobStatus.queued, error=None, finished_at=None
        )
        if job is not None:
            with redis_available("the job queue"):
                self.task(job_id)
        return job

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is cancelled at once; a running one stops at its next batch."""
        self.store.request_cancel(job_id)
        done = self.store.update(
            job_id, expect=JobStatus.queued, status=JobStatus.cancelled, finished_at=now_iso()
        )
        return done or self.store.get(job_id)
