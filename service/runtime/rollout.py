"""Run a policy version in an allow-listed environment and return the episodes.

Runs on a worker thread; every policy step is an ``ActCall`` through the micro-batcher
(``submit``), the same path as ``/act`` and sessions, so a rollout equals stepping the episode by
hand.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDict
from torchrl.envs.utils import step_mdp

from service.envs import action_parts, flatten_action, make_env, multi_part
from service.errors import Busy, TimedOut
from service.exploration import ExplorationParams
from service.runtime.call import ActCall, ActResult, as_list
from service.runtime.policy import PolicyRuntime


class RolloutSlots:
    """At most ``limit`` rollouts at once; beyond that 429, never an unbounded queue."""

    def __init__(self, limit: int) -> None:
        self._sem = threading.BoundedSemaphore(limit)

    def __enter__(self) -> RolloutSlots:
        if not self._sem.acquire(blocking=False):
            raise Busy("too many rollouts running; retry later", retry_after_s=2)
        return self

    def __exit__(self, *exc: object) -> None:
        self._sem.release()


def step_seed(seed: int | None, step: int) -> int | None:
    """Per-step seed of a seeded random rollout (independent draws, reproducible)."""
    return None if seed is None else (seed * 1_000_003 + step) % (2**63 - 1)


def run_rollout(
    runtime: PolicyRuntime,
    env_id: str,
    *,
    submit: Callable[[PolicyRuntime, ActCall], ActResult],
    episodes: int,
    max_steps: int,
    explore: ExplorationParams,
    seed: int | None,
    return_trajectory: bool,
    timeout_s: float,
) -> dict[str, Any]:
    """Episode ``i`` resets with seed ``seed + i``; episodes end on termination or truncation."""
    deadline = time.monotonic() + timeout_s
    exploration = runtime.effective(explore.type)
    env = make_env(env_id, max_steps=max_steps)
    action = runtime.spec.action.model_dump()
    parts = action_parts(action) if multi_part(action) else None  # the env takes one flat vector
    out = []
    try:
        for i in range(episodes):
            ep_seed = None if seed is None else seed + i
            if ep_seed is not None:
                env.set_seed(ep_seed)
            td = env.reset()
            state = runtime.zero_state(1)
            is_init = torch.ones(1, dtype=torch.bool)
            total, length, terminated, truncated = 0.0, 0, False, False
            traj: dict[str, list] = {"observation": [], "action": [], "reward": [], "done": []}
            while True:
                if time.monotonic() > deadline:
                    raise TimedOut(
                        f"rollout ran past its time limit of {timeout_s:g} s; "
                        "ask for fewer episodes or a smaller max_steps"
                    )
                obs, mask = runtime.codec.from_env(td)  # the env's own mask, when it gives one
                call = ActCall(
                    obs,
                    exploration,
                    explore.epsilon,
                    explore.noise_std,
                    step_seed(ep_seed, length),
                    state=state,
                    is_init=is_init,
                    mask=mask,
                )
                res = submit(runtime, call)
                td["action"] = res.action[0] if parts is None else flatten_action(parts, res.action)[0]
                td = env.step(td)
                reward = float(td["next", "reward"].item())
                terminated = bool(td["next", "terminated"].item())
                truncated = bool(td["next", "truncated"].item())
                done = terminated or truncated
                total += reward
                length += 1
                if return_trajectory:
                    traj["observation"].append(_jsonable(obs[0]))
                    traj["action"].append(as_list(res.action)[0])
                    traj["reward"].append(reward)
                    traj["done"].append(done)
                if done:
                    break
                state, is_init = res.state, torch.zeros(1, dtype=torch.bool)
                td = step_mdp(td)
            ep: dict[str, Any] = {
                "return": total,
                "length": length,
                "seed": ep_seed,
                "terminated": terminated,
                "truncated": truncated,
            }
            if return_trajectory:
                ep["trajectory"] = traj
            out.append(ep)
    finally:
        env.close()
    returns = [e["return"] for e in out]
    mean = sum(returns) / len(returns)
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / len(returns))
    return {"episodes": out, "mean_return": mean, "std_return": std}


def _jsonable(obs: torch.Tensor | TensorDict) -> Any:
    """One observation as the JSON a client would send for it."""
    if isinstance(obs, TensorDict):
        return {k: v.tolist() for k, v in obs.items()}
    return obs.tolist()
