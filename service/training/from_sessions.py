"""The learner of a ``source: sessions`` DQN job: no environment in the server, the transitions
clients report through sessions bound to the job (``experience.ExperienceDir``).

The loop keeps DQN's update-to-data ratio whatever the clients' pace: every ``frames_per_batch``
reported frames (once ``init_random_frames`` have arrived) it does ``updates_per_batch``
updates, then anneals epsilon by those frames and publishes the weights and its position
(``learner.json``: frames consumed, updates, epsilon) for the API processes, which act with them
and hold clients back when they get too far ahead (``serving.feeds``). At ``total_frames``
consumed frames it publishes a version like any job. There is no environment here to evaluate
candidate weights in, so the candidates are judged by what clients report: the published weights
are those the learner held when the mean of the last 20 client-reported episode returns was at
its best (the later of equals), or the final ones when no window of 20 episodes completed; that
mean is the version's reported return.

Durability: the transitions stay on disk. A failed job queued again (``POST
/v1/jobs/{id}/resume``, e.g. after a worker restart) continues from its last published weights
and position, its buffer refilled from every chunk; ``experience_from`` (earlier jobs' ids)
seeds the buffer of a new job with their recorded transitions, which count towards
``init_random_frames`` but not towards ``total_frames``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tensordict import TensorDict

from service.training.common import (
    RECENT,
    SEGMENT,
    Batch,
    Chosen,
    LoopResult,
    StopCheck,
    TrainConfig,
    state_of,
)
from service.training.experience import ExperienceDir

if TYPE_CHECKING:  # the DQN that runs this source imports this module
    from service.training.dqn import DQN

IDLE_S = 0.02  # how long the learner sleeps when no new chunk has arrived
EXTRA = ("episode_return", "stream", "step")  # in a chunk, not in the replay buffer


class Streams:
    """Recurrent jobs: each client env's transitions (``stream``), put back in step order and cut
    into segments of ``length`` for the ``SliceSampler`` (one ``SEGMENT`` id each, as the
    env-backed recurrent DQN cuts each env copy's stream per collected batch).

    A segment is also cut where steps are missing (a step reported without a reward) and no
    episode starts: the LSTM must not run across a gap. Episode starts inside a segment stay
    (``is_init``), as in the env-backed buffer.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.pending: dict[int, list[TensorDict]] = {}
        self.counts: dict[int, int] = {}
        self.segments = 0

    def add(self, td: TensorDict) -> list[TensorDict]:
        """Take a chunk's transitions; return the segments completed by them."""
        out = []
        streams = td["stream"]
        for stream in streams.unique().tolist():
            part = td[streams == stream]
            self.pending.setdefault(stream, []).append(part)
            self.counts[stream] = self.counts.get(stream, 0) + part.numel()
            if self.counts[stream] >= self.length:
                del self.counts[stream]
                rows = torch.cat(self.pending.pop(stream))
                out += self._cut(rows[rows["step"].argsort()])
        return out

    def _cut(self, rows: TensorDict) -> list[TensorDict]:
        step, init = rows["step"], rows["is_init"].reshape(-1)
        gaps = ((step[1:] != step[:-1] + 1) & ~init[1:]).nonzero().flatten() + 1
        bounds = [0, *gaps.tolist(), rows.numel()]
        out = []
        for a, b in zip(bounds, bounds[1:], strict=False):
            segment = rows[a:b]
            segment[SEGMENT] = torch.full((b - a,), self.segments, dtype=torch.int64)
            self.segments += 1
            out.append(segment)
        return out


class SessionsSource:
    """The loop's batches from the job's experience dir: every ``frames_per_batch`` reported
    frames one batch (``common.run_offpolicy`` updates on it once ``init_random_frames`` have
    arrived); after its updates the weights and position are published for the API's sessions.

    At construction: an offline start (``experience_from``: earlier jobs' transitions fill the
    buffer, not counted as frames) and a resumed job's last published weights and position (the
    buffer refills from every chunk on disk as they are read; the optimizer's moments start
    afresh).
    """

    def __init__(self, algo: DQN, config: TrainConfig) -> None:
        hp = algo.hyperparameters
        self.algo, self.config = algo, config
        self.channel = ExperienceDir(config.experience_dir)
        self.streams = Streams(4 * hp.slice_len) if algo.recurrent else None
        # a recurrent buffer samples sequences: it needs one whole segment first
        self.min_buffer = self.streams.length if self.streams is not None else 1
        self.seeded = 0
        for job_id in config.experience_from:
            for td in ExperienceDir(Path(config.experience_dir).parent / job_id).read_new():
                self.seeded += td.numel()
                for part in self._parts(td):
                    algo.buffer.extend(part)
        self.resumed = self.channel.learner_state()
        self.start_frames = self.start_updates = 0
        if self.resumed is not None:
            self.start_frames, self.start_updates = (
                int(self.resumed["consumed"]),
                int(self.resumed["updates"]),
            )
            algo.restore(self.channel.load_policy(), self.start_frames)
        self.consumed, self.received = self.start_frames, 0

    def _parts(self, td: TensorDict) -> list[TensorDict]:
        """A chunk's transitions as the buffer stores them (recurrent: completed segments)."""
        if self.streams is None:  # a stateless job's buffer has no use for episode starts
            return [td.exclude(*EXTRA, "is_init")]
        return [p.exclude(*EXTRA) for p in self.streams.add(td)]

    def batches(self, should_stop: StopCheck) -> Iterator[Batch]:
        hp, total = self.algo.hyperparameters, self.config.total_frames
        self._publish(self.start_updates, float(self.algo.egreedy.eps))  # the initial policy
        store: list[TensorDict] = []
        finished: list[float] = []
        while self.consumed < total:
            if should_stop():
                return
            chunks = self.channel.read_new()
            if not chunks:
                time.sleep(IDLE_S)
                continue
            for td in chunks:
                finished += td["episode_return"][~torch.isnan(td["episode_return"])].tolist()
                self.received += td.numel()
                store += self._parts(td)
            while self.received - self.consumed >= hp.frames_per_batch and self.consumed < total:
                self.consumed += hp.frames_per_batch
                yield Batch(store, hp.frames_per_batch, finished)
                store, finished = [], []

    def after_updates(self, frames: int, updates: int, extra: dict[str, Any]) -> None:
        self._publish(updates, extra["epsilon"])

    def _publish(self, updates: int, epsilon: float) -> None:
        self.channel.publish(
            self.algo.built.core.state_dict(),
            {"consumed": self.consumed, "received": self.received, "updates": updates, "epsilon": epsilon},
        )

    def close(self) -> None:
        return None


class ClientReturns:
    """No environment here to evaluate weights in: the published weights are those the learner
    held when the mean of the last ``RECENT`` client-reported episode returns was at its best
    (the later of equals), or the final ones when no such window completed or the final window
    is as good; that mean is the version's reported return."""

    def __init__(self, algo: DQN, source: SessionsSource) -> None:
        self.algo, self.source = algo, source
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # mean, frames, weights

    def observe(self, frames: int, point: dict[str, Any], recent: list[float]) -> None:
        if len(recent) == RECENT and (self.best is None or sum(recent) / RECENT >= self.best[0]):
            self.best = (sum(recent) / RECENT, frames, state_of(self.algo.built))

    def choose(self, loop: LoopResult) -> Chosen:
        recent, best, source = loop.recent, self.best, self.source
        reported = sum(recent) / len(recent) if recent else math.nan
        state, label, window = state_of(self.algo.built), "final", len(recent)
        if best is not None and not loop.cancelled and best[0] >= reported:
            state, reported, window = best[2], best[0], RECENT
            label = f"best client-reported window (at {best[1]} frames)"
        provenance = {
            "source": "sessions",
            "eval_source": f"client-reported returns of {window} episodes (no server-side env)",
            "resumed_at_frames": None if source.resumed is None else source.start_frames,
            "experience_from": source.config.experience_from,
            "seeded_frames": source.seeded,
        }
        return Chosen(state, label, reported, window, provenance)
