"""Sessions: create, step, reset, inspect and close, with their limits; state kept by a store."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from service.config import Settings
from service.datasets.store import check_id
from service.errors import InvalidInput, NotFound, check_limit
from service.exploration import Exploration, ExplorationParams
from service.registry.registry import Registry
from service.runtime.batching import MicroBatcher
from service.runtime.call import ActCall, ActResult, Observations, as_tensor
from service.runtime.policy import PolicyRuntime
from service.runtime.sessions import Session, SessionStore, StaleSession
from service.serving.feeds import JobFeeds
from service.serving.params import SessionCreateParams, SessionStepParams
from service.serving.recording import Recorder
from service.serving.reports import Outcome, Report
from service.serving.reports import pending_bytes as _pending_bytes
from service.serving.stats import PolicyStats


def _not_found(session_id: str) -> NotFound:
    return NotFound(f"session {session_id[:64]!r} not found (never created, deleted or expired)")


def reset_mask(reset: bool | list[bool] | None, num_envs: int) -> torch.Tensor | None:
    """``reset`` of a step as ``[num_envs]`` bools (one value for all envs, or one per env);
    ``None`` when it resets none."""
    if reset is None or reset is False:
        return None
    if reset is True:
        return torch.ones(num_envs, dtype=torch.bool)
    if len(reset) != num_envs:
        raise InvalidInput(f"reset has {len(reset)} values; the session has num_envs={num_envs}")
    return torch.tensor(reset, dtype=torch.bool)


class SessionService:
    """Server-held recurrent state per client. Calls on one session run one at a time, in
    arrival order (the store's lock), and a failed call changes nothing."""

    def __init__(
        self,
        store: SessionStore,
        registry: Registry,
        batcher: MicroBatcher,
        settings: Settings,
        feeds: JobFeeds | None = None,
        stats: PolicyStats | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.batcher = batcher
        self.settings = settings
        self.feeds = feeds
        self.stats = stats or PolicyStats()
        self.recorder = recorder

    async def summary(self) -> dict[str, Any]:
        """How many sessions are live, and the limit (the dashboard shows both)."""
        return {"live": await self.store.count(), "limit": self.settings.max_sessions}

    async def usage(self) -> dict[str, int]:
        """Live sessions and the state bytes they reserve (``/metrics``)."""
        return {"live": await self.store.count(), "state_bytes": self.store.reserved_state_bytes()}

    async def create(self, p: SessionCreateParams) -> dict[str, Any]:
        s = self.settings
        check_limit("num_envs", p.num_envs, s.max_session_envs)
        ttl = p.ttl_s or s.session_ttl_s
        check_limit("ttl_s", ttl, s.max_session_ttl_s)
        if p.job is not None:
            feed = await self._feeds().open(p.job)
            runtime, name, version = feed.runtime, feed.policy_name, 0
            # the previous observation and action per env, kept to make transitions
            per_env = runtime.state_bytes_per_env + _pending_bytes(runtime)
        else:
            loaded = self.registry.routed(p.policy, p.version, p.routing_key)
            runtime, name, version = loaded.runtime, loaded.name, loaded.version
            per_env = runtime.state_bytes_per_env
            if p.record is not None:
                await self._recorder().open(check_id(p.record), runtime, name, version)
        session = Session(
            policy=name,
            version=version,
            num_envs=p.num_envs,
            ttl_s=ttl,
            exploration=p.explore.exploration,
            epsilon=p.explore.epsilon,
            noise_std=p.explore.noise_std,
            state_bytes=per_env * p.num_envs,
            job=p.job,
            record=p.record,
            **({"session_id": p.session_id} if p.session_id is not None else {}),
        )
        await self.store.create(session, s.max_sessions, s.max_session_state_bytes)
        if p.job is None:
            self.stats.session(name, version)
        return session.public()

    async def _load(self, session_id: str) -> Session:
        session = await self.store.get(session_id)
        if session is None:
            raise _not_found(session_id)
        return session

    async def get(self, session_id: str) -> dict[str, Any]:
        return (await self._load(session_id)).public()

    async def delete(self, session_id: str) -> None:
        async with self.store.lock(session_id):
            if not await self.store.delete(session_id):
                raise _not_found(session_id)
        if self.recorder is not None:
            self.recorder.drop(session_id)  # its open episodes are not recorded

    async def discard(self, session_id: str) -> None:
        """Delete the session if there is one (a sequence restarting under its id)."""
        async with self.store.lock(session_id):
            await self.store.delete(session_id)

    async def reset(self, session_id: str) -> dict[str, Any]:
        async with self.store.lock(session_id):
            session = await self._load(session_id)
            session.reset()
            await self.store.save(session)
        if self.recorder is not None:
            self.recorder.drop(session_id)
        return session.public()

    async def report(self, session_id: str, reward: float) -> None:
        """A reward for a job session's previous action, reported ahead of its next step (which
        takes it with ``reported``); rewards add up until then. A served policy's session (of
        one env) adds it to the running episode return its version is credited with."""
        if not math.isfinite(reward):
            raise InvalidInput("reward must be a finite number")
        async with self.store.lock(session_id):
            session = await self._load(session_id)
            if session.job is None:
                if session.num_envs != 1:
                    raise InvalidInput("rewards reported ahead of a step go to sessions of one env")
                session.returns = [(session.returns or [0.0])[0] + reward]
            else:
                session.reward_due += reward
            await self.store.save(session)

    async def end_episode(self, session_id: str) -> None:
        """A served policy's one-env session: the running episode ends here (RLlib's
        END_EPISODE), its return credited to the session's version."""
        async with self.store.lock(session_id):
            session = await self._load(session_id)
            if session.job is not None or session.returns is None:
                return
            ret = session.returns[0]
            session.returns = None
            await self.store.save(session)
        self.stats.episode(session.policy, session.version, ret)

    async def close_version(self, policy: str, version: int) -> int:
        """Close the sessions pinned to a version that is no longer served."""
        return await self.store.close_version(policy, version)

    def _recorder(self) -> Recorder:
        if self.recorder is None:
            raise InvalidInput("this server records no datasets")
        return self.recorder

    def _feeds(self) -> JobFeeds:
        if self.feeds is None:
            raise InvalidInput("this server has no job feeds: sessions cannot bind to jobs here")
        return self.feeds

    async def step(self, p: SessionStepParams) -> dict[str, Any]:
        """One step of a session: in order with other calls on it; state unchanged on any error.

        Tried first speculatively (``SessionStore.lock``): a step keeps nothing and has no effect
        outside the session until its save, so a refused save runs it again under the lock."""
        try:
            return await self._step(p, speculative=True)
        except StaleSession:
            return await self._step(p, speculative=False)

    async def _step(self, p: SessionStepParams, speculative: bool) -> dict[str, Any]:
        async with self.store.lock(p.session_id, speculative):
            session = await self._load(p.session_id)
            if session.job is not None:
                return await self._job_step(p, session)
            return await self._policy_step(p, session)

    async def _policy_step(self, p: SessionStepParams, session: Session) -> dict[str, Any]:
        """A step of a session pinned to a served policy version: decode, act, keep the state."""
        runtime = await self._served(session)
        outcome = Outcome.check(p, session.num_envs)  # the previous actions' rewards, if any
        obs, mask = self._decode(runtime, p, session)
        resets = reset_mask(p.reset, session.num_envs)
        recording = session.record is not None
        if recording:  # refused before anything moves
            await self._recorder().check(session.session_id, session.record, session.num_envs, obs)
        explore = p.explore.over(session.explore)
        # a recorded step needs the action values / log-probs behind its propensities
        call = _step_call(runtime, session, obs, mask, resets, explore, p.return_info or recording)
        result = await self.batcher.submit(runtime, call)
        _advance(session, call, result)
        episodes = ()
        if outcome is not None or (resets is not None and session.returns is not None):
            episodes = (outcome or Outcome.nothing(session.num_envs)).apply(session, resets)
        await self.store.save(session)
        for ret in episodes:  # credited once the step is kept
            self.stats.episode(session.policy, session.version, ret)
        if recording:
            o = outcome or Outcome.nothing(session.num_envs)
            await self.recorder.record(
                session.session_id, session.record, obs, call, result, runtime, o.reported,
                (o.terminated, o.truncated), resets,
            )  # fmt: skip
            if not p.return_info:
                result.info = None
        return _answer(runtime, p, session, result)

    async def step_tensors(
        self,
        session_id: str,
        tensors: dict,
        explore: ExplorationParams,
        return_info: bool,
        close: bool = False,
    ) -> tuple[ActResult, PolicyRuntime, Session]:
        """A step of a served policy's session from named tensors (a /v2 sequence): the
        tensor codec instead of /v1's rows; ``close`` deletes the session after the step."""
        async with self.store.lock(session_id):
            session = await self._load(session_id)
            if session.job is not None:
                raise InvalidInput(
                    "sessions bound to a job are stepped through /v1 (they take reward reports)"
                )
            runtime = await self._served(session)
            obs, mask, rows = runtime.tensors.decode(tensors, session.policy)
            if rows != session.num_envs:
                raise InvalidInput(
                    f"the session steps {session.num_envs} env(s), as its first request did; "
                    f"got {rows} row(s)"
                )
            call = _step_call(runtime, session, obs, mask, None, explore.over(session.explore), return_info)
            result = await self._act(runtime, session, call)
            if close:
                await self.store.delete(session_id)
        return result, runtime, session

    async def _served(self, session: Session) -> PolicyRuntime:
        """The runtime of the version a session is pinned to; a session whose version is no
        longer served is closed (404)."""
        try:
            return self.registry.resolve(session.policy, session.version).runtime
        except NotFound:
            await self.store.delete(session.session_id)
            raise NotFound(
                f"session {session.session_id!r} was closed: policy {session.policy} "
                f"version {session.version} is no longer served"
            ) from None

    async def _act(self, runtime: PolicyRuntime, session: Session, call: ActCall) -> ActResult:
        """The step's forward pass; the session moved on and saved."""
        result = await self.batcher.submit(runtime, call)
        _advance(session, call, result)
        await self.store.save(session)
        return result

    async def _job_step(self, p: SessionStepParams, session: Session) -> dict[str, Any]:
        """A step of a session bound to a ``source: sessions`` job: the client's report checked,
        the learner's exploring policy acts, the completed transitions go to the job's feed."""
        feed = await self._feeds().open(session.job)
        feed.follow()  # the learner's newer weights, when they are read, serve the next steps
        if p.reported:
            p = _with_reported(p, session)
        obs, mask = self._decode(feed.runtime, p, session)
        resets = reset_mask(p.reset, session.num_envs)
        if resets is None:
            resets = torch.zeros(session.num_envs, dtype=torch.bool)
        report = Report.check(p, session, resets)
        taken = None if p.taken is None else _taken(feed.runtime, p.taken, session.num_envs)
        obs = as_tensor(obs)  # kept for the transitions: one tensor, made here
        await feed.pace()  # may wait for the learner, or refuse (429): nothing recorded
        runtime = feed.runtime
        explore = p.explore.over(session.explore)
        if explore.exploration is None:  # the learner's exploring policy, its epsilon schedule
            explore = ExplorationParams(Exploration.random, explore.epsilon, explore.noise_std)
            explore = explore.over(ExplorationParams(epsilon=feed.epsilon))
        call = _step_call(runtime, session, obs, mask, resets, explore, p.return_info, always_init=True)
        result = await self.batcher.submit(runtime, call)
        lstm = (call.state[0], call.state[1]) if runtime.recurrent else None
        action = result.action if taken is None else taken
        transitions = report.record(session, obs, action, lstm, call.is_init)
        session.reward_due = 0.0
        _advance(session, call, result)
        await self.store.save(session)
        if feed.learning:  # a step that fails to store records none
            feed.add(transitions)
        payload = _answer(runtime, p, session, result)
        payload["policy_frames"] = feed.consumed
        return payload

    def _decode(self, runtime: PolicyRuntime, p: SessionStepParams, session: Session):
        """The step's observations (one per env) and masks, checked."""
        check_limit("batch size", len(p.rows), self.settings.max_batch_size)
        if len(p.rows) != session.num_envs:
            raise InvalidInput(
                f"the session has num_envs={session.num_envs}: send {session.num_envs} "
                f"observation(s) in 'observations' (or one 'observation' when num_envs=1), "
                f"got {len(p.rows)}"
            )
        return runtime.codec.decode(p.rows, p.masks, p.single, session.policy)


def _step_call(
    runtime: PolicyRuntime,
    session: Session,
    obs: Observations,
    mask: torch.Tensor | None,
    resets: torch.Tensor | None,
    explore: ExplorationParams,
    return_info: bool,
    always_init: bool = False,
) -> ActCall:
    """The forward pass of a session step: its state and episode starts (a stateless policy's
    steps need neither, unless ``always_init``: a job's transitions record them)."""
    state = is_init = None
    if runtime.stateful or always_init:
        is_init = session.needs_init if resets is None else session.needs_init | resets
    if runtime.stateful:
        state = session.state if session.state is not None else runtime.zero_state(session.num_envs)
    return ActCall(
        obs,
        runtime.effective(explore.type),
        explore.epsilon,
        explore.noise_std,
        None,
        return_info,
        state,
        is_init,
        mask,
    )


def _with_reported(p: SessionStepParams, session: Session) -> SessionStepParams:
    """A one-env step whose reward (and ``terminated``/``truncated``) is the outcome ``report``
    accumulated for the previous action; without one (a session's first step, the step after
    an episode's end) there is no outcome to record."""
    if session.num_envs != 1:
        raise InvalidInput("rewards reported ahead of a step go to sessions of one env")
    if session.pending is not None and bool(session.pending[2][0]):
        return replace(p, reward=session.reward_due, reported=False)
    return replace(p, reward=None, terminated=None, truncated=None, reported=False)  # nothing to end


def _taken(runtime: PolicyRuntime, action: int, num_envs: int) -> torch.Tensor:
    """The action a client took instead of the answered one (discrete job policies)."""
    n = runtime.spec.action.n
    if num_envs != 1 or type(action) is not int or not 0 <= action < n:
        raise InvalidInput(f"the action taken must be one integer in [0, {n}) for a session of one env")
    return torch.tensor([action], dtype=torch.int64)


def _advance(session: Session, call: ActCall, result: ActResult) -> None:
    """The session after a step: the next state, no pending episode starts, one more step."""
    if result.state is not None:
        session.state = result.state
    if call.is_init is not None:
        session.needs_init = torch.zeros(session.num_envs, dtype=torch.bool)
    session.steps += 1


def _answer(runtime: PolicyRuntime, p: SessionStepParams, session: Session, result: ActResult) -> dict:
    payload = runtime.codec.encode(result, p.single)
    payload.update(step=session.steps, policy=session.policy, version=session.version)
    return payload
