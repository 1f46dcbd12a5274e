"""Exported programs (PT2 archives) read without pickle: the one loader of ``torch.export`` files.

``torch.export.load`` is not a safe loader: it unpickles the archive's ``sample_inputs`` member
(``torch.load(weights_only=False)``) and any payload marked ``use_pickle``, and turning the
program into a module ``exec``s the archive's ``guards_code``. ``read_program`` instead:

1. opens the archive with ``zipfile`` and checks its members: sizes (the whole, each member,
   the graph), names (only the members ``torch.export.save`` writes; ``sample_inputs`` is never
   read), no pickled payload, no custom or opaque objects;
2. parses the graph (JSON) and refuses any operator outside ``ALLOWED_OPS`` (ATen's core
   operators and the few others TorchRL's modules and distributions export to) before anything
   is deserialized;
3. reads every weight and constant from its raw bytes (``torch.frombuffer``: dtype, size,
   strides checked against the bytes there are);
4. deserializes with torch's own ``ExportedProgramDeserializer`` (no example inputs, the guard
   code dropped: the server checks every input against ``policy.json`` itself) and checks the
   graph's user inputs and outputs against what ``policy.json`` names.

Every refusal is ``ProgramRefused`` with a reason naming the part. The one place that knows the
PT2 layout of torch 2.13; ``tests/test_programs.py`` checks it against ``torch.export.save``.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from dataclasses import dataclass, field

import torch

from service.registry.spec import PolicySpec

MAX_ARCHIVE_BYTES = 256 * 1024 * 1024  # uncompressed, all members
MAX_GRAPH_BYTES = 32 * 1024 * 1024
MAX_MEMBERS = 4096
MAX_NODES = 100_000

# The members torch.export.save writes (under the archive's one top directory).
_MEMBER = re.compile(
    r"^(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/model\.pt)$"
)
_IGNORED = "data/sample_inputs/model.pt"  # a torch.save (pickle) file: never read

# Operators besides ATen's core set that TorchRL policies export to (training IR: torch.export
# keeps these composite ops undecomposed). None reads or writes anything but its tensors.
_EXTRA_ATEN = {
    "_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel", "sym_stride",
    "sym_constrain_range_for_size", "to", "linear", "softmax", "log_softmax", "multinomial", "lstm",
    "gru", "rnn_tanh", "one_hot", "numpy_T", "reshape", "flatten", "unflatten", "broadcast_tensors",
    "broadcast_to", "logsumexp", "einsum", "matmul", "dropout", "normal", "randn", "randn_like",
    "rand", "rand_like", "bernoulli", "exponential", "randint", "contiguous", "view_as",
    "expand_as", "type_as", "masked_fill", "where", "t", "transpose", "squeeze", "unsqueeze",
    "stack", "chunk", "split", "unbind", "tensor_split", "argmax", "argmin", "flip", "sort", "topk",
    "cumsum", "softplus", "log1p", "expm1", "gelu", "silu", "elu", "leaky_relu", "relu", "tanh",
    "sigmoid", "clamp", "clip", "lift_fresh_copy", "alias", "detach", "zeros", "ones", "zeros_like",
    "ones_like", "full", "full_like", "arange", "scalar_tensor", "new_zeros", "new_ones",
    "new_full", "item", "layer_norm", "group_norm", "batch_norm", "conv1d", "conv2d",
    "adaptive_avg_pool2d", "max_pool2d", "avg_pool2d", "scaled_dot_product_attention", "baddbmm",
    "bmm", "mm", "addmm", "mean", "sum", "amax", "amin", "max", "min", "prod", "norm", "square",
    "pow", "sqrt", "rsqrt", "exp", "log", "abs", "neg", "sign", "floor", "ceil", "round",
    "remainder", "fmod", "index_select", "gather", "select", "slice", "index", "take_along_dim",
    "repeat", "tile", "expand", "view", "permute", "cat", "split_with_sizes", "masked_select",
    "logical_not", "logical_and", "logical_or", "logical_xor", "bitwise_not", "bitwise_and",
    "bitwise_or", "eq", "ne", "lt", "le", "gt", "ge", "any", "all", "isfinite", "isnan",
    "nan_to_num", "hardtanh", "hardswish", "mish", "selu", "prelu", "glu", "erf", "lerp", "clone",
    "copy", "_to_copy", "empty", "empty_like", "fill", "atan2", "sin", "cos", "cross_entropy_loss",
    "nll_loss", "nll_loss_nd", "nll_loss2d", "xlogy", "special_xlogy", "clamp_min", "clamp_max",
    "rsub", "atanh", "normal_",
}  # fmt: skip
_OTHER_TARGETS = {
    "_operator.getitem", "_operator.add", "_operator.sub", "_operator.mul", "_operator.floordiv",
    "_operator.truediv", "_operator.mod", "_operator.neg", "_operator.eq", "_operator.ne",
    "_operator.lt", "_operator.le", "_operator.gt", "_operator.ge", "_operator.and_",
    "_operator.or_", "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_float",
    "torch.sym_int", "torch.sym_sqrt", "math.ceil", "math.floor", "math.trunc", "math.sqrt",
}  # fmt: skip
_ATEN_TARGET = re.compile(r"^torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)$")
_TENSOR_DTYPES = {
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
}  # fmt: skip


class ProgramRefused(ValueError):
    """An archive the server will not load; the message names the part and why."""


def _core_aten() -> frozenset[str]:
    names = set()
    for name in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, name, None)
        overloads = getattr(packet, "overloads", None)
        if overloads is None:
            continue
        for overload in packet.overloads():
            if torch.Tag.core in getattr(packet, overload).tags:
                names.add(name)
                break
    return frozenset(names)


_ALLOWED_ATEN: frozenset[str] | None = None


def allowed_aten() -> frozenset[str]:
    """ATen's core operators (``torch.Tag.core``) and ``_EXTRA_ATEN``."""
    global _ALLOWED_ATEN
    if _ALLOWED_ATEN is None:
        _ALLOWED_ATEN = _core_aten() | frozenset(_EXTRA_ATEN)
    return _ALLOWED_ATEN


