"""The channel between client sessions and a ``source: sessions`` job's learner, on disk under
``<DATA_DIR>/experience/<job_id>/`` so that it works across processes (API replicas, a separate
worker) and survives restarts:

- ``chunks/*.safetensors``: reported transitions, appended by the API processes (one file per
  flush, written to a temporary name and renamed: a reader never sees half a chunk). They stay:
  a resumed job, or a later one seeded from them, reads them all again.
- ``policy.safetensors`` + ``learner.json``: the learner's current weights and where it is
  (frames consumed, updates, epsilon), replaced atomically after every batch of updates; API
  processes reload them when the file changes.

Safetensors and JSON only: nothing on these paths is unpickled.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from tensordict import TensorDict

# A chunk's tensors, [n, ...] each: observation, action, reward, next_observation, terminated,
# truncated, episode_return (NaN unless the transition ends an episode), stream (the client env),
# step (its step number) and is_init (the step starts an episode), to cut each env's stream into
# sequences and episodes; a recurrent job's add recurrent_state_h/_c (the step's LSTM input) and
# next_recurrent_state_h/_c.


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ExperienceDir:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.chunks = self.path / "chunks"
        self._seen: set[str] = set()

    # -- API side ---------------------------------------------------------------------------
    def write_chunk(self, tensors: dict[str, torch.Tensor]) -> None:
        self.chunks.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        _atomic_write(self.chunks / name, save_tensors({k: v.contiguous() for k, v in tensors.items()}))

    def learner_state(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / "learner.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def load_policy(self) -> dict[str, torch.Tensor]:
        return load_tensors((self.path / "policy.safetensors").read_bytes())

    # -- learner side -----------------------------------------------------------------------
    def read_new(self) -> list[TensorDict]:
        """Chunks not read yet, oldest first, as transitions TorchRL's DQN loss reads."""
        if not self.chunks.exists():
            return []
        names = sorted(e.name for e in os.scandir(self.chunks) if e.name.endswith(".safetensors"))
        out = []
        for name in names:
            if name in self._seen:
                continue
            self._seen.add(name)
            t = load_tensors((self.chunks / name).read_bytes())
            n = t["action"].shape[0]
            terminated = t["terminated"].bool().reshape(n, 1)
            truncated = t["truncated"].bool().reshape(n, 1)
            td = TensorDict(
                {
                    "observation": t["observation"],
                    "action": t["action"],
                    "episode_return": t["episode_return"],
                    "next": {
                        "observation": t["next_observation"],
                        "reward": t["reward"].reshape(n, 1),
                        "terminated": terminated,
                        "truncated": truncated,
                        "done": terminated | truncated,
                    },
                },
                batch_size=[n],
            )
            if (
                "stream" in t
            ):  # the client env, its step number, episode starts (older chunks: recurrent only)
                td.update(
                    {
                        "is_init": t["is_init"].bool().reshape(n, 1),
                        "stream": t["stream"],
                        "step": t["step"],
                    }
                )
            if "recurrent_state_h" in t:  # a recurrent job's: the LSTM state before and after each step
                td.update(
                    {
                        "recurrent_state_h": t["recurrent_state_h"],
                        "recurrent_state_c": t["recurrent_state_c"],
                        ("next", "recurrent_state_h"): t["next_recurrent_state_h"],
                        ("next", "recurrent_state_c"): t["next_recurrent_state_c"],
                    }
                )
            out.append(td)
        return out

    def publish(self, state_dict: dict[str, torch.Tensor], learner: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        _atomic_write(self.path / "policy.safetensors", save_tensors(weights))
        _atomic_write(self.path / "learner.json", json.dumps(learner).encode())


def episodes(chunks: list[TensorDict]) -> tuple[list[TensorDict], int]:
    """Each client env's whole episodes in a job's transitions (``ExperienceDir.read_new``'s
    chunks): per env (``stream``) in step order, from a step that starts an episode
    (``is_init``) through consecutive steps to one that terminates or is truncated. Returns the
    episodes (their transitions in order, the next observation of each the observation of the
    one after) and how many transitions were left out: an episode begun before the job's first
    chunk, cut by a step reported without a reward, still open, or in chunks older than the
    stream id."""
    with_stream = [td for td in chunks if "stream" in td.keys()]
    left_out = sum(td.numel() for td in chunks) - sum(td.numel() for td in with_stream)
    if not with_stream:
        return [], left_out
    rows = torch.cat(
        [td.select("observation", "action", "is_init", "stream", "step", "next") for td in with_stream]
    )
    out: list[TensorDict] = []
    for stream in rows["stream"].unique().tolist():
        part = rows[rows["stream"] == stream]
        part = part[part["step"].argsort()]
        steps, starts = part["step"].tolist(), part["is_init"].reshape(-1).tolist()
        dones = part["next", "done"].reshape(-1).tolist()
        begin = None  # where the open episode began in ``part``
        for i, (step, start, done) in enumerate(zip(steps, starts, dones, strict=True)):
            if start:
                left_out += 0 if begin is None else i - begin
                begin = i
            elif begin is not None and step != steps[i - 1] + 1:  # a gap: the open episode is cut
                left_out += i - begin
                begin = None
            if begin is None:
                left_out += 1
                continue
            if done:
                out.append(part[begin : i + 1])
                begin = None
        left_out += 0 if begin is None else len(steps) - begin
    return out, left_out
