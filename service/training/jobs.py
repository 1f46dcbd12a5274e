"""Training jobs: records, the huey queue (JSON messages, never pickle), and the worker loop.

Producer (``JobService.submit``), records (``JobStore``) and consumer (``JobWorker``) are apart:
the API submits, a worker thread of ``policy-server serve`` or a ``policy-server worker``
process consumes, and both read and write the same records (SQLite in the data dir, or Redis).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import traceback
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from huey import RedisHuey, SqliteHuey
from huey.api import Huey
from huey.registry import Message
from huey.serializer import Serializer

from service.config import Settings, resolve_device

log = logging.getLogger(__name__)


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINISHED = {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# -- records ---------------------------------------------------------------------------------
class JobStore(ABC):
    """Job records: one JSON document per job, metric points, and a cancel flag."""

    @abstractmethod
    def create(self, doc: dict[str, Any]) -> None: ...

    @abstractmethod
    def get(self, job_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def list(self, limit: int = 100) -> list[dict[str, Any]]: ...

    @abstractmethod
    def update(self, job_id: str, **fields: Any) -> dict[str, Any] | None: ...

    @abstractmethod
    def add_point(self, job_id: str, point: dict[str, Any]) -> None: ...

    @abstractmethod
    def points(self, job_id: str) -> list[dict[str, Any]]: ...

    @abstractmethod
    def request_cancel(self, job_id: str) -> None: ...

    @abstractmethod
    def cancel_requested(self, job_id: str) -> bool: ...

    def fail_stale(self, timeout_s: float, reason: str | None = None) -> int:
        """Mark running jobs whose worker went silent for ``timeout_s`` as failed."""
        n = 0
        for doc in self.list(limit=10_000):
            silent = time.time() - doc.get("heartbeat", 0)
            if doc["status"] == JobStatus.running.value and silent > timeout_s:
                self.update(
                    doc["job_id"],
                    status=JobStatus.failed.value,
                    finished_at=now_iso(),
                    error=reason
                    or f"the worker stopped reporting for {silent:.0f} s (it died or was stopped)",
                )
                n += 1
        return n


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

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def create(self, doc: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO jobs (id, created, doc) VALUES (?, ?, ?)",
                (doc["job_id"], time.time(), json.dumps(doc)),
            )

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT doc FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def update(self, job_id: str, **fields: Any) -> dict[str, Any] | None:
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                return None
            doc = {**json.loads(row[0]), **fields}
            db.execute("UPDATE jobs SET doc = ? WHERE id = ?", (json.dumps(doc), job_id))
            db.execute("COMMIT")
            return doc
        finally:
            db.close()

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
    """Records in Redis, for workers on other machines (``POLICY_SERVER_QUEUE_URL=redis://…``)."""

    def __init__(self, url: str) -> None:
        import redis

        self._r = redis.Redis.from_url(url)

    def create(self, doc: dict[str, Any]) -> None:
        self._r.set(f"ps:job:{doc['job_id']}", json.dumps(doc))
        self._r.zadd("ps:jobs", {doc["job_id"]: time.time()})

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self._r.get(f"ps:job:{job_id}")
        return json.loads(raw) if raw else None

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        ids = self._r.zrevrange("ps:jobs", 0, limit - 1)
        docs = [self.get(i.decode()) for i in ids]
        return [d for d in docs if d]

    def update(self, job_id: str, **fields: Any) -> dict[str, Any] | None:
        key = f"ps:job:{job_id}"
        with self._r.pipeline() as p:
            while True:
                try:
                    p.watch(key)
                    raw = p.get(key)
                    if raw is None:
                        return None
                    doc = {**json.loads(raw), **fields}
                    p.multi()
                    p.set(key, json.dumps(doc))
                    p.execute()
                    return doc
                except Exception as exc:  # WatchError: someone else wrote; try again
                    if type(exc).__name__ != "WatchError":
                        raise

    def add_point(self, job_id: str, point: dict[str, Any]) -> None:
        self._r.rpush(f"ps:job:{job_id}:points", json.dumps(point))

    def points(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self._r.lrange(f"ps:job:{job_id}:points", 0, -1)]

    def request_cancel(self, job_id: str) -> None:
        self._r.set(f"ps:job:{job_id}:cancel", 1)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._r.exists(f"ps:job:{job_id}:cancel"))


# -- what a job trains ------------------------------------------------------------------------
ALGORITHMS = ("dqn", "sac", "td3")


def build_config(request: dict[str, Any], **extra: Any):
    """The trainer's config for a job request (raises pydantic's ValidationError on bad input)."""
    common = {
        "env_id": request["env_id"],
        "total_frames": request["total_frames"],
        "seed": request.get("seed") or 0,
        **extra,
    }
    if request["algorithm"] == "dqn":
        from service.training.dqn import DQNConfig

        return DQNConfig.with_defaults(
            request.get("hyperparameters"), recurrent=request.get("recurrent", False), **common
        )
    from service.training.actor_critic import ActorCriticConfig

    return ActorCriticConfig.with_defaults(
        request.get("hyperparameters"), algorithm=request["algorithm"], **common
    )


def trainer_for(algorithm: str) -> Callable[..., Any]:
    if algorithm == "dqn":
        from service.training.dqn import train
    else:
        from service.training.actor_critic import train
    return train