@dataclass
class Program:
    """One loaded archive: the program as a module of positional tensors, and its file's bytes
    (handed out as they are by ``export?format=pt2``)."""

    module: torch.nn.Module
    data: bytes
    operators: set[str] = field(default_factory=set)


@dataclass
class Programs:
    """A program policy's archives by exploration mode (``deterministic``, maybe ``random``)."""

    modes: dict[str, Program]


def read_programs(spec: PolicySpec, files: dict[str, bytes]) -> Programs:
    """Every archive ``spec.program`` names, read from ``files`` (file name -> bytes).

    Raises:
        ProgramRefused: a file missing or unexpected, or any archive refused (see the module).
    """
    program = spec.program
    wanted = set(program.files.values())
    missing = sorted(wanted - set(files))
    unexpected = sorted(set(files) - wanted)
    if missing or unexpected:
        raise ProgramRefused(
            f"policy.json names the archives {sorted(wanted)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {[u[:40] for u in unexpected[:5]]}" if unexpected else "")
        )
    modes = {}
    for mode, name in program.files.items():
        try:
            modes[mode] = read_program(files[name], spec, name)
        except ProgramRefused as exc:
            raise ProgramRefused(f"{name}: {exc}") from None
    return Programs(modes)


def read_program(data: bytes, spec: PolicySpec, name: str = "archive") -> Program:
    """One PT2 archive as a module, read without pickle and checked against ``spec``."""
    members = _members(data)
    graph_raw = members.get("models/model.json")
    if graph_raw is None:
        raise ProgramRefused("the archive has no models/model.json (one program named 'model')")
    if len(graph_raw) > MAX_GRAPH_BYTES:
        raise ProgramRefused(f"models/model.json is larger than {MAX_GRAPH_BYTES} bytes")
    try:
        graph_json = json.loads(graph_raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProgramRefused(f"models/model.json is not JSON ({exc})") from None
    operators = _check_operators(graph_json)
    state_dict = _payloads(members, "data/weights/", "model_weights_config.json", "weight")
    constants = _payloads(members, "data/constants/", "model_constants_config.json", "tensor")
    module = _deserialize(graph_json, state_dict, constants)
    _check_signature(module, spec)
    return Program(module, data, operators)


def _members(data: bytes) -> dict[str, bytes]:
    """The archive's members by name under its top directory (``sample_inputs`` left unread)."""
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ProgramRefused(f"the archive is larger than {MAX_ARCHIVE_BYTES} bytes")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ProgramRefused(f"not a PT2 archive (a zip file): {exc}") from None
    if len(infos) > MAX_MEMBERS:
        raise ProgramRefused(f"the archive has more than {MAX_MEMBERS} members")
    if sum(i.file_size for i in infos) > MAX_ARCHIVE_BYTES:
        raise ProgramRefused(f"the archive unpacks to more than {MAX_ARCHIVE_BYTES} bytes")
    tops = {i.filename.split("/", 1)[0] for i in infos}
    if len(tops) != 1:
        raise ProgramRefused(f"the archive has {len(tops)} top directories; torch.export.save writes one")
    out: dict[str, bytes] = {}
    for info in infos:
        _, _, inner = info.filename.partition("/")
        if info.is_dir():
            continue
        if not _MEMBER.match(inner):
            raise ProgramRefused(
                f"member {inner[:80]!r} is not one torch.export.save writes (custom objects, "
                "AOTInductor packages and extra files are refused)"
            )
        if inner == _IGNORED:
            continue
        try:
            out[inner] = archive.read(info)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise ProgramRefused(f"member {inner!r} cannot be read: {exc}") from None
    return out


def _check_operators(graph_json: dict) -> set[str]:
    """Every call target of the graph (and its subgraphs), each one allowed."""
    try:
        graphs = [graph_json["graph_module"]["graph"]]
    except (KeyError, TypeError):
        raise ProgramRefused("models/model.json has no graph_module.graph") from None
    seen: set[str] = set()
    count = 0
    while graphs:
        graph = graphs.pop()
        nodes = graph.get("nodes") if isinstance(graph, dict) else None
        if not isinstance(nodes, list):
            raise ProgramRefused("models/model.json: a graph without a node list")
        count += len(nodes)
        if count > MAX_NODES:
            raise ProgramRefused(f"the graph has more than {MAX_NODES} nodes")
        for node in nodes:
            target = node.get("target") if isinstance(node, dict) else None
            if not isinstance(target, str):
                raise ProgramRefused("models/model.json: a node without a target")
            seen.add(target)
            for arg in node.get("inputs", []):  # higher-order ops carry subgraphs as arguments
                graph_arg = (arg.get("arg") or {}).get("as_graph") if isinstance(arg, dict) else None
                if graph_arg is not None:
                    graphs.append(graph_arg.get("graph"))
    refused = sorted(t for t in seen if not _allowed(t))
    if refused:
        raise ProgramRefused(
            f"operators outside the allowed set: {refused[:8]} (allowed: ATen core operators and "
            "what TorchRL's modules and distributions export to)"
        )
    return seen


def _allowed(target: str) -> bool:
    match = _ATEN_TARGET.match(target)
    if match is not None:
        return match.group(1) in allowed_aten()
    return target in _OTHER_TARGETS


def _payloads(members: dict[str, bytes], directory: str, config_name: str, prefix: str) -> dict:
    """The weights (or constants) of the archive from their raw bytes; a pickled one refused."""
    from torch._export.serde.serialize import deserialize_scalar_type

    raw_config = members.get(directory + config_name)
    if raw_config is None:
        raise ProgramRefused(f"the archive has no {directory}{config_name}")
    try:
        config = json.loads(raw_config)["config"]
        if not isinstance(config, dict):
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ProgramRefused(f"{directory}{config_name} is not a payload config") from None
    out: dict[str, torch.Tensor] = {}
    for fqn, meta in config.items():
        where = f"{directory}{config_name}: {str(fqn)[:80]!r}"
        try:
            if meta["use_pickle"]:
                raise ProgramRefused(f"{where} is a pickled payload (never unpickled here)")
            path = meta["path_name"]
            tmeta = meta["tensor_meta"]
            dtype = deserialize_scalar_type(tmeta["dtype"])
            sizes = [s["as_int"] for s in tmeta["sizes"]]
            strides = [s["as_int"] for s in tmeta["strides"]]
            offset = tmeta["storage_offset"]["as_int"]
            device = tmeta["device"]["type"]
        except ProgramRefused:
            raise
        except (KeyError, TypeError, ValueError):
            raise ProgramRefused(f"{where}: not a tensor payload torch.export.save writes") from None
        if not isinstance(path, str) or not re.fullmatch(rf"{prefix}_\d+", path):
            raise ProgramRefused(f"{where}: payload {str(path)[:40]!r} is not a raw tensor file")
        if dtype not in _TENSOR_DTYPES:
            raise ProgramRefused(f"{where}: dtype {dtype} is not allowed")
        if device != "cpu":
            raise ProgramRefused(f"{where}: saved on {device!r}; export on the CPU")
        if not all(isinstance(v, int) and v >= 0 for v in [*sizes, *strides, offset]) or len(sizes) != len(
            strides
        ):
            raise ProgramRefused(f"{where}: invalid sizes or strides")
        if math.prod(sizes) > MAX_ARCHIVE_BYTES:  # stride-0 views of a few bytes included
            raise ProgramRefused(f"{where}: {sizes} is larger than the archive limit")
        blob = members.get(directory + path)
        if blob is None:
            raise ProgramRefused(f"{where}: its file {path!r} is missing")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        need = (
            offset + 1 + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True)) if all(sizes) else 0
        )
        if len(blob) % itemsize or need * itemsize > len(blob):
            raise ProgramRefused(f"{where}: {len(blob)} bytes do not hold a {dtype} tensor of {sizes}")
        flat = torch.frombuffer(bytearray(blob), dtype=dtype) if blob else torch.empty(0, dtype=dtype)
        tensor = torch.as_strided(flat, sizes, strides, offset) if need else torch.zeros(sizes, dtype=dtype)
        out[fqn] = torch.nn.Parameter(tensor, requires_grad=False) if meta.get("is_param") else tensor
    return out


