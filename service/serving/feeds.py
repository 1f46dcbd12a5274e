"""The API side of ``source: sessions`` jobs: for each job, the policy its sessions act with (the
learner's latest weights, swapped in when the learner publishes), the reported transitions not
yet written, and the pacing that keeps clients within reach of the learner.

Pacing: a learner consumes ``frames_per_batch`` reported frames per batch of
``updates_per_batch`` updates. When this process has reported more than ``lag_frames`` beyond
what the learner has consumed, a step waits (up to ``PACE_WAIT_S``, in short sleeps) for it to
catch up, then answers 429 with ``Retry-After: 1``. So the update-to-data ratio is the
hyperparameters', however fast the clients step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from service.errors import Busy, Conflict, InvalidInput, NotFound
from service.registry.build import build_policy
from service.runtime.policy import PolicyRuntime
from service.training.algorithms import client_policy_spec, stored_config
from service.training.experience import ExperienceDir
from service.training.job import JobStatus, SessionsJob
from service.training.job_store import JobStore

log = logging.getLogger(__name__)

CHUNK = 64  # transitions per chunk file
FLUSH_S = 0.25  # ... or this old, whichever comes first
PACE_WAIT_S = 2.0
PACE_POLL_S = 0.02
FOLLOW_S = 0.02  # how often a feed looks for the learner's new weights


@dataclass
class Feed:
    job_id: str
    policy_name: str
    runtime: PolicyRuntime
    channel: ExperienceDir
    total_frames: int
    lag_frames: int
    device: torch.device
    epsilon: float = 1.0
    consumed: int = 0  # frames the acting weights' learner had consumed
    reported: int = 0  # frames this process reported
    learner: dict | None = None  # the learner.json the acting weights came with
    pending: list[dict[str, torch.Tensor]] = field(default_factory=list)
    pending_n: int = 0
    oldest: float = 0.0
    io: ThreadPoolExecutor | None = field(default=None, repr=False)  # JobFeeds' file thread
    checked: float = 0.0  # when ``follow`` last looked for new weights (monotonic)
    loading: asyncio.Future | None = field(default=None, repr=False)

    def follow(self) -> None:
        """Look for the learner's latest weights on the file thread when due (at most every
        ``FOLLOW_S``); when it published since, a new runtime is swapped in whole on the loop.
        The step that calls this goes on with the current weights: nothing waits for the files."""
        now = time.monotonic()
        if self.loading is not None or now - self.checked < FOLLOW_S:
            return
        self.checked = now
        self.loading = asyncio.wrap_future(self.io.submit(self.newer))
        self.loading.add_done_callback(self._take)

    def newer(self) -> tuple[PolicyRuntime, dict] | None:
        """(File thread.) A runtime with the learner's latest weights and the position it
        published with them, or None when it has not published since.

        The learner writes its weights, then ``learner.json`` (frames consumed, updates, epsilon:
        it changes with every publish). So that file, read first, tells whether there is
        something new (no file timestamps: two publishes within one clock tick look alike), and
        the weights read after it are at least as new as it.
        """
        state = self.channel.learner_state()
        if state is None or state == self.learner:
            return None
        try:
            weights = self.channel.load_policy()
        except (OSError, ValueError):
            return None  # mid-replace on a filesystem without atomic rename: next time
        # a new runtime, swapped in whole: a forward pass running meanwhile keeps the old one
        runtime = PolicyRuntime(self.runtime.spec, build_policy(self.runtime.spec, self.device), self.device)
        runtime.core.load_state_dict(weights)
        return runtime, state

    def _take(self, done: asyncio.Future) -> None:
        self.loading = None
        if done.cancelled():
            return
        if done.exception() is not None:
            log.error("job %s: reading the learner's weights failed: %r", self.job_id, done.exception())
            return
        self.swap(done.result())

    def swap(self, newer: tuple[PolicyRuntime, dict] | None) -> None:
        if newer is None:
            return
        self.runtime, self.learner = newer
        self.epsilon, self.consumed = float(self.learner["epsilon"]), int(self.learner["consumed"])

    @property
    def learning(self) -> bool:
        return self.consumed < self.total_frames

    async def pace(self) -> None:
        deadline = time.monotonic() + PACE_WAIT_S
        while self.reported - self.consumed > self.lag_frames:
            if time.monotonic() > deadline:
                raise Busy(
                    f"the learner of job {self.job_id} is behind ({self.reported} frames reported, "
                    f"{self.consumed} learned from); retry shortly",
                    retry_after_s=1,
                )
            await asyncio.sleep(PACE_POLL_S)
            self.flush()
            self.follow()

    def add(self, transitions: dict[str, torch.Tensor]) -> None:
        n = transitions["action"].shape[0] if transitions else 0
        if n == 0:
            return
        if not self.pending:
            self.oldest = time.monotonic()
        self.pending.append(transitions)
        self.pending_n += n
        self.reported += n
        if self.pending_n >= CHUNK or time.monotonic() - self.oldest > FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Hand the pending transitions to the file thread as one chunk (written in order)."""
        if not self.pending:
            return
        chunk = {k: torch.cat([t[k] for t in self.pending]) for k in self.pending[0]}
        self.pending, self.pending_n = [], 0
        self.io.submit(self._write, chunk)

    def _write(self, chunk: dict[str, torch.Tensor]) -> None:
        try:
            self.channel.write_chunk(chunk)
        except OSError as exc:  # the disk: logged, the session goes on
            log.error("job %s: writing %d reported transitions failed: %r", self.job_id, len(chunk), exc)


class JobFeeds:
    """The feeds of the jobs this process's sessions are bound to."""

    def __init__(self, root: Path, store: JobStore, device: torch.device) -> None:
        self.root = root
        self.store = store
        self.device = device
        self._feeds: dict[str, Feed] = {}
        # every file read and write of the feeds, in order (one thread: chunks stay in sequence)
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-feeds")

    async def open(self, job_id: str) -> Feed:
        feed = self._feeds.get(job_id)
        if feed is not None:
            return feed
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None:
            raise NotFound(f"job {job_id[:64]!r} not found")
        if not isinstance(job.request, SessionsJob):
            raise InvalidInput(
                f"job {job_id} trains on {job.request.env_id}; bind sessions to a job with source 'sessions'"
            )
        if job.status not in (JobStatus.queued, JobStatus.running):
            raise Conflict(f"job {job_id} is {job.status.value}: sessions bind to queued or running jobs")
        feed = await asyncio.wrap_future(self.io.submit(self._make, job))
        return self._feeds.setdefault(job_id, feed)

    def _make(self, job) -> Feed:
        """(File thread.) The feed of ``job``: its acting runtime, with the learner's latest
        weights when it has published."""
        config = stored_config(job)
        spec = client_policy_spec(config)
        runtime = PolicyRuntime(spec, build_policy(spec, self.device), self.device)
        hp = config.hyperparameters
        feed = Feed(
            job_id=job.job_id,
            policy_name=job.request.policy_name,
            runtime=runtime,
            channel=ExperienceDir(self.root / job.job_id),
            total_frames=config.total_frames,
            lag_frames=max(4 * hp.frames_per_batch, 2 * CHUNK),
            device=self.device,
            epsilon=hp.eps_start,
            io=self.io,
        )
        feed.swap(feed.newer())
        return feed

    def flush_all(self) -> None:
        """Write every feed's pending transitions, and wait until all writes are done."""
        for feed in self._feeds.values():
            feed.flush()
        self.io.submit(lambda: None).result()

    def close(self) -> None:
        self.flush_all()
        self.io.shutdown(wait=True)
