"""Request and response models of the API (in and out kept apart)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Strict, StrictBool, Tag, model_validator

from service.exploration import Exploration, ExplorationParams
from service.registry.spec import NAME_PATTERN
from service.runtime.arrays import EncodedArray
from service.serving.evaluation import EvaluateParams
from service.serving.params import (
    ActParams,
    RolloutParams,
    SessionCreateParams,
    SessionStepParams,
)
from service.training.algorithms import Algorithm
from service.training.job import DatasetJob, EnvJob, JobProgress, JobRequest, JobStatus, SessionsJob

Number = Annotated[float, Strict()]
# A float vector, an integer for a discrete observation (one-hot encoded by the policy), or an
# object of named entries (each a vector or an integer) for a dict observation.
Vector = Annotated[list[Number], Field(max_length=65536)]
Entry = Vector | Annotated[int, Strict()]


class ArrayIn(BaseModel):
    """An array as raw bytes: base64 of the C-order little-endian buffer, its dtype and shape."""

    model_config = ConfigDict(extra="forbid")

    b64: str = Field(description="base64 (standard alphabet, padded) of the raw bytes")
    dtype: Literal["uint8", "float32"]
    shape: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=4)

    def encoded(self) -> EncodedArray:
        return EncodedArray(self.b64, self.dtype, tuple(self.shape))


def _observation_form(value: Any) -> str:
    """Which form an observation takes, read from the value itself, so that only that form is
    validated (a plain union tries every member: 2.2x the cost on a 400x600x3 nested list)."""
    if isinstance(value, dict):
        return "array" if "b64" in value else "entries"
    if isinstance(value, list):
        rank, x = 1, value
        while x and isinstance(x[0], list) and rank < 4:
            x, rank = x[0], rank + 1
        return f"rank{rank}"
    return "integer"


# One observation: a float vector (rank 1), a tensor of rank 2 to 4 as nested number lists (an
# image, HWC as the env yields it), an integer (discrete), raw bytes (ArrayIn), or named entries,
# each itself one of the others (a vector, an integer, or, for an exported program, any tensor).
_LEAVES = (
    Annotated[Vector, Tag("rank1")],
    Annotated[list[list[Number]], Tag("rank2")],
    Annotated[list[list[list[Number]]], Tag("rank3")],
    Annotated[list[list[list[list[Number]]]], Tag("rank4")],
    Annotated[Annotated[int, Strict()], Tag("integer")],
    Annotated[ArrayIn, Tag("array")],
)
Entry = Annotated[Union[_LEAVES], Discriminator(_observation_form)]  # noqa: UP007 (a tuple of members)
Observation = Annotated[
    Union[(*_LEAVES, Annotated[Annotated[dict[str, Entry], Field(max_length=32)], Tag("entries")])],  # noqa: UP007
    Discriminator(_observation_form),
]


def _decoded(row: Any) -> Any:
    """A row with its raw-bytes arrays (top level or entries) as the runtime decodes them."""
    if type(row) is ArrayIn:
        return row.encoded()
    if type(row) is dict and any(type(v) is ArrayIn for v in row.values()):
        return {k: v.encoded() if type(v) is ArrayIn else v for k, v in row.items()}
    return row


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Mask = list[StrictBool]


class _ObservationsIn(_In):
    observation: Observation | None = Field(
        None,
        description="One observation: a list of numbers (nested for images), an integer "
        "(discrete), an object of named entries (dict), or {b64, dtype, shape} raw bytes.",
    )
    observations: list[Observation] | None = Field(None, description="A batch of observations.")
    action_mask: Mask | None = Field(
        None,
        description="With 'observation' (discrete policies): one bool per action, true = allowed.",
        max_length=65536,
    )
    action_masks: list[Mask] | None = Field(
        None, description="With 'observations': one action mask per observation."
    )

    @model_validator(mode="after")
    def _one_of(self):
        if (self.observation is None) == (self.observations is None):
            raise ValueError("send exactly one of 'observation' (one) or 'observations' (a batch)")
        if self.observations is not None and not self.observations:
            raise ValueError("'observations' is empty: send at least one observation")
        if self.action_mask is not None and self.observation is None:
            raise ValueError("'action_mask' goes with 'observation'; with 'observations' send 'action_masks'")
        if self.action_masks is not None and self.observations is None:
            raise ValueError("'action_masks' goes with 'observations'; with 'observation' send 'action_mask'")
        return self

    @property
    def masks(self) -> list[list[bool]] | None:
        return [self.action_mask] if self.action_mask is not None else self.action_masks

    @property
    def rows(self) -> list:
        rows = [self.observation] if self.observation is not None else self.observations
        if any(type(r) is ArrayIn or type(r) is dict for r in rows):  # raw bytes, as decoded
            rows = [_decoded(r) for r in rows]
        return rows

    @property
    def single(self) -> bool:
        return self.observation is not None


class ExplorationFields(_In):
    """The exploration a request (or a session, as its default) asks for."""

    exploration: Exploration | None = Field(
        None, description="deterministic (default) | mode | mean | random"
    )
    epsilon: float | None = Field(None, ge=0.0, le=1.0, description="Q-value + random.")
    noise_std: float | None = Field(None, ge=0.0, le=1e6, description="Actor + random.")

    @property
    def explore(self) -> ExplorationParams:
        return ExplorationParams(self.exploration, self.epsilon, self.noise_std)


class ExplorationIn(ExplorationFields):
    return_info: bool = False


class ActRequest(_ObservationsIn, ExplorationIn):
    version: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    def params(self, policy: str) -> ActParams:
        return ActParams(
            policy,
            self.rows,
            self.single,
            self.explore,
            self.version,
            self.seed,
            self.return_info,
            self.masks,
        )


class ActResponse(BaseModel):
    action: Any | None = None
    actions: list[Any] | None = None
    policy: str
    version: int
    exploration: Exploration
    info: dict[str, Any] | list[dict[str, Any]] | None = None


class VersionPublic(BaseModel):
    version: int
    spec: dict[str, Any] | None
    provenance: dict[str, Any] | None
    error: str | None = None


class PolicyPublic(BaseModel):
    name: str
    default_version: int | None
    versions: list[int]
    kind: str | None
    recurrent: bool | None
    observation: dict[str, Any] | None
    action: dict[str, Any] | None
    env_id: str | None
    routing: dict[str, float] | None = Field(
        None, description="The served split (PUT …/routing): each version's share; null: the default serves"
    )


class PolicyDetail(PolicyPublic):
    version_details: list[VersionPublic]


class PolicyList(BaseModel):
    policies: list[PolicyPublic]


class PublishedVersion(BaseModel):
    name: str
    version: int


class DefaultVersionIn(_In):
    version: int = Field(ge=1)


class DatasetPublic(BaseModel):
    dataset_id: str
    episodes: int
    steps: int
    observation_space: str
    action_space: str
    env_id: str | None
    algorithm_name: str | None = None
    description: str | None = None
    minari_version: str | None = None
    propensities: bool = Field(
        description="Whether its episodes log each action's log-probability (infos.log_prob): WIS needs it"
    )
    size_bytes: int


class DatasetList(BaseModel):
    datasets: list[DatasetPublic]


class ExportExperienceIn(_In):
    dataset: str = Field(max_length=300, description="The new dataset's id (Minari's [namespace/]name-vN)")


class EvaluateIn(_In):
    dataset: str = Field(max_length=300, description="A dataset id with logged propensities (infos.log_prob)")
    version: int | None = Field(None, ge=1, description="Default: the default version")
    method: Literal["wis", "fqe"] = Field(
        "wis",
        description="wis: weighted importance sampling (needs logged propensities); fqe: fitted Q "
        "evaluation (discrete actions, gamma < 1)",
    )
    exploration: Exploration = Field(
        Exploration.deterministic, description="The exploration the version would act with"
    )
    epsilon: float | None = Field(None, ge=0.0, le=1.0, description="Q-value + random; default from its spec")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount of the returns (1: episode returns)")
    bootstrap: int = Field(1000, ge=0, le=10_000, description="Bootstrap resamples behind ci95")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the resampling")

    def params(self) -> EvaluateParams:
        return EvaluateParams(**self.model_dump())


class EvaluateOut(BaseModel):
    policy: str
    version: int
    dataset: str
    method: str
    estimate: float = Field(description="The version's estimated return on the logged episodes")
    ci95: list[float] = Field(description="Bootstrap 95% interval of the estimate")
    episodes: int
    effective_sample_size: float = Field(description="(sum w)^2 / sum w^2 of the episodes' weights")
    dataset_mean_return: float = Field(description="The logging policy's mean return in the data")
    exploration: str
    gamma: float


class RoutingIn(_In):
    weights: dict[str, float] = Field(
        min_length=1,
        max_length=16,
        description='Each version\'s share of the traffic, e.g. {"3": 0.9, "4": 0.1} '
        "(any non-negative numbers)",
    )
    shadow: int | None = Field(None, ge=1, description="A version that gets a copy of the routed traffic")


class ReturnStats(BaseModel):
    mean: float | None
    std: float | None
    ci95: list[float] | None = Field(description="95% interval of the mean (Student t)")


class VersionStats(BaseModel):
    version: int
    requests: int = Field(description="Act calls answered (a batch is one)")
    observations: int
    sessions: int = Field(description="Sessions created on this version")
    episodes: int = Field(description="Episodes clients ended (terminated/truncated) in sessions")
    return_: ReturnStats = Field(alias="return")


class ShadowStats(BaseModel):
    version: int
    compared: int = Field(description="Observations the shadow answered")
    agreement: float | None = Field(description="Share of them it answered as the primary did")
    dropped: int = Field(description="Copies dropped because the shadow queue was full")


class VersionStatsOut(BaseModel):
    policy: str
    routing: dict[str, float] | None
    versions: list[VersionStats]
    shadow: ShadowStats | None


class RoutingOut(BaseModel):
    name: str
    weights: dict[str, float] | None = Field(description="The split asked for (routing.json)")
    shadow: int | None
    split: dict[str, float] | None = Field(
        description="What is served of it: the servable versions and their shares (null: the default serves)"
    )
    left_out: list[int] = Field(description="Versions it names that are not servable now")


# -- sessions --------------------------------------------------------------------------------
class SessionCreate(ExplorationFields):
    policy: str | None = Field(None, pattern=NAME_PATTERN, max_length=64)
    job: str | None = Field(
        None, max_length=64, description="Instead of policy: act with this source-sessions job's learner."
    )
    version: int | None = Field(None, ge=1)
    num_envs: int = Field(1, ge=1)
    ttl_s: float | None = Field(None, gt=0)
    record: str | None = Field(
        None,
        max_length=300,
        description="A dataset id (Minari's [namespace/]name-vN): the session's episodes, with each "
        "action's log-propensity, are recorded into it (created with the policy's spaces if new); "
        "steps report reward, terminated, truncated",
    )

    @model_validator(mode="after")
    def _policy_or_job(self):
        if (self.policy is None) == (self.job is None):
            raise ValueError(
                "send exactly one of 'policy' (a served policy) or 'job' (a job learning from sessions)"
            )
        if self.job is not None and self.version is not None:
            raise ValueError("'version' goes with 'policy'; a job's sessions act with its latest weights")
        if self.job is not None and self.record is not None:
            raise ValueError("'record' goes with 'policy'; a job records its sessions' transitions itself")
        return self

    def params(self) -> SessionCreateParams:
        return SessionCreateParams(
            self.policy or "",
            self.version,
            self.num_envs,
            self.explore,
            self.ttl_s,
            self.job,
            record=self.record,
        )


class SessionSummary(BaseModel):
    live: int
    limit: int


class SessionPublic(BaseModel):
    session_id: str
    policy: str
    version: int
    num_envs: int
    steps: int
    expires_at: datetime
    job: str | None = None


class SessionActRequest(_ObservationsIn, ExplorationIn):
    reset: bool | list[bool] | None = Field(
        None, description="First step of a new episode: one bool, or one per env."
    )
    reward: Number | list[Number | None] | None = Field(
        None,
        description="Job sessions: the previous action's reward (one value, or one per env; null for "
        "an env with nothing to report, e.g. one that starts an episode in this call).",
    )
    terminated: StrictBool | list[StrictBool] | None = Field(
        None, description="Job sessions: the episode ended (this observation is its last)."
    )
    truncated: StrictBool | list[StrictBool] | None = Field(
        None, description="Job sessions: the episode was cut short (this observation is its last)."
    )

    def params(self, session_id: str) -> SessionStepParams:
        return SessionStepParams(
            session_id,
            self.rows,
            self.single,
            self.reset,
            self.explore,
            self.return_info,
            self.masks,
            self.reward,
            self.terminated,
            self.truncated,
        )


class SessionActResponse(BaseModel):
    action: Any | None = None
    actions: list[Any] | None = None
    step: int
    policy_frames: int | None = Field(
        None, description="Job sessions: the reported frames the acting weights were learned from."
    )
    policy: str
    version: int
    exploration: Exploration
    info: dict[str, Any] | list[dict[str, Any]] | None = None


# -- rollouts and envs -----------------------------------------------------------------------
class RolloutRequest(ExplorationFields):
    env_id: str | None = Field(None, max_length=128)
    version: int | None = Field(None, ge=1)
    episodes: int = Field(1, ge=1)
    max_steps: int = Field(1000, ge=1)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    return_trajectory: bool = False

    def params(self, policy: str) -> RolloutParams:
        return RolloutParams(
            policy,
            self.version,
            self.env_id,
            self.episodes,
            self.max_steps,
            self.explore,
            self.seed,
            self.return_trajectory,
        )


class RolloutResponse(BaseModel):
    policy: str
    version: int
    env_id: str
    episodes: list[dict[str, Any]]
    mean_return: float
    std_return: float


class EnvPublic(BaseModel):
    env_id: str
    observation: dict[str, Any]
    action: dict[str, Any]
    action_mask: bool = False
    pixels: bool = False
    description: str


class EnvList(BaseModel):
    envs: list[EnvPublic]


# -- jobs ------------------------------------------------------------------------------------


class ImitationIn(_In):
    dataset: str = Field(max_length=300, description="A dataset id of expert transitions")
    weight: float = Field(1.0, gt=0, le=100, description="Weight of the supervised term in the loss")


class JobCreate(_In):
    algorithm: Algorithm = Field(
        description="dqn (discrete actions; qvalue policy), sac (box; probabilistic TanhNormal "
        "policy), td3 (box; deterministic actor), ppo (discrete or box, vector observations; "
        "probabilistic categorical / TanhNormal policy); from a dataset (source 'dataset'): bc "
        "(behaviour cloning; probabilistic policy), discrete_cql (conservative Q-learning; qvalue) "
        "or dqn (offline DQN: the same loss without the conservative term)."
    )
    source: Literal["env", "sessions", "dataset"] = Field(
        "env",
        description="env: the server steps env_id; sessions: clients report transitions through "
        "sessions bound to the job (dqn; give observation and action instead of env_id); dataset: "
        "learn from an offline dataset (bc, discrete_cql; env_id optional, for evaluation).",
    )
    dataset: str | None = Field(None, max_length=300, description="source dataset: the dataset id.")
    imitation: ImitationIn | None = Field(
        None,
        description="dqn, sac or td3 in an env: a supervised term on a dataset's expert transitions, "
        "weighted (dqn: the cross-entropy of the expert's actions under the Q-values as logits; sac: "
        "their negative log-likelihood; td3: the squared distance of the actor's action to theirs)",
    )
    env_id: str | None = Field(None, max_length=128, description="An allow-listed environment id.")
    observation: dict[str, Any] | None = Field(None, description="source sessions: policy.json's observation")
    action: dict[str, Any] | None = Field(None, description="source sessions: policy.json's action")
    policy_name: str = Field(
        pattern=NAME_PATTERN, max_length=64, description="Published as a new version of this policy."
    )
    recurrent: bool = False
    total_frames: int = Field(ge=1)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    hyperparameters: dict[str, Any] | None = None
    experience_from: list[Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]] | None = Field(
        None,
        max_length=16,
        description="source sessions: ids of earlier source-sessions jobs (same observation, action "
        "and recurrent) whose recorded transitions seed the replay buffer (an offline start).",
    )

    @model_validator(mode="after")
    def _source(self):
        offline_only = self.algorithm in ("bc", "discrete_cql")
        if offline_only and self.source != "dataset":
            raise ValueError("bc and discrete_cql learn from a dataset (source 'dataset' with 'dataset')")
        if self.source == "dataset" and self.algorithm not in ("bc", "discrete_cql", "dqn"):
            raise ValueError("source 'dataset' trains bc, discrete_cql or dqn (offline DQN)")
        if self.source == "dataset":
            if self.dataset is None:
                raise ValueError("source 'dataset' needs 'dataset' (a dataset id, GET /v1/datasets)")
            if self.observation is not None or self.action is not None or self.experience_from:
                raise ValueError("a dataset has its own spaces: no observation, action or experience_from")
            if self.recurrent:
                raise ValueError("offline jobs train feed-forward policies (recurrent=false)")
            return self
        if self.dataset is not None:
            raise ValueError("'dataset' goes with source 'dataset'")
        if self.imitation is not None and (
            self.source != "env" or self.algorithm not in ("dqn", "sac", "td3") or self.recurrent
        ):
            raise ValueError("imitation goes with dqn, sac and td3 jobs in an env (not recurrent)")
        if self.source == "env":
            if self.env_id is None:
                raise ValueError("env_id is required (or source 'sessions' with observation and action)")
            if self.observation is not None or self.action is not None:
                raise ValueError("observation and action go with source 'sessions'; an env has its own")
            if self.experience_from:
                raise ValueError("experience_from goes with source 'sessions' (recorded client experience)")
        else:
            if self.env_id is not None:
                raise ValueError(
                    "source 'sessions' learns from clients: send observation and action, no env_id"
                )
            if self.observation is None or self.action is None:
                raise ValueError(
                    "source 'sessions' needs the observation and action specs (policy.json form)"
                )
        return self

    def request(self) -> JobRequest:
        """The typed request the service, the record and the trainer use."""
        fields = self.model_dump(exclude_none=True)
        if self.source == "dataset":
            for key in ("observation", "action", "experience_from"):
                fields.pop(key, None)
            return DatasetJob(**fields)
        if self.source == "env":
            for key in ("observation", "action", "experience_from"):
                fields.pop(key, None)
            return EnvJob(**fields)
        return SessionsJob(**fields)


class JobPublic(BaseModel):
    job_id: str
    status: JobStatus
    created_at: str
    started_at: str | None
    finished_at: str | None
    request: dict[str, Any]
    progress: JobProgress | None
    result: dict[str, Any] | None
    error: str | None
    device: str | None


class JobAccepted(BaseModel):
    job_id: str
    status: JobStatus


class JobList(BaseModel):
    jobs: list[JobPublic]


class JobMetrics(BaseModel):
    points: list[dict[str, Any]]


# -- Open Inference Protocol (/v2) -------------------------------------------------------------
class OipTensorIn(BaseModel):
    """One input tensor: ``data`` (JSON, flat or nested, row-major) or, with the binary tensor
    extension, ``parameters.binary_data_size`` bytes of the body after the JSON header."""

    name: str = Field(max_length=64)
    shape: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=8)
    datatype: str = Field(max_length=16)
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class OipOutputIn(BaseModel):
    name: str = Field(max_length=64)
    parameters: dict[str, Any] | None = None


class OipInferRequest(BaseModel):
    """``POST /v2/models/{name}/infer``'s JSON (the header, with the binary extension)."""

    id: str | None = Field(None, max_length=256)
    parameters: dict[str, Any] | None = None
    inputs: list[OipTensorIn] = Field(min_length=1, max_length=40)
    outputs: list[OipOutputIn] | None = Field(None, max_length=16)
