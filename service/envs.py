"""The allow-listed environments: the only ids any request may name.

A user string never reaches ``gymnasium.make``: an id is looked up here first, and only the
fixed gymnasium id stored in the list is passed on (ids like ``module:Class`` would import code).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from pydantic import TypeAdapter
from tensordict import TensorDictBase
from torchrl.data import Binary
from torchrl.envs import (
    ActionMask,
    Compose,
    GymEnv,
    GymWrapper,
    InitTracker,
    RenameTransform,
    StepCounter,
    TransformedEnv,
)
from torchrl.envs.libs.gym import default_info_dict_reader

from service.errors import InvalidInput
from service.registry.spec import ActionSpec, PolicySpec


class NoVelocityObservation(gym.ObservationWrapper):
    """CartPole with the velocities removed: observation = (cart position, pole angle)."""

    KEEP = (0, 2)

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        low, high = env.observation_space.low, env.observation_space.high
        self.observation_space = gym.spaces.Box(low[list(self.KEEP)], high[list(self.KEEP)], dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[list(self.KEEP)].astype(np.float32)


class DictObservation(gym.ObservationWrapper):
    """CartPole observing a dict of named parts: ``cart`` (position, velocity) and ``pole``
    (angle, angular velocity), for dict-observation policies (RLlib's Dict spaces)."""

    PARTS = {"cart": [0, 1], "pole": [2, 3]}

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        low, high = env.observation_space.low, env.observation_space.high
        self.observation_space = gym.spaces.Dict(
            {k: gym.spaces.Box(low[i], high[i], dtype=np.float32) for k, i in self.PARTS.items()}
        )

    def observation(self, observation: np.ndarray) -> dict[str, np.ndarray]:
        return {k: observation[i].astype(np.float32) for k, i in self.PARTS.items()}


def _make_cartpole_dict(**kwargs: Any) -> gym.Env:
    return DictObservation(gym.make("CartPole-v1", **kwargs))


class PixelObservation(gym.ObservationWrapper):
    """An env observing its own rendered frame (``[H, W, 3]`` uint8), as ``GymEnv(...,
    from_pixels=True)`` does, but as the env's observation: what a client sends the server."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        env.reset(seed=0)
        frame = env.render()
        self.observation_space = gym.spaces.Box(0, 255, frame.shape, dtype=np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return self.env.render()


def _make_cartpole_pixels(**kwargs: Any) -> gym.Env:
    return PixelObservation(gym.make("CartPole-v1", render_mode="rgb_array", **kwargs))


def _make_cartpole_novel(**kwargs: Any) -> gym.Env:
    return NoVelocityObservation(gym.make("CartPole-v1", **kwargs))


class BoolActionMask(gym.Wrapper):
    """``info["action_mask"]`` as bools (Taxi gives int8), the dtype TorchRL's masks take."""

    def reset(self, **kwargs: Any):
        obs, info = self.env.reset(**kwargs)
        return obs, _bool_mask(info)

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, _bool_mask(info)


def _bool_mask(info: dict) -> dict:
    if "action_mask" in info:
        info = {**info, "action_mask": np.asarray(info["action_mask"]).astype(bool)}
    return info


class CorrelatedActions(gym.Env):
    """The RLlib seed's autoregressive-action example: each step the agent observes a random
    bit; the action has two parts ``a1``, ``a2`` in {0, 1} (``Tuple(Discrete(2), Discrete(2))``);
    reward +5 when ``a1`` equals the bit and +5 when ``a2`` equals ``a1``. 20 steps an episode
    (then truncated): 200 is the best return."""

    LENGTH = 20

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Tuple((gym.spaces.Discrete(2), gym.spaces.Discrete(2)))
        self.bit, self.t = 0, 0

    def _observe(self) -> np.ndarray:
        self.bit = int(self.np_random.integers(2))
        return np.array([self.bit], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return self._observe(), {}

    def step(self, action):
        a1, a2 = (int(a) for a in action)
        reward = 5.0 * (a1 == self.bit) + 5.0 * (a2 == a1)
        self.t += 1
        return self._observe(), reward, False, self.t >= self.LENGTH, {}


@dataclass(frozen=True)
class ActionPart:
    """One atomic head of a multi-part action: a discrete choice of ``n``, or a box of
    ``len(low)`` values; ``leaf`` is the served action's leaf it belongs to (``None``: the whole
    action, a multi-discrete one); ``width`` its values in the flat vector."""

    leaf: str | None
    n: int = 0  # discrete: the number of choices
    multi: bool = False  # one value of a multi-discrete leaf
    low: tuple[float, ...] = ()  # box: the bounds
    high: tuple[float, ...] = ()

    @property
    def discrete(self) -> bool:
        return self.n > 0

    @property
    def width(self) -> int:
        return 1 if self.discrete else len(self.low)


def action_parts(action: dict[str, Any]) -> list[ActionPart]:
    """A multi-discrete or composite action (policy.json's form) as its atomic parts, in the
    order of the flat vector (a composite's leaves in order, a multi-discrete leaf one part per
    value)."""

    def leaf_parts(name: str | None, leaf: dict[str, Any]) -> list[ActionPart]:
        if leaf["type"] == "discrete":
            return [ActionPart(name, n=int(leaf["n"]))]
        if leaf["type"] == "multi_discrete":
            return [ActionPart(name, n=int(n), multi=True) for n in leaf["nvec"]]
        return [ActionPart(name, low=tuple(leaf["low"]), high=tuple(leaf["high"]))]

    if action["type"] == "composite":
        return [p for name, leaf in action["entries"].items() for p in leaf_parts(name, leaf)]
    return leaf_parts(None, action)


def flat_action_space(parts: list[ActionPart]) -> gym.spaces.Box:
    low = [v for p in parts for v in ((0.0,) if p.discrete else p.low)]
    high = [v for p in parts for v in ((float(p.n - 1),) if p.discrete else p.high)]
    return gym.spaces.Box(np.asarray(low, np.float32), np.asarray(high, np.float32), dtype=np.float32)


def flatten_action(parts: list[ActionPart], action) -> torch.Tensor:
    """A served multi-part action (``[B, k]`` integers for a multi-discrete one, a ``[B]``
    TensorDict of leaves for a composite one) as the flat ``[B, width]`` float vector."""
    if not isinstance(action, TensorDictBase):
        return action.to(torch.float32).reshape(action.shape[0], -1)
    leaves = dict.fromkeys(p.leaf for p in parts)
    return torch.cat([action.get(leaf).to(torch.float32).reshape(action.shape[0], -1) for leaf in leaves], -1)


class FlatActions(gym.ActionWrapper):
    """A ``MultiDiscrete``, ``Tuple`` or ``Dict`` action space (of ``Discrete``, ``Box`` and
    ``MultiDiscrete`` parts) as one flat float ``Box``: discrete parts as their index.

    The one workaround of TorchRL's env wrappers, for multi-part actions: torchrl 0.14's
    ``GymWrapper`` puts a ``Dict`` action's leaves at the tensordict's root (not under
    ``"action"``) and fails on ``Tuple`` action spaces (a NestedTensorImpl error), and its
    ``CompositeDistribution`` cannot condition one head on another. So the env takes one
    ``"action"`` vector and the trainer's distribution (``training/parts``) reads and writes
    that vector, part by part."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.original = env.action_space
        self.parts = action_parts(_action_spec(env.action_space))
        self.action_space = flat_action_space(self.parts)

    def action(self, action: np.ndarray):
        values, at = [], 0
        for part in self.parts:
            chunk = np.asarray(action[at : at + part.width])
            values.append(int(round(float(chunk[0]))) if part.discrete else chunk.astype(np.float32))
            at += part.width
        space = self.original
        if isinstance(space, gym.spaces.MultiDiscrete):
            return np.asarray(values, dtype=np.int64)
        leaves, i = {}, 0
        names = _leaf_names(space)
        for name, leaf in zip(names, _leaf_spaces(space), strict=True):
            width = len(leaf.nvec) if isinstance(leaf, gym.spaces.MultiDiscrete) else 1
            got = values[i : i + width]
            leaves[name] = (
                np.asarray(got, dtype=np.int64) if isinstance(leaf, gym.spaces.MultiDiscrete) else got[0]
            )
            i += width
        if isinstance(space, gym.spaces.Tuple):
            return tuple(leaves[n] for n in names)
        return leaves


def _leaf_names(space: gym.Space) -> list[str]:
    """A Tuple's parts are a1, a2, … (the seed's names); a Dict's its keys."""
    if isinstance(space, gym.spaces.Tuple):
        return [f"a{i + 1}" for i in range(len(space.spaces))]
    return list(space.spaces)


def _leaf_spaces(space: gym.Space) -> list[gym.Space]:
    return list(space.spaces) if isinstance(space, gym.spaces.Tuple) else list(space.spaces.values())


def _action_spec(space: gym.Space) -> dict[str, Any]:
    """An env's action space in policy.json's form."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "multi_discrete", "nvec": [int(n) for n in space.nvec.reshape(-1)]}
    if isinstance(space, gym.spaces.Box):
        return {
            "type": "box",
            "shape": list(space.shape),
            "low": [float(x) for x in space.low],
            "high": [float(x) for x in space.high],
        }
    if isinstance(space, gym.spaces.Tuple | gym.spaces.Dict):
        entries = {}
        for name, leaf in zip(_leaf_names(space), _leaf_spaces(space), strict=True):
            if isinstance(leaf, gym.spaces.Tuple | gym.spaces.Dict):
                raise ValueError("nested Tuple/Dict action spaces are not supported")
            entries[name] = _action_spec(leaf)
        return {"type": "composite", "entries": entries}
    raise ValueError(f"action space {space} is not supported")


def multi_part(action: dict[str, Any]) -> bool:
    """Whether an action (policy.json's form) is made of several heads."""
    return action["type"] in ("multi_discrete", "composite")


def register_envs() -> None:
    """Register this project's own gymnasium ids (idempotent)."""
    if "CartPoleNoVel-v1" not in gym.registry:
        gym.register(id="CartPoleNoVel-v1", entry_point=_make_cartpole_novel)
    if "CartPolePixels-v1" not in gym.registry:
        gym.register(id="CartPolePixels-v1", entry_point=_make_cartpole_pixels)
    if "CartPoleDict-v1" not in gym.registry:
        gym.register(id="CartPoleDict-v1", entry_point=_make_cartpole_dict)
    if "CorrelatedActions-v0" not in gym.registry:
        gym.register(id="CorrelatedActions-v0", entry_point=CorrelatedActions)


@dataclass(frozen=True)
class EnvEntry:
    env_id: str
    description: str
    action_mask: bool = False  # the env gives the allowed actions in info["action_mask"]
    pixels: bool = False  # the observation is an image frame (ConvNet policies, preprocessing)


ALLOWED: dict[str, EnvEntry] = {
    e.env_id: e
    for e in (
        EnvEntry("CartPole-v1", "Balance a pole on a cart; discrete(2); 500 steps."),
        EnvEntry(
            "CartPoleNoVel-v1", "CartPole-v1 observing only cart position and pole angle: needs memory."
        ),
        EnvEntry(
            "CartPoleDict-v1",
            "CartPole-v1 observing a dict: 'cart' (position, velocity) and 'pole' (angle, angular velocity).",
        ),
        EnvEntry(
            "CartPolePixels-v1",
            "CartPole-v1 observing its rendered 400x600x3 uint8 frame (the recurrent pixel-DQN "
            "seed's task): needs a ConvNet, and memory for the velocities.",
            pixels=True,
        ),
        EnvEntry("Acrobot-v1", "Swing a two-link arm up; discrete(3)."),
        EnvEntry("MountainCar-v0", "Drive up a hill with momentum; discrete(3)."),
        EnvEntry("MountainCarContinuous-v0", "MountainCar with a continuous force; box(1)."),
        EnvEntry("Pendulum-v1", "Swing up and hold a pendulum; box(1); 200 steps."),
        EnvEntry(
            "CorrelatedActions-v0",
            "The RLlib seed's autoregressive example: observe a random bit, answer (a1, a2) in "
            "{0,1}^2; +5 when a1 is the bit, +5 when a2 equals a1; 20 steps (200 is the best).",
        ),
        EnvEntry(
            "Taxi-v4",
            "Pick up and drop off a passenger on a 5x5 grid; 500 discrete states, 6 actions, "
            "action masks; 200 steps. (gymnasium 1.4 retired Taxi-v3 for v4, same dynamics.)",
            action_mask=True,
        ),
    )
}


def check_env_id(env_id: str) -> EnvEntry:
    entry = ALLOWED.get(env_id)
    if entry is None:
        raise InvalidInput(f"environment {env_id[:80]!r} is not allowed; expected one of {sorted(ALLOWED)}")
    return entry


def make_env(
    env_id: str,
    *,
    max_steps: int | None = None,
    device: str = "cpu",
    trackers: bool = True,
    num_envs: int = 1,
    bare: bool = False,
) -> TransformedEnv | GymWrapper:
    """A TorchRL env for an allow-listed id with ``StepCounter`` and ``InitTracker``.

    Discrete actions are integer indices (``categorical_action_encoding=True``). Recurrent
    training adds the LSTM primer on top (``lstm.make_tensordict_primer()``). ``trackers=False``
    leaves both transforms out (stateless training: each costs time on every step).
    ``num_envs > 1`` steps that many copies in one gymnasium ``SyncVectorEnv`` (same process,
    batch ``[num_envs]``): one policy call and one TorchRL step per ``num_envs`` frames. TorchRL
    resets the finished copies itself (gymnasium's autoreset off). ``bare``: with no transform to
    apply, the TorchRL wrapper itself, not wrapped in a ``TransformedEnv`` (~0.15 ms less a step
    for a trainer's collector).
    """
    entry = check_env_id(env_id)
    register_envs()
    multi = multi_part(env_specs(env_id)["action"])
    make = (lambda: FlatActions(gym.make(entry.env_id))) if multi else (lambda: gym.make(entry.env_id))
    if entry.action_mask:
        if num_envs > 1:
            raise InvalidInput(f"{env_id} gives action masks: train it with num_envs=1")
        return _masked_env(entry, max_steps=max_steps, device=device)
    if num_envs > 1:
        vector = gym.vector.SyncVectorEnv([make] * num_envs, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
        # on the CPU, no device: TorchRL then skips a per-step .to() of every tensordict (~17%)
        on = None if device == "cpu" else device
        base = GymWrapper(vector, categorical_action_encoding=True, device=on)
    elif multi:
        base = GymWrapper(make(), categorical_action_encoding=True, device=device)
    else:
        base = GymEnv(entry.env_id, categorical_action_encoding=True, device=device)
    transforms = []
    if entry.pixels:  # TorchRL names an image observation "pixels"; served policies read "observation"
        transforms.append(RenameTransform(["pixels"], ["observation"]))
    if trackers:
        transforms += [StepCounter(max_steps), InitTracker()]
    if bare and not transforms:
        return base
    return TransformedEnv(base, Compose(*transforms))


def _masked_env(entry: EnvEntry, *, max_steps: int | None, device: str) -> TransformedEnv:
    """The TorchRL way: ``info["action_mask"]`` read into ``"action_mask"`` by an info-dict
    reader, and ``ActionMask`` keeping the action spec's mask in step (random actions, e.g. the
    collector's first frames, are drawn among the allowed ones)."""
    gym_env = BoolActionMask(gym.make(entry.env_id))
    base = GymWrapper(gym_env, categorical_action_encoding=True, device=device)
    n = int(gym_env.action_space.n)
    base.set_info_dict_reader(default_info_dict_reader(["action_mask"], spec=[Binary(n=n, dtype=torch.bool)]))
    return TransformedEnv(base, Compose(ActionMask(), StepCounter(max_steps), InitTracker()))


def has_action_mask(env_id: str) -> bool:
    return check_env_id(env_id).action_mask


def is_pixel_env(env_id: str) -> bool:
    return check_env_id(env_id).pixels


@cache
def env_specs(env_id: str) -> dict[str, dict[str, Any]]:
    """Observation and action of ``env_id`` in the model repository's spec format."""
    entry = check_env_id(env_id)
    register_envs()
    env = gym.make(entry.env_id)
    try:
        obs_space, act_space = env.observation_space, env.action_space
    finally:
        env.close()
    if isinstance(obs_space, gym.spaces.Dict):
        observation = {
            "type": "dict",
            "entries": {name: _observation_spec(space) for name, space in obs_space.spaces.items()},
        }
    else:
        observation = _observation_spec(obs_space)
    return {"observation": observation, "action": _action_spec(act_space)}


def _observation_spec(space: gym.Space) -> dict[str, Any]:
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "discrete", "n": int(space.n)}
    dtype = "uint8" if space.dtype == np.uint8 else "float32"
    return {"shape": list(space.shape), "dtype": dtype}


def _describe(observation: dict[str, Any]) -> str:
    """An observation spec in a few words: ``[4]``, ``discrete(500)``, ``{cart: [2], …}``."""
    if observation.get("type") == "discrete":
        return f"discrete({observation['n']})"
    if observation.get("type") == "dict":
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in observation["entries"].items()) + "}"
    return str(observation["shape"])


def check_compatible(env_id: str, spec: PolicySpec, policy: str) -> None:
    """Raise 422 naming both specs when ``spec`` cannot act in ``env_id``."""
    env = env_specs(env_id)
    ok = env["observation"] == spec.observation.model_dump()
    ea, pa = env["action"], spec.action.model_dump()
    if ok and ea["type"] != pa["type"]:
        ok = False
    elif ok and multi_part(ea):
        ok = TypeAdapter(ActionSpec).validate_python(ea).model_dump() == pa
    elif ok and ea["type"] == "discrete":
        ok = ea["n"] == pa["n"]
    elif ok:
        ok = ea["shape"] == pa["shape"] and torch.allclose(
            torch.tensor([ea["low"], ea["high"]]), torch.tensor([pa["low"], pa["high"]]), atol=1e-4
        )
    if not ok:
        raise InvalidInput(
            f"environment {env_id} (observation {_describe(env['observation'])}, action {ea}) does "
            f"not fit policy {policy} (observation {_describe(spec.observation.model_dump())}, action {pa})"
        )
