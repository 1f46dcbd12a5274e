"""The Open Inference Protocol (KServe v2 / Triton) as a service: server and model metadata,
readiness, the model configuration ``perf_analyzer`` reads, and infer — through the same
registry, limits and micro-batcher as ``/v1`` act (``ActService.forward``), with the tensor
codec (``runtime.tensors``) instead of the JSON rows codec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.config import Settings
from service.errors import InvalidInput, NotFound, check_limit
from service.exploration import Exploration, ExplorationParams
from service.registry.registry import LoadedVersion, Registry
from service.serving.acting import ActService
from service.serving.params import SessionCreateParams
from service.serving.sessions import SessionService

SERVER_NAME = "policy-server"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "parameters", "sequence"]
PLATFORM = "torchrl"


@dataclass(slots=True)
class Sequence:
    """Triton's sequence parameters: one stateful stream of a model, a session of ours."""

    id: str
    start: bool = False
    end: bool = False


@dataclass(slots=True)
class InferParams:
    """One infer call: decoded input arrays by name, the outputs asked for (None: all), the
    sequence it steps (None: stateless, every row starts an episode)."""

    policy: str
    version: int | None
    tensors: dict[str, np.ndarray]
    explore: ExplorationParams = field(default_factory=ExplorationParams)
    seed: int | None = None
    outputs: list[str] | None = None
    sequence: Sequence | None = None


def sequence_session(policy: str, sequence_id: str) -> str:
    """The session that holds a sequence's state: one per (model, sequence id), so every
    replica sharing the session store finds it."""
    return f"v2:{policy}:{sequence_id}"


