"""``PolicySpec``: the contents of ``policy.json``, validated before anything is built."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_PATTERN = NAME_RE.pattern


def is_valid_name(name: str) -> bool:
    """Policy and job names: letters, digits, ``_ . -``; never a path."""
    return bool(NAME_RE.match(name)) and ".." not in name


# The activations a spec (and a training job) may name; build.ACTIVATIONS maps each to its class.
Activation = Literal["relu", "tanh", "elu", "leaky_relu", "silu"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Largest raw observation a spec may declare (elements): a 1080x1920x3 frame fits.
MAX_OBSERVATION_ELEMENTS = 8_000_000


class ObservationSpec(_Strict):
    """A tensor of any rank: a float vector ``{shape: [d]}``, or e.g. a ``uint8`` image frame
    ``{shape: [400, 600, 3], dtype: uint8}`` exactly as the environment yields it."""

    shape: list[Annotated[int, Field(ge=1, le=65536)]] = Field(min_length=1, max_length=4)
    dtype: Literal["float32", "uint8"] = "float32"

    @model_validator(mode="after")
    def _size(self) -> ObservationSpec:
        if math.prod(self.shape) > MAX_OBSERVATION_ELEMENTS:
            raise ValueError(
                f"observation shape {self.shape} has more than {MAX_OBSERVATION_ELEMENTS} elements"
            )
        return self

    @property
    def discrete(self) -> bool:
        return False

    @property
    def dim(self) -> int:
        """Features of a vector observation (the network's input without preprocessing)."""
        return self.shape[0]

    @property
    def vector(self) -> bool:
        """A float vector: JSON number lists, the cheap validation path."""
        return len(self.shape) == 1 and self.dtype == "float32"


class DiscreteObservationSpec(_Strict):
    """An integer in ``[0, n)`` (e.g. Taxi's state), one-hot encoded before the network."""

    type: Literal["discrete"]
    n: int = Field(ge=2, le=65536)

    @property
    def discrete(self) -> bool:
        return True

    @property
    def dim(self) -> int:
        return self.n


# Keys the built policy and the runtime write next to the observation entries.
RESERVED_KEYS = frozenset(
    {
        "observation",
        "observation_encoded",
        "features",
        "action",
        "action_mask",
        "action_value",
        "chosen_action_value",
        "logits",
        "loc",
        "scale",
        "action_log_prob",
        "sample_log_prob",
        "is_init",
        "recurrent_state_h",
        "recurrent_state_c",
        "next",
        "reward",
        "done",
        "terminated",
        "truncated",
        "step_count",
        "collector",
    }
)
ENTRY_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")

EntrySpec = ObservationSpec | DiscreteObservationSpec


class DictObservationSpec(_Strict):
    """Named entries (RLlib's Dict space), each a vector or a discrete value.

    Requests send a JSON object ``{name: value}``; the policy encodes each entry (one-hot for a
    discrete one) and concatenates them in the order listed here before the network.
    """

    type: Literal["dict"]
    entries: dict[str, EntrySpec] = Field(min_length=1, max_length=32)

    @model_validator(mode="after")
    def _names(self) -> DictObservationSpec:
        for name in self.entries:
            if not ENTRY_NAME_RE.match(name):
                raise ValueError(
                    f"entry name {name[:40]!r} must be a letter then up to 31 letters, digits or '_'"
                )
            if name in RESERVED_KEYS:
                raise ValueError(f"entry name {name!r} is reserved; reserved: {sorted(RESERVED_KEYS)}")
        return self

    def check_vectors(self) -> None:
        """A declarative policy concatenates its entries: each a float vector or discrete."""
        for name, entry in self.entries.items():
            if not entry.discrete and not entry.vector:
                raise ValueError(
                    f"entry {name!r}: dict entries are float vectors or discrete values "
                    "(an exported program may read entries of any shape)"
                )

    @property
    def discrete(self) -> bool:
        return False

    @property
    def dim(self) -> int:
        """Features the network reads: the entries' encodings concatenated."""
        return sum(e.dim for e in self.entries.values())


class DiscreteActionSpec(_Strict):
    type: Literal["discrete"]
    n: int = Field(ge=2, le=65536)
    mask_required: bool = Field(
        False, description="Every act call must send an action mask (any discrete policy accepts one)."
    )


class BoxActionSpec(_Strict):
    type: Literal["box"]
    shape: list[Annotated[int, Field(ge=1, le=4096)]] = Field(min_length=1, max_length=1)
    low: list[float]
    high: list[float]

    @model_validator(mode="after")
    def _bounds(self) -> BoxActionSpec:
        n = self.shape[0]
        if len(self.low) != n or len(self.high) != n:
            raise ValueError(f"low and high need {n} values each (action shape {self.shape})")
        for lo, hi in zip(self.low, self.high, strict=True):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError("box bounds must be finite with low < high")
        return self


class MultiDiscreteActionSpec(_Strict):
    """Several discrete choices at once (``MultiCategorical``): ``nvec[i]`` values for the i-th.
    Answered as a list of integers. Exported programs only."""

    type: Literal["multi_discrete"]
    nvec: list[Annotated[int, Field(ge=2, le=65536)]] = Field(min_length=1, max_length=64)


LeafActionSpec = Annotated[
    DiscreteActionSpec | BoxActionSpec | MultiDiscreteActionSpec, Field(discriminator="type")
]


class CompositeActionSpec(_Strict):
    """An action made of named leaves (TorchRL's ``Composite`` action spec, e.g. the seed's
    autoregressive ``(a1, a2)``). Answered as a JSON object keyed by leaf name. Exported
    programs only."""

    type: Literal["composite"]
    entries: dict[str, LeafActionSpec] = Field(min_length=1, max_length=32)

    @model_validator(mode="after")
    def _names(self) -> CompositeActionSpec:
        for name in self.entries:
            if not ENTRY_NAME_RE.match(name):
                raise ValueError(
                    f"action entry {name[:40]!r} must be a letter then up to 31 letters, digits or '_'"
                )
        return self


ActionSpec = Annotated[
    DiscreteActionSpec | BoxActionSpec | MultiDiscreteActionSpec | CompositeActionSpec,
    Field(discriminator="type"),
]


IntOrList = Annotated[int, Field(ge=0, le=64)] | list[Annotated[int, Field(ge=0, le=64)]]


class ConvSpec(_Strict):
    """A TorchRL ``ConvNet`` in front of the MLP head (its own arguments, by the same names)."""

    num_cells: list[Annotated[int, Field(ge=1, le=1024)]] = Field(min_length=1, max_length=8)
    kernel_sizes: IntOrList = 3
    strides: IntOrList = 1
    paddings: IntOrList = 0
    activation: Activation = "elu"
    aggregator: Literal["flatten", "adaptive_avg_pool"] = Field(
        "flatten",
        description="flatten: SquashDims (TorchRL's default); adaptive_avg_pool: "
        "AdaptiveAvgPool2d((1, 1)) with squeeze_output, as in the recurrent-DQN seed.",
    )

    @model_validator(mode="after")
    def _lengths(self) -> ConvSpec:
        depth = len(self.num_cells)
        for name in ("kernel_sizes", "strides", "paddings"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != depth:
                raise ValueError(f"conv {name} lists {len(value)} values for {depth} layers")
        if any(k == 0 for k in _as_list(self.kernel_sizes)) or any(s == 0 for s in _as_list(self.strides)):
            raise ValueError("conv kernel_sizes and strides must be at least 1")
        return self


def _as_list(value: int | list[int]) -> list[int]:
    return value if isinstance(value, list) else [value]


class NetworkSpec(_Strict):
    type: Literal["mlp"] = "mlp"
    num_cells: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [64, 64], max_length=8
    )
    activation: Activation = "relu"
    conv: ConvSpec | None = Field(
        None, description="A ConvNet before the MLP head (ConvNet -> [LSTM] -> MLP), for images."
    )


# -- preprocessing: TorchRL transforms the server applies to the raw observation -------------
Numbers = float | list[float] | list[list[float]] | list[list[list[float]]]
MAX_NORM_ELEMENTS = 65536


class ToTensorImageSpec(_Strict):
    """TorchRL ``ToTensorImage``: ``[..., H, W, C]`` → ``[..., C, H, W]``, cast to ``dtype``;
    divided by 255 when ``from_int`` (``None``: when the input is not floating point)."""

    type: Literal["to_tensor_image"]
    from_int: bool | None = None
    dtype: Literal["float32", "uint8"] = "float32"


class GrayScaleSpec(_Strict):
    """TorchRL ``GrayScale`` (``[..., 3, H, W]`` → ``[..., 1, H, W]``, ITU-R 601-2 luma)."""

    type: Literal["grayscale"]


class ResizeSpec(_Strict):
    """TorchRL ``Resize(w, h)``: the last two dims become ``[w, h]`` (antialiased)."""

    type: Literal["resize"]
    w: int = Field(ge=1, le=1024)
    h: int | None = Field(None, ge=1, le=1024)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"


class ObservationNormSpec(_Strict):
    """TorchRL ``ObservationNorm``: ``(x - loc) / scale`` with ``standard_normal`` (else
    ``x * scale + loc``); loc and scale broadcast against the observation."""

    type: Literal["observation_norm"]
    loc: Numbers
    scale: Numbers
    standard_normal: bool = True

    @model_validator(mode="after")
    def _values(self) -> ObservationNormSpec:
        for name in ("loc", "scale"):
            flat = _flatten(getattr(self, name))
            if len(flat) > MAX_NORM_ELEMENTS:
                raise ValueError(f"observation_norm {name} has more than {MAX_NORM_ELEMENTS} values")
            if not all(math.isfinite(x) for x in flat):
                raise ValueError(f"observation_norm {name} must be finite")
            if name == "scale" and any(x == 0 for x in flat):
                raise ValueError("observation_norm scale must not be 0")
        return self


class CatFramesSpec(_Strict):
    """TorchRL ``CatFrames``: the last ``N`` (preprocessed) frames concatenated along ``dim``,
    oldest first; at an episode's first step the history repeats that frame (``padding="same"``).
    The history is per-env state, like an LSTM's: a session keeps it, ``reset`` clears it, and a
    stateless act starts an episode at every observation."""

    type: Literal["cat_frames"]
    N: int = Field(ge=2, le=16)
    dim: int = Field(-3, ge=-4, le=-1)
    padding: Literal["same"] = "same"


def _flatten(x: Numbers) -> list[float]:
    return [v for i in x for v in _flatten(i)] if isinstance(x, list) else [x]


PreprocessSpec = Annotated[
    ToTensorImageSpec | GrayScaleSpec | ResizeSpec | ObservationNormSpec | CatFramesSpec,
    Field(discriminator="type"),
]
_PREPROCESS = TypeAdapter(PreprocessSpec)


def parse_preprocess(entry: dict[str, Any]) -> PreprocessSpec:
    """One ``preprocess`` entry of policy.json, validated."""
    return _PREPROCESS.validate_python(entry)


class RecurrentSpec(_Strict):
    type: Literal["lstm"] = "lstm"
    hidden_size: int = Field(ge=1, le=4096)
    num_layers: int = Field(1, ge=1, le=4)


class ExplorationDefaults(_Strict):
    """Defaults used when a request asks for ``random`` without its own parameters."""

    epsilon: float = Field(0.1, ge=0.0, le=1.0, description="Q-value epsilon-greedy.")
    noise_std: float = Field(0.1, ge=0.0, description="Actor additive Gaussian noise.")


PROGRAM_FILE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}\.pt2$")
PROGRAM_MODES = ("deterministic", "random")
IS_INIT = "is_init"


