"""RLlib ``PolicyClient`` (``inference_mode="remote"``) commands as sessions: an episode is a
session of one env, ``{policy}`` a served policy or a ``source: sessions`` job (then the
episode's rewards and actions train it). The commands arrive already read (``api/rllib_wire``)
as a name and a dict of plain values and arrays; answers are dicts the client unpickles.

- ``START_EPISODE`` {episode_id?} -> a session ``rllib:<policy>:<episode_id>`` -> {episode_id}
- ``GET_ACTION`` {episode_id, observation} -> a step, the rewards logged since the previous
  action reported with it -> {action}
- ``LOG_ACTION`` {episode_id, observation, action} -> a step that records the client's action
  (a job's off-policy experience); on a served policy it moves the recurrent state on
- ``LOG_RETURNS`` {episode_id, reward} -> added to the previous action's reward
- ``END_EPISODE`` {episode_id, observation} -> the last transition (terminated), session closed
  (a served policy's: the returns logged since START_EPISODE credited to its version's stats)
- the local-inference commands (GET_WORKER_ARGS, GET_WEIGHTS, REPORT_SAMPLES) and the space
  queries -> 422 saying to use ``inference_mode="remote"``.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np

from service.errors import InvalidInput, NotFound
from service.registry.registry import Registry
from service.serving.params import SessionCreateParams, SessionStepParams
from service.serving.sessions import SessionService

REMOTE = ("START_EPISODE", "GET_ACTION", "LOG_ACTION", "LOG_RETURNS", "END_EPISODE")


def _plain(value: Any) -> Any:
    """An observation as /v1 rows take it (lists, numbers, dicts)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _episode_id(message: dict) -> str:
    episode_id = message.get("episode_id")
    if not isinstance(episode_id, str) or not 0 < len(episode_id) <= 128:
        raise InvalidInput("episode_id must be the string start_episode returned (at most 128 characters)")
    return episode_id


class RLlibService:
    def __init__(self, sessions: SessionService, registry: Registry) -> None:
        self.sessions = sessions
        self.registry = registry

    async def handle(self, policy: str, command: str, message: dict[str, Any]) -> dict[str, Any]:
        if command not in REMOTE:
            raise InvalidInput(
                f"{command} is PolicyClient's local-inference command: this server computes the "
                'actions, so create the client with inference_mode="remote"'
            )
        if command == "START_EPISODE":
            return await self._start(policy, message)
        session_id = self._session(policy, _episode_id(message))
        if command == "LOG_RETURNS":
            reward = message.get("reward")
            if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
                raise InvalidInput("reward must be one finite number (multi-agent rewards are not served)")
            await self._known(self.sessions.report(session_id, float(reward)), message)
            return {}
        observation = _plain(message.get("observation"))
        if command == "END_EPISODE":
            await self._known(self._end(session_id, observation), message)
            return {}
        step = SessionStepParams(session_id, [observation], single=True, reported=True)
        if command == "LOG_ACTION":
            step.taken = _action(message.get("action"))
        answer = await self._known(self.sessions.step(step), message)
        return {"action": _as_client_action(answer["action"])} if command == "GET_ACTION" else {}

    def _session(self, policy: str, episode_id: str) -> str:
        return f"rllib:{policy}:{episode_id}"

    async def _start(self, policy: str, message: dict) -> dict[str, Any]:
        episode_id = message.get("episode_id")
        episode_id = uuid.uuid4().hex if episode_id is None else _episode_id(message)
        session_id = self._session(policy, episode_id)
        if self.registry.has(policy):
            params = SessionCreateParams(policy, session_id=session_id)
        else:  # not a served policy: a job learning from sessions, or 404
            params = SessionCreateParams("", job=policy, session_id=session_id)
        await self.sessions.discard(session_id)  # an episode id used again starts afresh
        try:
            await self.sessions.create(params)
        except NotFound as exc:
            if params.job is None:
                raise
            raise NotFound(f"{policy[:64]!r} is neither a served policy nor a job ({exc.detail})") from None
        return {"episode_id": episode_id}

    async def _end(self, session_id: str, observation: Any) -> None:
        """The episode's last observation: with the rewards logged since the last action, the
        terminal transition of a job's episode; then the session is gone."""
        if (await self.sessions.get(session_id))["job"] is not None:
            await self.sessions.step(
                SessionStepParams(session_id, [observation], single=True, reported=True, terminated=True)
            )
        else:  # the logged returns, credited to the served version
            await self.sessions.end_episode(session_id)
        await self.sessions.delete(session_id)

    async def _known(self, call, message: dict):
        try:
            return await call
        except NotFound as exc:
            raise NotFound(
                f"episode {str(message.get('episode_id'))[:64]!r} is not open ({exc.detail}): call "
                "start_episode first (episodes idle longer than the session ttl expire)"
            ) from None


def _action(action: Any) -> int:
    if isinstance(action, np.ndarray) and action.size == 1:
        action = action.item()
    if isinstance(action, np.generic):
        action = action.item()
    if isinstance(action, bool) or not isinstance(action, int):
        raise InvalidInput("log_action's action must be one integer (the job's discrete action)")
    return action


def _as_client_action(action: Any) -> Any:
    """What a gymnasium env steps with: an int, or a float32 array for a box."""
    return np.asarray(action, dtype=np.float32) if isinstance(action, list) else action
