"""Where job records live: SQLite next to the SQLite queue, or Redis next to the Redis queue.

Both hold the same ``Job`` record as JSON, the job's metric points, and a cancel flag; the API
reads them, the worker writes them. A running job holds a lease (``Job.lease_until``) that its
worker renews; the one sweep, ``expire_leases``, fails the running jobs whose lease has expired
(their worker died, hung or lost the store). It runs in ``serve``'s lifespan, never on a GET.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from service.redis_outage import COMMAND_TIMEOUT_S, CONNECT_TIMEOUT_S, redis_available
from service.training.job import Job, JobStatus, SessionsJob, now_iso

log = logging.getLogger(__name__)
STORE = "the job store"


def resumable(job: Job) -> str:
    """What a failure message adds for a job that can be resumed (source sessions)."""
    if not isinstance(job.request, SessionsJob):
        return ""
    return f"; its recorded experience is kept: resume it with POST /v1/jobs/{job.job_id}/resume"


class JobStore(ABC):
    """Job records: one ``Job`` per job, metric points, and a cancel flag."""

    @abstractmethod
    def create(self, job: Job) -> None: ...

    @abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    def list(self, limit: int = 100) -> list[Job]: ...

    @abstractmethod
    def update(self, job_id: str, expect: JobStatus | None = None, **fields: Any) -> Job | None:
        """Merge ``fields`` into the record; ``None`` if it is gone or its status is not ``expect``."""

    @abstractmethod
    def add_point(self, job_id: str, point: dict[str, Any]) -> None: ...

    @abstractmethod
    def points(self, job_id: str) -> list[dict[str, Any]]: ...

    @abstractmethod
    def request_cancel(self, job_id: str) -> None: ...

    @abstractmethod
    def cancel_requested(self, job_id: str) -> bool: ...

    @abstractmethod
    def count(self, status: JobStatus) -> int:
        """Jobs with this status, counted by the store (no record is read)."""

    @abstractmethod
    def running(self) -> list[Job]:
        """The running jobs' records (the sweep and /metrics read only these)."""

    def expire_leases(self, now: float | None = None) -> list[str]:
        """Fail the running jobs whose lease has expired; returns their ids."""
        now = time.time() if now is None else now
        failed = []
        for job in self.running():
            if (job.lease_until or 0.0) > now:
                continue
            reason = (
                f"its worker ({job.worker}) stopped renewing the job's lease "
                f"{now - (job.lease_until or now):.0f} s ago (it exited, hung or lost the job store)"
            )
            done = self.update(
                job.job_id,
                expect=JobStatus.running,
                status=JobStatus.failed,
                finished_at=now_iso(),
                error="interrupted: " + reason + resumable(job),
            )
            if done is not None:
                log.warning("job %s failed: %s", job.job_id, reason)
                failed.append(job.job_id)
        return failed


def _dump(job: Job) -> str:
    return job.model_dump_json()


def _merged(job: Job, fields: dict[str, Any]) -> Job:
    """``job`` with ``fields`` replaced, validated like a fresh record."""
    return Job.model_validate({**job.model_dump(), **fields})


class SqliteJobStore(JobStore):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, created REAL, "
                "cancel INTEGER DEFAULT 0, doc TEXT)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS points (job_id TEXT, seq INTEGER "
                "PRIMARY KEY AUTOINCREMENT, doc TEXT)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS points_job ON points (job_id)")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # autocommit mode; ``closing`` because sqlite3's own context manager does not close.
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            yield db

    def create(self, job: Job) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO jobs (id, created, doc) VALUES (?, ?, ?)", (job.job_id, time.time(), _dump(job))
            )

    def get(self, job_id: str) -> Job | None:
        with self._db() as db:
            row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.model_validate_json(row[0]) if row else None

    def list(self, limit: int = 100) -> list[Job]:
        with self._db() as db:
            rows = db.execute("SELECT doc FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [Job.model_validate_json(r[0]) for r in rows]

    def count(self, status: JobStatus) -> int:
        with self._db() as db:
            row = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE json_extract(doc, '$.status') = ?", (status.value,)
            ).fetchone()
        return int(row[0])

    def running(self) -> list[Job]:
        with self._db() as db:
            rows = db.execute(
                "SELECT doc FROM jobs WHERE json_extract(doc, '$.status') = ?", (JobStatus.running.value,)
            ).fetchall()
        return [Job.model_validate_json(r[0]) for r in rows]

    def update(self, job_id: str, expect: JobStatus | None = None, **fields: Any) -> Job | None:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
                job = Job.model_validate_json(row[0]) if row else None
                if job is None or (expect is not None and job.status is not expect):
                    db.execute("ROLLBACK")
                    return None
                job = _merged(job, fields)
                db.execute("UPDATE jobs SET doc = ? WHERE id = ?", (_dump(job), job_id))
                db.execute("COMMIT")
                return job
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def add_point(self, job_id: str, point: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute("INSERT INTO points (job_id, doc) VALUES (?, ?)", (job_id, json.dumps(point)))

    def points(self, job_id: str) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT doc FROM points WHERE job_id = ? ORDER BY seq", (job_id,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def request_cancel(self, job_id: str) -> None:
        with self._db() as db:
            db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))

    def cancel_requested(self, job_id: str) -> bool:
        with self._db() as db:
            row = db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])


