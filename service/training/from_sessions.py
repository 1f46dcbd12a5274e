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
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict

from service.registry.build import weights_bytes
from service.training.common import Progress, StopCheck, TrainedPolicy, flushed_denormals
from service.training.dqn import SEGMENT
from service.training.experience import ExperienceDir

IDLE_S = 0.02  # how long the learner sleeps when no new chunk has arrived
RECENT = 20
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


def train_from_sessions(
    algo: Any,
    config: Any,
    on_progress: Progress | None,
    should_stop: StopCheck | None,
    start: float,
) -> TrainedPolicy:
    hp = algo.hyperparameters
    channel = ExperienceDir(config.experience_dir)
    received = consumed = updates = episodes = seeded = 0
    recent: list[float] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # window mean, frames, weights
    last_loss: torch.Tensor | None = None
    cancelled = False
    streams = Streams(4 * hp.slice_len) if algo.recurrent else None

    def store(td: TensorDict) -> None:
        for part in streams.add(td) if streams is not None else [td]:
            algo.buffer.extend(part.exclude(*EXTRA))

    # an offline start: earlier jobs' recorded transitions fill the buffer (not counted as frames)
    for job_id in config.experience_from:
        for td in ExperienceDir(Path(config.experience_dir).parent / job_id).read_new():
            seeded += td.numel()
            store(td)
    # resuming (the job was interrupted): the last published weights and position; the buffer
    # refills from every chunk on disk below. The optimizer's moments start afresh.
    resumed = channel.learner_state()
    if resumed is not None:
        algo.built.core.load_state_dict(channel.load_policy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "already initialized": re-copying is the point
            algo.target.init_()
        consumed, updates = int(resumed["consumed"]), int(resumed["updates"])
        algo.after_batch(consumed)  # epsilon where the schedule was
    start_frames = consumed

    def publish() -> None:
        channel.publish(
            algo.built.core.state_dict(),
            {
                "consumed": consumed,
                "received": received,
                "updates": updates,
                "epsilon": float(algo.egreedy.eps),
            },
        )

    with flushed_denormals():
        publish()  # sessions act with the initial (or restored) policy and epsilon
        while consumed < config.total_frames:
            if should_stop and should_stop():
                cancelled = True
                break
            chunks = channel.read_new()
            if not chunks:
                time.sleep(IDLE_S)
                continue
            for td in chunks:
                finished = td["episode_return"][~torch.isnan(td["episode_return"])].tolist()
                episodes += len(finished)
                recent = (recent + finished)[-RECENT:]
                received += td.numel()
                store(td)
            while received - consumed >= hp.frames_per_batch and consumed < config.total_frames:
                consumed += hp.frames_per_batch
                # a recurrent buffer samples sequences: it needs one whole segment first
                ready = len(algo.buffer) >= (streams.length if streams is not None else 1)
                if consumed + seeded >= hp.init_random_frames and ready:
                    size = algo.buffer.batch_size
                    draw = algo.buffer.sample(size * hp.updates_per_batch)
                    for i in range(hp.updates_per_batch):
                        last_loss = algo.update(draw[i * size : (i + 1) * size])
                        updates += 1
                extra = algo.after_batch(hp.frames_per_batch)
                publish()
                if len(recent) == RECENT and (best is None or sum(recent) / RECENT >= best[0]):
                    weights = {k: v.detach().clone() for k, v in algo.built.core.state_dict().items()}
                    best = (sum(recent) / RECENT, consumed, weights)
                now = time.perf_counter() - start
                if on_progress:
                    on_progress(
                        {
                            "frames": consumed,
                            "total_frames": config.total_frames,
                            "episodes": episodes,
                            "mean_return": sum(recent) / len(recent) if recent else None,
                            "loss": None if last_loss is None else float(last_loss),
                            "fps": (consumed - start_frames) / now,
                            "time_s": now,
                            **extra,
                        }
                    )
    wall = time.perf_counter() - start
    reported = sum(recent) / len(recent) if recent else math.nan
    chosen, window = "final", len(recent)
    if best is not None and not cancelled and best[0] >= reported:
        algo.built.core.load_state_dict(best[2])
        reported, chosen = best[0], f"best client-reported window (at {best[1]} frames)"
        window = RECENT
    spec = algo.spec.model_copy(deep=True)
    spec.provenance = {
        "algorithm": "dqn",
        "source": "sessions",
        "job_id": config.job_id,
        "frames": consumed,
        "updates": updates,
        "wall_time_s": round(wall, 2),
        "device": str(config.device),
        "seed": config.seed,
        "eval_mean_return": reported,
        "eval_episodes": window,
        "eval_source": f"client-reported returns of {window} episodes (no server-side env)",
        "hyperparameters": hp.model_dump(),
        "command": config.command,
        "weights": chosen,
        "resumed_at_frames": None if resumed is None else int(resumed["consumed"]),
        "experience_from": config.experience_from,
        "seeded_frames": seeded,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return TrainedPolicy(
        spec=spec,
        weights=weights_bytes(algo.built),
        eval_mean_return=reported,
        frames=consumed,
        wall_time_s=wall,
        device=str(config.device),
        cancelled=cancelled,
    )