# -- queue -----------------------------------------------------------------------------------
class JSONMessageSerializer(Serializer):
    """huey messages as JSON (huey's default serializer is pickle)."""

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


def make_huey(settings: Settings) -> Huey:
    serializer = JSONMessageSerializer()
    if settings.queue_url:
        return RedisHuey("policy-server", url=settings.queue_url, results=False, serializer=serializer)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(
        "policy-server", filename=str(settings.data_dir / "queue.db"), results=False, serializer=serializer
    )


def make_job_store(settings: Settings) -> JobStore:
    if settings.queue_url:
        return RedisJobStore(settings.queue_url)
    return SqliteJobStore(settings.data_dir / "jobs.db")


Publisher = Callable[[str, dict, bytes], int]
Trainer = Callable[..., Any]


class Jobs:
    """The job system of one process: records, queue, and the task the worker runs."""

    def __init__(self, settings: Settings, publish: Publisher) -> None:
        self.settings = settings
        self.store = make_job_store(settings)
        self.huey = make_huey(settings)
        self.publish = publish
        self.stopping = threading.Event()  # set at shutdown: the running job stops at its next batch
        self._task = self.huey.task(name="run_job")(self.run)

    def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        job_id = uuid.uuid4().hex[:16]
        doc = {
            "job_id": job_id,
            "status": JobStatus.queued.value,
            "created_at": now_iso(),
            "started_at": None,
            "finished_at": None,
            "request": request,
            "progress": None,
            "result": None,
            "error": None,
            "device": None,
        }
        self.store.create(doc)
        self._task(job_id)
        return doc

    def cancel(self, job_id: str) -> dict[str, Any]:
        self.store.request_cancel(job_id)
        doc = self.store.get(job_id)
        if doc and doc["status"] == JobStatus.queued.value:
            doc = self.store.update(job_id, status=JobStatus.cancelled.value, finished_at=now_iso()) or doc
        return doc

    def run(self, job_id: str) -> None:
        """The huey task: train, then publish; every outcome is recorded."""
        doc = self.store.get(job_id)
        if doc is None or doc["status"] != JobStatus.queued.value or self.store.cancel_requested(job_id):
            if doc and doc["status"] == JobStatus.queued.value:
                self.store.update(job_id, status=JobStatus.cancelled.value, finished_at=now_iso())
            return
        req = doc["request"]
        try:
            device = resolve_device(req.get("device", "auto"))
            self.store.update(
                job_id,
                status=JobStatus.running.value,
                started_at=now_iso(),
                device=device,
                heartbeat=time.time(),
            )
            config = build_config(
                req, device=device, job_id=job_id, command=f"POST /v1/jobs {json.dumps(req, sort_keys=True)}"
            )

            def on_progress(point: dict[str, Any]) -> None:
                progress = {
                    k: point.get(k)
                    for k in ("frames", "total_frames", "episodes", "mean_return", "loss", "epsilon", "fps")
                }
                self.store.update(job_id, progress=progress, heartbeat=time.time())
                self.store.add_point(
                    job_id,
                    {
                        k: point.get(k)
                        for k in ("frames", "time_s", "mean_return", "loss", "epsilon", "eval_mean_return")
                    },
                )

            def should_stop() -> bool:
                return self.stopping.is_set() or self.store.cancel_requested(job_id)

            trained = trainer_for(req["algorithm"])(config, on_progress, should_stop)
            if trained.cancelled:
                if self.stopping.is_set() and not self.store.cancel_requested(job_id):
                    self.store.update(
                        job_id,
                        status=JobStatus.failed.value,
                        finished_at=now_iso(),
                        error="interrupted: the worker shut down during training",
                    )
                else:
                    self.store.update(job_id, status=JobStatus.cancelled.value, finished_at=now_iso())
                return
            version = self.publish(req["policy_name"], trained.spec, trained.weights)
            self.store.update(
                job_id,
                status=JobStatus.succeeded.value,
                finished_at=now_iso(),
                result={
                    "policy": req["policy_name"],
                    "version": version,
                    "eval_mean_return": trained.eval_mean_return,
                    "frames": trained.frames,
                    "wall_time_s": round(trained.wall_time_s, 2),
                },
            )
        except Exception as exc:
            log.error("job %s failed: %s", job_id, traceback.format_exc())
            self.store.update(
                job_id,
                status=JobStatus.failed.value,
                finished_at=now_iso(),
                error=f"{type(exc).__name__}: {exc}",
            )


class JobWorker:
    """Consumes the queue one job at a time (bounded concurrency: one training per worker)."""

    def __init__(self, jobs: Jobs, poll_s: float = 0.2) -> None:
        self.jobs = jobs
        self.poll_s = poll_s
        self._thread: threading.Thread | None = None

    def run_forever(self) -> None:
        huey = self.jobs.huey
        while not self.jobs.stopping.is_set():
            try:
                task = huey.dequeue()
            except Exception:
                log.exception("dequeue failed")
                task = None
            if task is None:
                self.jobs.stopping.wait(self.poll_s)
                continue
            try:
                huey.execute(task)
            except Exception:  # the task records its own failure; keep taking jobs
                log.exception("task %s raised", task.id)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="job-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.jobs.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
