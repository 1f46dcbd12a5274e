"""What a client reports on a session's step — ``reward``, ``terminated``, ``truncated``:
the outcome of each env's previous action — checked before anything changes, then turned into
transitions ``(previous observation, previous action, reward, this observation, terminated,
truncated)`` for the job's learner.

Per env the session keeps ``pending``: the previous observation and action, whether there is
one (not after a reset or an episode's end), the running episode return, for a recurrent job the
LSTM state that step started from, then whether it started an episode and its step number.
Every transition carries its client env (``stream``), ``step`` and ``is_init``, so each env's
stream can be cut back into sequences (the recurrent learner) and episodes (a job's experience
exported as a dataset); a recurrent one also its state before and after. When an env
reports ``terminated`` or ``truncated``, its observation is the episode's last (the transition's
next observation, which a truncation bootstraps from) and the action answered for it is not
kept: its next call starts an episode (``reset: true``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from service.errors import InvalidInput
from service.runtime.policy import PolicyRuntime
from service.runtime.sessions import Session


def _per_env(name: str, value, num_envs: int, dtype: torch.dtype) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, list):
        if len(value) != num_envs:
            raise InvalidInput(f"{name} has {len(value)} values; the session has num_envs={num_envs}")
    else:
        value = [value] * num_envs
    if dtype.is_floating_point:  # via float64: a number past float32's range becomes inf (refused)
        return torch.tensor(value, dtype=torch.float64).to(dtype)
    return torch.tensor(value, dtype=dtype)


def pending_bytes(runtime: PolicyRuntime) -> int:
    """Bytes per env of a job session's ``pending``."""
    obs = runtime.spec.observation
    obs_bytes = 8 if obs.discrete else math.prod(obs.shape) * (1 if obs.dtype == "uint8" else 4)
    recurrent = 2 * 4 * math.prod(runtime.state_shape) if runtime.recurrent else 0
    return obs_bytes + 8 + 1 + 4 + recurrent + 1 + 8