class RedisJobStore(JobStore):
    """Records in Redis, for workers on other machines (``POLICY_SERVER_QUEUE_URL=redis://…``).

    While Redis is down every call raises ``Unavailable`` and changes nothing.
    """

    def __init__(self, url: str) -> None:
        import redis

        self._r = redis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=COMMAND_TIMEOUT_S
        )

    @staticmethod
    def _status_key(status: JobStatus) -> str:
        return f"ps:jobs:{status.value}"  # a set of job ids per status: counted without reading

    def create(self, job: Job) -> None:
        with redis_available(STORE), self._r.pipeline(transaction=True) as p:
            p.set(f"ps:job:{job.job_id}", _dump(job))
            p.zadd("ps:jobs", {job.job_id: time.time()})
            p.sadd(self._status_key(job.status), job.job_id)
            p.execute()

    def count(self, status: JobStatus) -> int:
        with redis_available(STORE):
            return int(self._r.scard(self._status_key(status)))

    def running(self) -> list[Job]:
        with redis_available(STORE):
            ids = self._r.smembers(self._status_key(JobStatus.running))
            raws = self._r.mget([f"ps:job:{i.decode()}" for i in ids]) if ids else []
        jobs = [Job.model_validate_json(r) for r in raws if r]
        return [j for j in jobs if j.status is JobStatus.running]

    def get(self, job_id: str) -> Job | None:
        with redis_available(STORE):
            raw = self._r.get(f"ps:job:{job_id}")
        return Job.model_validate_json(raw) if raw else None

    def list(self, limit: int = 100) -> list[Job]:
        with redis_available(STORE):
            ids = self._r.zrevrange("ps:jobs", 0, limit - 1)
            raws = self._r.mget([f"ps:job:{i.decode()}" for i in ids]) if ids else []
        return [Job.model_validate_json(r) for r in raws if r]

    def update(self, job_id: str, expect: JobStatus | None = None, **fields: Any) -> Job | None:
        from redis.exceptions import WatchError

        key = f"ps:job:{job_id}"
        with redis_available(STORE), self._r.pipeline() as p:
            while True:
                try:
                    p.watch(key)
                    raw = p.get(key)
                    job = Job.model_validate_json(raw) if raw else None
                    if job is None or (expect is not None and job.status is not expect):
                        return None
                    before = job.status
                    job = _merged(job, fields)
                    p.multi()
                    p.set(key, _dump(job))
                    if job.status is not before:
                        p.smove(self._status_key(before), self._status_key(job.status), job_id)
                    p.execute()
                    return job
                except WatchError:  # someone else wrote the record meanwhile: read it again
                    continue

    def add_point(self, job_id: str, point: dict[str, Any]) -> None:
        with redis_available(STORE):
            self._r.rpush(f"ps:job:{job_id}:points", json.dumps(point))

    def points(self, job_id: str) -> list[dict[str, Any]]:
        with redis_available(STORE):
            return [json.loads(p) for p in self._r.lrange(f"ps:job:{job_id}:points", 0, -1)]

    def request_cancel(self, job_id: str) -> None:
        with redis_available(STORE):
            self._r.set(f"ps:job:{job_id}:cancel", 1)

    def cancel_requested(self, job_id: str) -> bool:
        with redis_available(STORE):
            return bool(self._r.exists(f"ps:job:{job_id}:cancel"))


def make_job_store(queue_url: str | None, data_dir: Path) -> JobStore:
    if queue_url:
        return RedisJobStore(queue_url)
    return SqliteJobStore(data_dir / "jobs.db")