class StateSpec(_Strict):
    """One recurrent-state input of an exported program, per env (the batch not included)."""

    shape: list[Annotated[int, Field(ge=1, le=65536)]] = Field(min_length=1, max_length=4)
    dtype: Literal["float32"] = "float32"

    @model_validator(mode="after")
    def _size(self) -> StateSpec:
        if math.prod(self.shape) > 1 << 20:
            raise ValueError(f"state shape {self.shape} has more than {1 << 20} elements")
        return self


class ProgramSpec(_Strict):
    """A policy served as ``torch.export`` programs (PT2 archives) instead of a built module.

    ``files`` names one archive per exploration mode (``deterministic`` required, ``random``
    optional). ``inputs`` are the programs' positional inputs in order: the observation
    (``observation``, or each dict entry by name), ``action_mask``, each ``state`` entry, and
    ``is_init`` (``[B]`` bool, required with state). ``outputs`` in order: ``action`` (or
    ``action.<leaf>`` per leaf of a composite action), optionally ``action_value``, ``log_prob``
    (or ``log_prob.<leaf>`` per head, and ``log_prob`` of the whole action), then
    ``next_<state>`` for each state entry. Every input and output has the batch first.
    """

    files: dict[Literal["deterministic", "random"], str]
    inputs: list[str] = Field(min_length=1, max_length=64)
    outputs: list[str] = Field(min_length=1, max_length=128)
    state: dict[str, StateSpec] = Field(default_factory=dict, max_length=16)

    @model_validator(mode="after")
    def _shape(self) -> ProgramSpec:
        if "deterministic" not in self.files:
            raise ValueError("program.files needs a 'deterministic' archive")
        for mode, file in self.files.items():
            if not PROGRAM_FILE_RE.match(file):
                raise ValueError(f"program.files.{mode} {file[:40]!r}: a file name like 'deterministic.pt2'")
        if len(set(self.files.values())) != len(self.files):
            raise ValueError("program.files names one archive per mode")
        for what, names in (("inputs", self.inputs), ("outputs", self.outputs)):
            if len(set(names)) != len(names):
                raise ValueError(f"program.{what} lists a name twice")
        for name in self.state:
            if not ENTRY_NAME_RE.match(name) or name in (IS_INIT, "action_mask", "observation"):
                raise ValueError(f"program.state name {name[:40]!r} is not a valid state name")
            if name not in self.inputs or f"next_{name}" not in self.outputs:
                raise ValueError(f"program.state {name!r} must be an input and 'next_{name}' an output")
        if self.state and IS_INIT not in self.inputs:
            raise ValueError("a program with state takes 'is_init' as an input")
        return self