class InferService:
    def __init__(
        self, registry: Registry, acting: ActService, sessions: SessionService, settings: Settings
    ) -> None:
        self.registry = registry
        self.acting = acting
        self.sessions = sessions
        self.settings = settings

    def server(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    def ready(self) -> bool:
        return self.registry.ready

    def _loaded(self, name: str, version: int | None) -> LoadedVersion:
        return self.registry.resolve(name, version)

    def model(self, name: str, version: int | None) -> dict[str, Any]:
        """Model metadata: versions, inputs and outputs with datatype and shape (-1: batch)."""
        loaded = self._loaded(name, version)
        codec = loaded.runtime.tensors
        entry = self.registry.entry(name)
        return {
            "name": name,
            "versions": [str(v) for v in sorted(entry.versions)],
            "platform": PLATFORM,
            "inputs": [t.public() for t in codec.inputs],
            "outputs": [t.public() for t in codec.outputs],
        }

    def model_ready(self, name: str, version: int | None) -> dict[str, Any]:
        loaded = self._loaded(name, version)
        return {"name": name, "version": str(loaded.version), "ready": True}

    def config(self, name: str, version: int | None) -> dict[str, Any]:
        """Triton's model configuration: what ``perf_analyzer`` and tritonclient read (dims
        without the batch dimension; a per-row scalar is ``dims: [1]`` reshaped to ``[]``)."""
        loaded = self._loaded(name, version)
        codec = loaded.runtime.tensors

        def entry(t) -> dict[str, Any]:
            dims = t.shape[1:]
            out = {"name": t.name, "data_type": f"TYPE_{'STRING' if t.datatype == 'BYTES' else t.datatype}"}
            if dims:
                out["dims"] = dims
            else:
                out.update(dims=[1], reshape={"shape": []})
            return out

        config: dict[str, Any] = {
            "name": name,
            "platform": PLATFORM,
            "max_batch_size": self.settings.max_batch_size,
            "input": [entry(t) for t in codec.inputs],
            "output": [entry(t) for t in codec.outputs],
            "version_policy": {"specific": {"versions": [str(loaded.version)]}},
            "parameters": {"kind": {"string_value": loaded.spec.kind}},
        }
        if loaded.runtime.stateful:  # state per sequence (a session), idle ones expire like sessions
            config["sequence_batching"] = {
                "max_sequence_idle_microseconds": int(self.settings.session_ttl_s * 1e6)
            }
        return config

    async def infer(self, p: InferParams) -> dict[str, Any]:
        """``{model_name, model_version, outputs: {name: array}}`` of one infer call."""
        if p.sequence is not None:
            return await self._sequence_step(p)
        loaded = self.registry.routed(p.policy, p.version)
        runtime = loaded.runtime
        codec = runtime.tensors
        if p.outputs is not None:
            codec.check_outputs(p.outputs, p.policy)
        obs, mask, rows = codec.decode(p.tensors, p.policy)
        check_limit("batch size", rows, self.settings.max_batch_size)
        wanted = codec.output_names if p.outputs is None else p.outputs
        info = any(name != "action" for name in wanted)
        result = await self.acting.forward(runtime, obs, mask, p.explore, p.seed, info)
        self.acting.stats.served(p.policy, loaded.version, rows)
        return {
            "model_name": p.policy,
            "model_version": str(loaded.version),
            "outputs": codec.encode(result, wanted),
        }

    async def _sequence_step(self, p: InferParams) -> dict[str, Any]:
        """A step of a sequence: ``sequence_start`` opens (or restarts) its session, pinned to
        the version resolved now, with as many envs as the request has rows; ``sequence_end``
        closes it after the step. A step of a sequence that is not open → 404."""
        seq = p.sequence
        # a new sequence lands on a version of the split by its id, as a session would by its key
        if seq.start:
            loaded = self.registry.routed(p.policy, p.version, seq.id)
        else:
            loaded = self._loaded(p.policy, p.version)
        codec = loaded.runtime.tensors
        if p.outputs is not None:
            codec.check_outputs(p.outputs, p.policy)
        session_id = sequence_session(p.policy, seq.id)
        if seq.start:
            _, _, rows = codec.decode(p.tensors, p.policy)  # a bad request opens nothing
            check_limit("batch size", rows, self.settings.max_batch_size)
            await self.sessions.discard(session_id)
            await self.sessions.create(
                SessionCreateParams(p.policy, loaded.version, rows, session_id=session_id)
            )
        wanted = codec.output_names if p.outputs is None else p.outputs
        info = any(name != "action" for name in wanted)
        try:
            result, runtime, session = await self.sessions.step_tensors(
                session_id, p.tensors, p.explore, info, close=seq.end
            )
        except NotFound as exc:
            raise NotFound(
                f"sequence {seq.id[:64]!r} of model {p.policy}: {exc.detail}; open one with sequence_start"
            ) from None
        return {
            "model_name": p.policy,
            "model_version": str(session.version),
            "outputs": runtime.tensors.encode(result, wanted),
        }


def parameter(parameters: dict[str, Any], name: str, kinds: tuple[type, ...]) -> Any:
    """A request parameter of the given JSON kinds, or None (422 when of another kind)."""
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise InvalidInput(f"parameter {name!r} must be a {kinds[0].__name__}, got a boolean")
    if not isinstance(value, kinds):
        raise InvalidInput(f"parameter {name!r} must be a {kinds[0].__name__}, got {type(value).__name__}")
    return value


def options(p: dict[str, Any]) -> tuple[ExplorationParams, int | None, Sequence | None]:
    """An infer request's ``parameters`` (REST's JSON object, gRPC's ``InferParameter`` map as
    plain values): exploration, epsilon, noise_std, seed, and the sequence it steps."""
    exploration = parameter(p, "exploration", (str,))
    if exploration is not None and exploration not in Exploration.__members__:
        raise InvalidInput(
            f"parameter 'exploration' is {exploration[:32]!r}; one of {list(Exploration.__members__)}"
        )
    epsilon = parameter(p, "epsilon", (float, int))
    if epsilon is not None and not 0.0 <= epsilon <= 1.0:
        raise InvalidInput(f"parameter 'epsilon' is {epsilon}; it must be in [0, 1]")
    noise_std = parameter(p, "noise_std", (float, int))
    if noise_std is not None and not 0.0 <= noise_std <= 1e6:
        raise InvalidInput(f"parameter 'noise_std' is {noise_std}; it must be in [0, 1e6]")
    seed = parameter(p, "seed", (int,))
    if seed is not None and not 0 <= seed <= 2**63 - 1:
        raise InvalidInput(f"parameter 'seed' is {seed}; it must be in [0, 2**63 - 1]")
    explore = ExplorationParams(
        Exploration(exploration) if exploration else None,
        None if epsilon is None else float(epsilon),
        None if noise_std is None else float(noise_std),
    )
    return explore, seed, _sequence(p)


def _sequence(p: dict[str, Any]) -> Sequence | None:
    """Triton's ``sequence_id`` (a non-zero integer or a non-empty string; 0 and "" mean none),
    ``sequence_start``, ``sequence_end``."""
    sequence_id = p.get("sequence_id")
    start, end = parameter(p, "sequence_start", (bool,)), parameter(p, "sequence_end", (bool,))
    if sequence_id in (None, 0, ""):
        if start or end:
            raise InvalidInput("sequence_start and sequence_end go with a sequence_id")
        return None
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str) or len(str(sequence_id)) > 128:
        raise InvalidInput("parameter 'sequence_id' must be an integer or a string of at most 128 characters")
    return Sequence(str(sequence_id), bool(start), bool(end))