def stream_ids(session_id: str, envs: list[int]) -> torch.Tensor:
    """One int64 per (session, env): the client env a transition comes from."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(f"{session_id}:{i}".encode(), digest_size=7).digest()) for i in envs],
        dtype=torch.int64,
    )


@dataclass
class Report:
    reward: torch.Tensor | None  # [E] float32 (NaN: nothing reported for that env), or None
    terminated: torch.Tensor  # [E] bool
    truncated: torch.Tensor
    resets: torch.Tensor

    @classmethod
    def check(cls, p, session: Session, resets: torch.Tensor) -> Report:
        """The step's report, or 422 saying what does not fit (nothing is recorded then)."""
        n = session.num_envs
        reported = None
        raw = p.reward
        if isinstance(raw, list):
            reported = torch.tensor([r is not None for r in raw], dtype=torch.bool)
            raw = [0.0 if r is None else r for r in raw]
        reward = _per_env("reward", raw, n, torch.float32)
        terminated = _per_env("terminated", p.terminated, n, torch.bool)
        truncated = _per_env("truncated", p.truncated, n, torch.bool)
        if reward is None and (terminated is not None or truncated is not None):
            raise InvalidInput(
                "terminated/truncated describe the previous action's outcome: send its reward too"
            )
        if reward is not None:
            if not torch.isfinite(reward).all():
                raise InvalidInput("reward holds values that are not finite as float32")
            if reported is None:
                reported = torch.ones(n, dtype=torch.bool)
            ends = torch.zeros(n, dtype=torch.bool)
            for flags in (terminated, truncated):
                if flags is not None:
                    ends |= flags
            if (ends & ~reported).any():
                raise InvalidInput("an env that terminated or was truncated needs its reward (not null)")
            reward = torch.where(reported, reward, torch.full_like(reward, math.nan))
            no_prev = torch.ones(n, dtype=torch.bool)
            if session.pending is not None:
                no_prev = ~(session.pending[2] & ~resets)
            if (reported & no_prev).any():
                envs = (reported & no_prev).nonzero().flatten().tolist()[:10]
                raise InvalidInput(
                    f"reward for env(s) {envs} that have no previous action (a session's first step, a "
                    "reset, or the step after an episode ended): send null for them, and report an "
                    "action's reward on the call after it"
                )
        zeros = torch.zeros(n, dtype=torch.bool)
        return cls(
            reward,
            zeros if terminated is None else terminated,
            zeros if truncated is None else truncated,
            resets,
        )

    def record(
        self,
        session: Session,
        obs: torch.Tensor,
        action: torch.Tensor,
        lstm: tuple[torch.Tensor, torch.Tensor] | None = None,
        is_init: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The transitions this report completes, and the session's ``pending`` moved on.

        ``lstm`` (recurrent jobs): the ``(h, c)`` this step started from — the previous step's
        next state; ``is_init``: whether the step starts an episode.
        """
        n = session.num_envs
        prev_init, prev_step = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.int64)
        if session.pending is None:
            prev_obs, prev_action = torch.zeros_like(obs), torch.zeros(n, dtype=torch.int64)
            has_prev, running = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.float32)
            prev_lstm = None if lstm is None else (torch.zeros_like(lstm[0]), torch.zeros_like(lstm[1]))
        else:
            prev_obs, prev_action, has_prev, running = session.pending[:4]
            if lstm is not None:
                prev_lstm = session.pending[4:6]
            kept = len(session.pending) > 4 + (2 if lstm is not None else 0)
            # (a stateless job's session saved by an older release kept neither)
            prev_init, prev_step = session.pending[-2:] if kept else (~prev_init, prev_step)
        has_prev = has_prev & ~self.resets
        running = torch.where(self.resets, torch.zeros_like(running), running)
        ends = self.terminated | self.truncated
        transitions: dict[str, torch.Tensor] = {}
        if self.reward is not None:
            got = ~torch.isnan(self.reward)
            running = torch.where(got, running + torch.nan_to_num(self.reward), running)
            idx = (has_prev & got).nonzero().flatten()
            transitions = {
                "observation": prev_obs[idx],
                "action": prev_action[idx],
                "reward": self.reward[idx],
                "next_observation": obs[idx],
                "terminated": self.terminated[idx],
                "truncated": self.truncated[idx],
                "episode_return": torch.where(ends, running, torch.full_like(running, math.nan))[idx],
                "is_init": prev_init[idx],
                "stream": stream_ids(session.session_id, idx.tolist()),
                "step": prev_step[idx],
            }
            if lstm is not None:
                transitions.update(
                    recurrent_state_h=prev_lstm[0][idx],
                    recurrent_state_c=prev_lstm[1][idx],
                    next_recurrent_state_h=lstm[0][idx].cpu(),
                    next_recurrent_state_c=lstm[1][idx].cpu(),
                )
        pending = (
            obs.detach().clone(),
            action.detach().to(torch.int64).reshape(n).clone(),
            ~ends,
            torch.where(ends, torch.zeros_like(running), running),
        )
        starts = torch.zeros(n, dtype=torch.bool) if is_init is None else is_init.reshape(n).clone()
        if lstm is not None:
            start = starts.reshape(n, *([1] * (lstm[0].dim() - 1)))  # an episode starts from zeros
            pending += tuple(torch.where(start, 0.0, t.detach().cpu()) for t in lstm)
        session.pending = (*pending, starts, torch.full((n,), session.steps, dtype=torch.int64))
        return transitions


@dataclass
class Outcome:
    """What a served policy's session step reports: per env the previous action's reward and
    whether it ended the episode (``terminated`` or ``truncated``). Rewards add up into the
    env's running episode return, which an end credits to the session's version; an env that
    ends starts its next episode at its next step, as with ``reset``."""

    reward: list[float]
    ends: list[bool]
    terminated: list[bool]
    truncated: list[bool]
    reported: list[float | None]  # as sent: None for an env that reported nothing

    @classmethod
    def nothing(cls, num_envs: int) -> Outcome:
        no = [False] * num_envs
        return cls([0.0] * num_envs, no, no, no, [None] * num_envs)

    @classmethod
    def check(cls, p, num_envs: int) -> Outcome | None:
        """The step's report (``None``: it reports nothing), or 422 saying what does not fit."""
        if p.reward is None:
            if p.terminated is not None or p.truncated is not None:
                raise InvalidInput(
                    "terminated/truncated describe the previous action's outcome: send its reward too"
                )
            return None
        raw = p.reward if isinstance(p.reward, list) else [p.reward] * num_envs
        if len(raw) != num_envs:
            raise InvalidInput(f"reward has {len(raw)} values; the session has num_envs={num_envs}")
        flags = {}
        for name in ("terminated", "truncated"):
            value = getattr(p, name)
            value = [False] * num_envs if value is None else value
            value = value if isinstance(value, list) else [value] * num_envs
            if len(value) != num_envs:
                raise InvalidInput(f"{name} has {len(value)} values; the session has num_envs={num_envs}")
            flags[name] = [bool(f) for f in value]
        ends = [a or b for a, b in zip(flags["terminated"], flags["truncated"], strict=True)]
        reward = []
        for i, (r, end) in enumerate(zip(raw, ends, strict=True)):
            if r is None and end:
                raise InvalidInput("an env that terminated or was truncated needs its reward (not null)")
            if r is not None and not math.isfinite(r):
                raise InvalidInput(f"reward of env {i} is not a finite number")
            reward.append(0.0 if r is None else float(r))
        return cls(reward, ends, flags["terminated"], flags["truncated"], list(raw))

    def apply(self, session: Session, resets: torch.Tensor | None) -> list[float]:
        """The session's running returns moved on; the returns of the episodes that ended."""
        returns = list(session.returns or [0.0] * session.num_envs)
        finished = []
        for i, (r, end) in enumerate(zip(self.reward, self.ends, strict=True)):
            returns[i] += r
            if end:
                finished.append(returns[i])
                returns[i] = 0.0
        if resets is not None:  # an episode abandoned without an end is not credited
            returns = [0.0 if reset else ret for ret, reset in zip(returns, resets.tolist(), strict=True)]
        session.returns = returns
        if finished:
            session.needs_init = session.needs_init | torch.tensor(self.ends, dtype=torch.bool)
        return finished