def _deserialize(graph_json: dict, state_dict: dict, constants: dict) -> torch.nn.Module:
    """torch's deserializer on the checked graph; the program as a module (guards dropped)."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    graph_json = {**graph_json, "guards_code": []}  # would be exec'd as Python by .module()
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, graph_json)
        program = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
        module = program.module()
    except ProgramRefused:
        raise
    except Exception as exc:  # a graph torch cannot rebuild: refused, never fatal
        raise ProgramRefused(
            f"the graph does not deserialize: {type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    module.program = program  # ONNX export reads the program
    # the module's own input check (pytree and shape guards per call) would double the cost of a
    # small program's call; the codecs check every input against policy.json before it runs
    module.validate_inputs = False
    return module


def _check_signature(module: torch.nn.Module, spec: PolicySpec) -> None:
    program = module.program
    inputs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    outputs = [s for s in program.graph_signature.output_specs if s.kind.name == "USER_OUTPUT"]
    declared_in, declared_out = spec.program.inputs, spec.program.outputs
    if len(inputs) != len(declared_in) or len(outputs) != len(declared_out):
        raise ProgramRefused(
            f"the graph takes {len(inputs)} input(s) and gives {len(outputs)} output(s); policy.json "
            f"names {len(declared_in)} inputs {declared_in} and {len(declared_out)} outputs {declared_out}"
        )
    nodes = {n.name: n for n in program.graph.nodes}
    pairs = [("input", n, s, _expected_input(spec, n)) for n, s in zip(declared_in, inputs, strict=True)]
    pairs += [("output", n, s, _expected_output(spec, n)) for n, s in zip(declared_out, outputs, strict=True)]
    for what, name, s, expected in pairs:
        node = nodes.get(getattr(s.arg, "name", None))
        value = node.meta.get("val") if node is not None else None
        if expected is None or not isinstance(value, torch.Tensor):
            continue
        dtypes, shape = expected
        got = list(value.shape[1:])
        if (
            value.dtype not in dtypes
            or value.dim() != len(shape) + 1
            or any(isinstance(g, int) and g != e for g, e in zip(got, shape, strict=True))
        ):
            raise ProgramRefused(
                f"graph {what} {name!r} is {value.dtype} {['B', *got]}; "
                f"policy.json means {' or '.join(map(str, dtypes))} {['B', *shape]}"
            )


_FLOAT = (torch.float32,)
_INTEGER = (torch.int64, torch.int32)


def _expected_output(spec: PolicySpec, name: str) -> tuple[tuple, list[int]] | None:
    """The dtypes and per-row shape policy.json gives an output."""
    head, _, leaf = name.partition(".")
    if head == "action":
        action = spec.action.entries[leaf] if leaf else spec.action
        if action.type == "discrete":
            return _INTEGER, []
        if action.type == "multi_discrete":
            return _INTEGER, [len(action.nvec)]
        return _FLOAT, list(action.shape)
    if name == "action_value":
        return _FLOAT, [spec.action.n]
    if head == "log_prob":
        return _FLOAT, []
    if name.startswith("next_") and name[5:] in spec.program.state:
        return _FLOAT, list(spec.program.state[name[5:]].shape)
    return None


def _expected_input(spec: PolicySpec, name: str) -> tuple[tuple, list[int]] | None:
    """The dtype and per-row shape policy.json gives an input."""
    from service.registry.spec import DictObservationSpec

    obs = spec.observation
    leaves = obs.entries if isinstance(obs, DictObservationSpec) else {"observation": obs}
    if name in leaves:
        leaf = leaves[name]
        return ((torch.int64,), []) if leaf.discrete else ((getattr(torch, leaf.dtype),), list(leaf.shape))
    if name == "action_mask":
        return (torch.bool,), [spec.action.n]
    if name == "is_init":
        return (torch.bool,), []
    if name in spec.program.state:
        return _FLOAT, list(spec.program.state[name].shape)
    return None