class PolicySpec(_Strict):
    """What a policy is: enough to rebuild its TorchRL module and check its weights."""

    kind: Literal["actor", "probabilistic", "qvalue"]
    observation: ObservationSpec | DiscreteObservationSpec | DictObservationSpec
    action: ActionSpec
    preprocess: list[PreprocessSpec] = Field(
        default_factory=list,
        max_length=16,
        description="TorchRL transforms applied in order to the raw observation before the network.",
    )
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    recurrent: RecurrentSpec | None = None
    distribution: Literal["normal", "tanh_normal", "categorical"] | None = None
    squash: Literal["scaled_tanh", "tanh", "clip"] = Field(
        "scaled_tanh",
        description="How an actor's output meets the box (kind 'actor'): scaled_tanh maps tanh onto "
        "[low, high]; tanh is a plain tanh then clipped into the box; clip clips the raw output.",
    )
    program: ProgramSpec | None = Field(
        None, description="Served as torch.export programs (PT2 archives), not built from network."
    )
    env_id: str | None = Field(None, max_length=128)
    exploration: ExplorationDefaults = Field(default_factory=ExplorationDefaults)
    provenance: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _kind_fits(self) -> PolicySpec:
        if self.program is not None:
            self._program_fits()
            return self
        if self.action.type not in ("discrete", "box"):
            raise ValueError(
                f"action type {self.action.type!r} is served by exported programs only "
                "(policy.json 'program')"
            )
        if isinstance(self.observation, DictObservationSpec):
            self.observation.check_vectors()
        discrete = self.action.type == "discrete"
        if self.kind == "qvalue" and not discrete:
            raise ValueError("kind 'qvalue' needs a discrete action space")
        if self.kind == "actor" and discrete:
            raise ValueError("kind 'actor' needs a box action space")
        if self.kind == "probabilistic":
            if self.distribution is None:
                raise ValueError("kind 'probabilistic' needs distribution")
            if (self.distribution == "categorical") != discrete:
                raise ValueError(
                    "distribution 'categorical' goes with discrete actions; "
                    "'normal' and 'tanh_normal' with box actions"
                )
        elif self.distribution is not None:
            raise ValueError(f"distribution applies to kind 'probabilistic' only, not {self.kind!r}")
        if (self.preprocess or self.network.conv) and not isinstance(self.observation, ObservationSpec):
            raise ValueError("preprocess and network.conv apply to a tensor observation {shape, dtype}")
        if self.squash != "scaled_tanh" and self.kind != "actor":
            raise ValueError("squash applies to kind 'actor' only")
        if sum(isinstance(p, CatFramesSpec) for p in self.preprocess) > 1:
            raise ValueError("preprocess may hold one cat_frames")
        return self

    def observation_names(self) -> list[str]:
        obs = self.observation
        return list(obs.entries) if isinstance(obs, DictObservationSpec) else ["observation"]

    def action_outputs(self) -> list[str]:
        """The program outputs that make the action: ``action``, or one per composite leaf."""
        if isinstance(self.action, CompositeActionSpec):
            return [f"action.{leaf}" for leaf in self.action.entries]
        return ["action"]

    def _program_fits(self) -> None:
        program = self.program
        if self.recurrent is not None or self.preprocess or self.network.conv is not None:
            raise ValueError(
                "a program policy holds its whole network: recurrent, preprocess and network.conv "
                "do not apply (put them inside the program)"
            )
        if self.distribution is not None:
            raise ValueError("distribution does not apply to a program policy (it is inside the program)")
        if self.kind == "qvalue" and self.action.type != "discrete":
            raise ValueError("kind 'qvalue' needs a discrete action space")
        expected = self.observation_names()
        if self.action.type == "discrete":
            expected.append("action_mask")
        names = set(program.inputs)
        missing = [n for n in expected if n not in names and n != "action_mask"]
        allowed = {*expected, *program.state, IS_INIT}
        unknown = [n for n in program.inputs if n not in allowed]
        if missing or unknown:
            raise ValueError(
                f"program.inputs {program.inputs} must name the observation {self.observation_names()}"
                + (", 'action_mask'" if self.action.type == "discrete" else "")
                + ", the state entries and 'is_init'"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {unknown}" if unknown else "")
            )
        actions = self.action_outputs()
        missing = [n for n in actions if n not in program.outputs]
        heads = [a.replace("action", "log_prob", 1) for a in actions]
        allowed = {*actions, "action_value", "log_prob", *heads, *(f"next_{n}" for n in program.state)}
        unknown = [n for n in program.outputs if n not in allowed]
        if missing or unknown:
            raise ValueError(
                f"program.outputs {program.outputs} must name the action {actions}, and may name "
                f"'action_value', 'log_prob'{', ' + str(heads) if len(heads) > 1 else ''} and the next state"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {unknown}" if unknown else "")
            )
        if "action_value" in program.outputs and self.action.type != "discrete":
            raise ValueError("'action_value' is an output of discrete policies")

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "recurrent": self.recurrent is not None or bool(self.program and self.program.state),
            "observation": self.observation.model_dump(),
            "action": self.action.model_dump(),
            "env_id": self.env_id,
        }
