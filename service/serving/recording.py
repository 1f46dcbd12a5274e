"""Recording a served policy's session into an offline dataset (``POST /v1/sessions
{"record": "<dataset id>"}``): each env's episode, with every answered action's propensity
(``infos.log_prob``: log mu(a_t | s_t) under the exploration actually used), appended to the
Minari dataset when a step reports its end.

Per env a ``Draft`` holds the open episode in this process's memory (recording sessions step on
the process that holds their drafts: the memory session store, or a load balancer that keeps a
session on one replica). Drafts of sessions gone idle past the session ttl are dropped, and the
drafts of one dataset together with what it holds on disk stay within ``MAX_DATASET_BYTES``:
past it the step is refused (422) and what the dataset holds is kept. An env's episode is
recorded when a step ends it (``terminated`` / ``truncated`` with its reward); one that is reset,
or whose action gets no reward on the next step (``null``: an idle env), is dropped unrecorded.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from service.datasets.store import EPISODE_OVERHEAD, PROPENSITY, DatasetStore
from service.errors import Conflict, InvalidInput
from service.exploration import Exploration
from service.runtime.call import ActCall, ActResult, Observations, as_tensor
from service.runtime.policy import PolicyRuntime


@dataclass
class Draft:
    """One env's open episode: observations (one more than actions once it ends), actions,
    their log-propensities, and the rewards and ends reported for them."""

    observations: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    terminations: list[bool] = field(default_factory=list)
    truncations: list[bool] = field(default_factory=list)
    nbytes: int = 0

    def episode(self):
        from minari.data_collector import EpisodeBuffer

        return EpisodeBuffer(
            observations=np.stack(self.observations),
            actions=np.stack(self.actions),
            rewards=self.rewards,
            terminations=self.terminations,
            truncations=self.truncations,
            infos={PROPENSITY: np.asarray([*self.log_probs, math.nan], dtype=np.float64)},
        )


def log_propensities(runtime: PolicyRuntime, call: ActCall, result: ActResult) -> list[float]:
    """log mu(a | s) of each answered action under the exploration used: 0 for a deterministic
    choice, the distribution's log-prob for a sampled one, epsilon-greedy's for a Q-value policy;
    NaN where no density is logged (an actor's Gaussian noise)."""
    rows = result.action.shape[0]
    if result.exploration is not Exploration.random:
        return [0.0] * rows
    info = result.info or {}
    if runtime.spec.kind == "qvalue" and "action_value" in info:
        values = info["action_value"]
        allowed = call.mask if call.mask is not None else torch.ones_like(values, dtype=torch.bool)
        greedy = values.masked_fill(~allowed, -math.inf).argmax(-1)
        eps = runtime.spec.exploration.epsilon if call.epsilon is None else call.epsilon
        n = allowed.sum(-1).to(torch.float64)
        chosen = result.action.reshape(-1)
        mu = eps / n + (1 - eps) * (chosen == greedy).to(torch.float64)
        return torch.log(mu).tolist()
    log_prob = info.get("log_prob")
    if isinstance(log_prob, torch.Tensor):
        return log_prob.reshape(rows, -1).sum(-1).to(torch.float64).tolist()
    return [math.nan] * rows


def spaces_of(spec) -> tuple:
    """The gymnasium spaces a policy's recorded episodes live in: its env's when it names an
    allow-listed one, else made from ``policy.json``."""
    import gymnasium as gym

    from service.envs import ALLOWED

    obs, action = spec.observation, spec.action
    if getattr(obs, "type", None) == "dict":
        raise InvalidInput(
            "recording takes tensor or discrete observations; dict observations are not supported"
        )
    if action.type not in ("discrete", "box"):
        raise InvalidInput(f"recording takes discrete or box actions; this policy's are {action.type}")
    if spec.env_id in ALLOWED:
        env = gym.make(spec.env_id)
        try:
            return env.observation_space, env.action_space
        finally:
            env.close()
    if obs.discrete:
        obs_space = gym.spaces.Discrete(obs.n)
    elif obs.dtype == "uint8":
        obs_space = gym.spaces.Box(0, 255, tuple(obs.shape), np.uint8)
    else:
        obs_space = gym.spaces.Box(-np.inf, np.inf, tuple(obs.shape), np.float32)
    if action.type == "discrete":
        return obs_space, gym.spaces.Discrete(action.n)
    low, high = np.asarray(action.low, np.float32), np.asarray(action.high, np.float32)
    return obs_space, gym.spaces.Box(low.reshape(action.shape), high.reshape(action.shape), dtype=np.float32)


def _fits(a, b) -> bool:
    """Whether two spaces hold the same kind of values (shape, dtype, number of choices)."""
    return (type(a), getattr(a, "shape", None), str(getattr(a, "dtype", "")), getattr(a, "n", None)) == (
        type(b),
        getattr(b, "shape", None),
        str(getattr(b, "dtype", "")),
        getattr(b, "n", None),
    )


class Recorder:
    def __init__(self, store: DatasetStore, idle_s: float, max_datasets: int = 100) -> None:
        self.store = store
        self.idle_s = idle_s
        self.max_datasets = max_datasets
        self._drafts: dict[str, list[Draft | None]] = {}
        self._dataset: dict[str, str] = {}  # session -> dataset id
        self._seen: dict[str, float] = {}
        self._pending: dict[str, int] = {}  # dataset -> bytes of its open drafts

    def _sweep(self, now: float) -> None:
        for sid in [s for s, t in self._seen.items() if now - t > self.idle_s]:
            self.drop(sid)

    def drop(self, session_id: str) -> None:
        """A session's open episodes are discarded (deleted, reset, expired)."""
        drafts = self._drafts.pop(session_id, None) or []
        dataset = self._dataset.pop(session_id, None)
        self._seen.pop(session_id, None)
        if dataset is not None:
            self._pending[dataset] -= sum(d.nbytes for d in drafts if d is not None)

    async def open(self, dataset_id: str, runtime: PolicyRuntime, policy: str, version: int) -> None:
        """The dataset a new recording session writes to: created with the policy's spaces, or
        one whose spaces fit them (422 otherwise)."""
        obs_space, action_space = spaces_of(runtime.spec)

        def open_or_create() -> None:
            if not self.store.exists(dataset_id):
                if len(self.store.ids()) >= self.max_datasets:
                    raise InvalidInput(f"the server holds its limit of {self.max_datasets} datasets")
                self.store.create(
                    dataset_id,
                    obs_space,
                    action_space,
                    env_id=runtime.spec.env_id,
                    algorithm_name=f"policy-server session recording of {policy} v{version}",
                )
                return
            ds = self.store.open(dataset_id)
            if not (_fits(ds.observation_space, obs_space) and _fits(ds.action_space, action_space)):
                raise InvalidInput(
                    f"dataset {dataset_id!r} holds {ds.observation_space} / {ds.action_space}; "
                    f"policy {policy} acts on {obs_space} / {action_space}"
                )

        try:
            await asyncio.to_thread(open_or_create)
        except Conflict:  # created meanwhile by another session: check it
            await asyncio.to_thread(open_or_create)

    async def check(
        self,
        session_id: str,
        dataset_id: str,
        num_envs: int,
        obs: Observations,
    ) -> None:
        """Before the step's forward pass: 422 when the dataset would pass its limit (nothing
        changed)."""
        self._sweep(time.monotonic())
        drafts = self._drafts.get(session_id) or [None] * num_envs
        step = _step_bytes(obs)
        grows = sum(step if d is not None else step + _new_draft_bytes(obs) for d in drafts)
        on_disk = await asyncio.to_thread(self.store.size, dataset_id)
        if on_disk + self._pending.get(dataset_id, 0) + grows > self.store.max_bytes:
            raise InvalidInput(
                f"dataset {dataset_id!r} is full: {on_disk} bytes written and open episodes reach its "
                f"limit of {self.store.max_bytes} bytes (MAX_DATASET_BYTES); nothing more is recorded "
                "into it, what it holds is kept"
            )

    async def record(
        self,
        session_id: str,
        dataset_id: str,
        obs: Observations,
        call: ActCall,
        result: ActResult,
        runtime: PolicyRuntime,
        reward: list[float | None] | None,
        ends: tuple[list[bool], list[bool]],
        resets: torch.Tensor | None,
    ) -> None:
        """After the step (``check``ed): its transitions into the drafts; the episodes it ends
        appended to the dataset."""
        x = as_tensor(obs).cpu().numpy()
        num_envs = x.shape[0]
        drafts = self._drafts.get(session_id) or [None] * num_envs
        actions = result.action.cpu().numpy()
        log_probs = log_propensities(runtime, call, result)
        terminated, truncated = ends
        reset = resets.tolist() if resets is not None else [False] * num_envs
        size = _step_bytes(obs)
        pending = self._pending.get(dataset_id, 0)
        finished: list[Draft] = []
        for i in range(num_envs):
            d = drafts[i]
            unreported = reward is None or reward[i] is None
            if d is not None and (reset[i] or unreported):  # abandoned without an end: not recorded
                pending -= d.nbytes
                d = None
            if d is not None and len(d.actions) > len(d.rewards):
                d.rewards.append(float(reward[i]))
                d.terminations.append(bool(terminated[i]))
                d.truncations.append(bool(truncated[i]))
                if terminated[i] or truncated[i]:  # this observation is the episode's last
                    d.observations.append(x[i])
                    pending -= d.nbytes
                    finished.append(d)
                    drafts[i] = None
                    continue
            if d is None:
                d = Draft(nbytes=_new_draft_bytes(obs))
                pending += d.nbytes
            d.observations.append(x[i])
            d.actions.append(actions[i])
            d.log_probs.append(log_probs[i])
            d.nbytes += size
            pending += size
            drafts[i] = d
        self._drafts[session_id] = drafts
        self._dataset[session_id] = dataset_id
        self._pending[dataset_id] = pending
        self._seen[session_id] = time.monotonic()
        if finished:
            episodes = [d.episode() for d in finished]
            await asyncio.to_thread(self.store.append, dataset_id, episodes)


def _step_bytes(obs: Observations) -> int:
    """What one env's step adds to a draft: its observation, action, propensity and report."""
    x = as_tensor(obs)
    return x[0].numel() * x.element_size() + 8 * 5


def _new_draft_bytes(obs: Observations) -> int:
    """What an episode costs beyond its steps: the file's overhead and its last observation."""
    x = as_tensor(obs)
    return EPISODE_OVERHEAD + x[0].numel() * x.element_size()
