"""Sessions: create, step, reset, inspect and close, with their limits; state kept by a store."""

from __future__ import annotations

from typing import Any

import torch

from service.config import Settings
from service.errors import InvalidInput, NotFound, check_limit
from service.registry.registry import Registry
from service.runtime.batching import MicroBatcher
from service.runtime.policy import Exploration, as_tensor
from service.runtime.sessions import Session, SessionStore
from service.serving.feeds import JobFeeds
from service.serving.params import SessionCreateParams, SessionStepParams
from service.serving.reports import Report
from service.serving.reports import pending_bytes as _pending_bytes


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
    ) -> None:
        self.store = store
        self.registry = registry
        self.batcher = batcher
        self.settings = settings
        self.feeds = feeds

    async def summary(self) -> dict[str, Any]:
        """How many sessions are live, and the limit (the dashboard shows both)."""
        return {"live": await self.store.count(), "limit": self.settings.max_sessions}

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
            loaded = self.registry.resolve(p.policy, p.version)
            runtime, name, version = loaded.runtime, loaded.name, loaded.version
            per_env = runtime.state_bytes_per_env
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
        )
        await self.store.create(session, s.max_sessions, s.max_session_state_bytes)
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

    async def reset(self, session_id: str) -> dict[str, Any]:
        async with self.store.lock(session_id):
            session = await self._load(session_id)
            session.reset()
            await self.store.save(session)
        return session.public()

    async def close_version(self, policy: str, version: int) -> int:
        """Close the sessions pinned to a version that is no longer served."""
        return await self.store.close_version(policy, version)

    def _feeds(self) -> JobFeeds:
        if self.feeds is None:
            raise InvalidInput("this server has no job feeds: sessions cannot bind to jobs here")
        return self.feeds

    async def step(self, p: SessionStepParams) -> dict[str, Any]:
        """One step of a session: in order with other calls on it; state unchanged on any error."""
        async with self.store.lock(p.session_id):
            session = await self._load(p.session_id)
            feed = None
            if session.job is not None:
                feed = await self._feeds().open(session.job)
                feed.refresh()
                runtime = feed.runtime
            else:
                try:
                    runtime = self.registry.resolve(session.policy, session.version).runtime
                except NotFound:
                    await self.store.delete(p.session_id)
                    raise NotFound(
                        f"session {p.session_id!r} was closed: policy {session.policy} "
                        f"version {session.version} is no longer served"
                    ) from None
                if p.reward is not None or p.terminated is not None or p.truncated is not None:
                    raise InvalidInput(
                        "reward, terminated and truncated go to sessions bound to a job "
                        '(POST /v1/sessions {"job": ...}); this session serves a policy'
                    )
            check_limit("batch size", len(p.rows), self.settings.max_batch_size)
            if len(p.rows) != session.num_envs:
                raise InvalidInput(
                    f"the session has num_envs={session.num_envs}: send {session.num_envs} "
                    f"observation(s) in 'observations' (or one 'observation' when num_envs=1), "
                    f"got {len(p.rows)}"
                )
            obs = runtime.observation_batch(
                p.rows, "observation" if p.single else "observations", session.policy
            )
            mask = runtime.mask_batch(
                p.masks, len(p.rows), "action_mask" if p.single else "action_masks", session.policy
            )
            resets = reset_mask(p.reset, session.num_envs)
            report = None
            if feed is not None:
                if resets is None:
                    resets = torch.zeros(session.num_envs, dtype=torch.bool)
                report = Report.check(p, session, resets)
                obs = as_tensor(obs)  # kept for the transitions: one tensor, made here
                await feed.pace()  # may wait for the learner, or refuse (429): nothing recorded
                runtime = feed.runtime
            state = is_init = None  # (a stateless policy's steps need neither)
            if runtime.stateful or feed is not None:
                is_init = session.needs_init if resets is None else session.needs_init | resets
            if runtime.stateful:
                state = session.state if session.state is not None else runtime.zero_state(session.num_envs)
            e = p.explore
            exploration = e.exploration or session.exploration or Exploration.deterministic
            epsilon = e.epsilon if e.epsilon is not None else session.epsilon
            if feed is not None and e.exploration is None and session.exploration is None:
                exploration = Exploration.random  # the learner's exploring policy
                epsilon = feed.epsilon if epsilon is None else epsilon
            result = await self.batcher.act(
                runtime,
                obs,
                exploration=exploration,
                epsilon=epsilon,
                noise_std=e.noise_std if e.noise_std is not None else session.noise_std,
                return_info=p.return_info,
                state=state,
                is_init=is_init,
                mask=mask,
            )
            if result.state is not None:
                session.state = result.state
            transitions = None
            if feed is not None:
                lstm = (state[0], state[1]) if runtime.recurrent else None
                transitions = report.record(session, obs, result.action, lstm, is_init)
            if is_init is not None:
                session.needs_init = torch.zeros(session.num_envs, dtype=torch.bool)
            session.steps += 1
            await self.store.save(session)
            if transitions is not None and feed.learning:  # a step that fails to store records none
                feed.add(transitions)
        payload = result.payload(p.single)
        payload.update(step=session.steps, policy=session.policy, version=session.version)
        if feed is not None:
            payload["policy_frames"] = feed.consumed
        return payload
