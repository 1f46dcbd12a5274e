"""RLlib ``PolicyClient``'s wire format, read without running pickle's code: the one pickle
reader of the service, an allow-list unpickler, reached only through ``POST /rllib/{policy}``
when ``POLICY_SERVER_RLLIB_COMPAT`` is on.

The client (``ray.rllib.env.policy_client``) sends ``cloudpickle.dumps({"command": …, …})`` and
unpickles every answer. What such a body holds: RLlib's command enum (``ray.rllib.env.external.
rllink.RLlink`` in ray 2.60, ``ray.rllib.env.policy_client.Commands`` before), numpy arrays
(numpy 2: ``numpy._core.numeric._frombuffer`` with an in-band buffer; numpy 1:
``numpy.core.multiarray._reconstruct`` + ``ndarray.__setstate__``), numpy scalars, dtypes, and
plain containers. Those exact names — never a whole module — resolve to stand-ins of our own:
the enum to ``Command``, a dtype to a record of its type code, an array to numbers checked
against its declared shape and read with ``np.frombuffer``. numpy's own reconstruction code
never sees a byte of the body, ``BUILD`` only reaches those stand-ins, ``NEWOBJ``/``INST``/
``OBJ`` are refused, container opcodes only fill real containers. The pure-Python unpickler is
used (its memo is a dict: an index in the body cannot allocate a memo table), over a body the
edge already bounded. Anything else is ``Unreadable`` -> 400, and nothing ran.
"""

from __future__ import annotations

import enum
import io
import math
import pickle
import struct
from typing import Any

import numpy as np

from service.errors import Unreadable

MAX_ELEMENTS = 1 << 26  # the most numbers one array of a message may declare
MAX_DEPTH = 32  # nesting of containers in a message


class Command(enum.Enum):
    """RLlib's command names (old and new stacks share them); a member is its own name."""

    ACTION_SPACE = "ACTION_SPACE"
    OBSERVATION_SPACE = "OBSERVATION_SPACE"
    GET_WORKER_ARGS = "GET_WORKER_ARGS"
    GET_WEIGHTS = "GET_WEIGHTS"
    REPORT_SAMPLES = "REPORT_SAMPLES"
    START_EPISODE = "START_EPISODE"
    GET_ACTION = "GET_ACTION"
    LOG_ACTION = "LOG_ACTION"
    LOG_RETURNS = "LOG_RETURNS"
    END_EPISODE = "END_EPISODE"


class _Refused(pickle.UnpicklingError):
    pass


class _CommandClass:
    """What RLlib's enum class resolves to: called with a member's value (Python <= 3.11
    pickles ``Enum(value)``) or given to ``getattr`` with its name (3.12+)."""

    def __call__(self, value: object) -> Command:
        if not isinstance(value, str) or value not in Command.__members__:
            raise _Refused(f"unknown RLlib command {str(value)[:32]!r}")
        return Command[value]


_COMMANDS = _CommandClass()


def _getattr(obj: object, name: object) -> Command:
    """``builtins.getattr``, for one use only: a member of RLlib's command enum."""
    if obj is not _COMMANDS:
        raise _Refused("getattr is read for RLlib's command enum only")
    return _COMMANDS(name)


# numpy's dtype pickle: dtype(code, align, copy) then BUILD (version, byte order, None, ...)
_CODES = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"}


class _DType:
    __slots__ = ("code", "order")

    def __init__(self, code: object, align: object = False, copy: object = True) -> None:
        if not isinstance(code, str) or code not in _CODES:
            raise _Refused(f"dtype {str(code)[:16]!r}: only plain numbers and booleans are read")
        self.code, self.order = code, "="

    def setstate(self, state: object) -> None:
        if not (
            isinstance(state, tuple)
            and len(state) >= 5
            and state[1] in ("<", ">", "|", "=")
            and state[2] is None  # no subarray
            and state[3] is None  # no fields
            and state[4] is None
        ):
            raise _Refused("a dtype with fields or subarrays is not read")
        self.order = state[1]

    def numpy(self) -> np.dtype:
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(self.order) if self.order in "<>" else dtype


def _as_dtype(dtype: object) -> np.dtype:
    if not isinstance(dtype, _DType):
        raise _Refused("an array's dtype must be a numpy dtype")
    return dtype.numpy()


def _shape(shape: object) -> tuple[int, ...]:
    if (
        not isinstance(shape, tuple)
        or len(shape) > 8
        or not all(type(d) is int and d >= 0 for d in shape)
        or math.prod(shape) > MAX_ELEMENTS
    ):
        raise _Refused(f"array shape {str(shape)[:64]}: at most 8 dimensions, {MAX_ELEMENTS} numbers")
    return shape


def _array(raw: object, dtype: np.dtype, shape: tuple[int, ...], order: str = "C") -> np.ndarray:
    if not isinstance(raw, bytes | bytearray):
        raise _Refused("an array's data must be bytes")
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise _Refused(f"an array of shape {list(shape)} {dtype} does not hold {len(raw)} bytes")
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order=order).copy()


def _frombuffer(buf: object, dtype: object, shape: object, order: object) -> np.ndarray:
    """numpy 2's (and 1.x's protocol-5) array pickle."""
    if order not in ("C", "F"):
        raise _Refused("an array's order must be 'C' or 'F'")
    return _array(buf, _as_dtype(dtype), _shape(shape), order)


class _NdarrayClass:
    """``numpy.ndarray`` as ``_reconstruct``'s first argument only: never callable."""


_NDARRAY = _NdarrayClass()


class _Pending:
    """numpy 1.x's array pickle: ``_reconstruct(ndarray, (0,), b'b')``, then BUILD with
    ``(version, shape, dtype, is_fortran, data)``."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def setstate(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and type(state[3]) is bool):
            raise _Refused("an array's state must be (version, shape, dtype, is_fortran, data)")
        _, shape, dtype, fortran, raw = state
        self.array = _array(raw, _as_dtype(dtype), _shape(shape), "F" if fortran else "C")


def _reconstruct(cls: object, shape: object, typecode: object) -> _Pending:
    if cls is not _NDARRAY or shape != (0,) or typecode != b"b":
        raise _Refused("_reconstruct is read for numpy's own array pickle only")
    return _Pending()


def _scalar(dtype: object, raw: object) -> Any:
    """A numpy scalar (``numpy._core.multiarray.scalar(dtype, bytes)``), as a Python number."""
    return _array(raw, _as_dtype(dtype), (1,))[0].item()


def _latin1(text: object, encoding: object = "utf-8") -> bytes:
    """``_codecs.encode(text, "latin1")``: how protocols 0-2 write bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode is read for protocol 2's bytes only")
    return text.encode("latin1")


def _bytes(*args: object) -> bytes:
    if args:
        raise _Refused("bytes() is read without arguments only (protocol 2's empty bytes)")
    return b""


ALLOWED: dict[tuple[str, str], object] = {
    ("ray.rllib.env.external.rllink", "RLlink"): _COMMANDS,  # ray >= 2.40
    ("ray.rllib.env.policy_client", "Commands"): _COMMANDS,  # older ray
    ("builtins", "getattr"): _getattr,
    ("numpy", "dtype"): _DType,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("_codecs", "encode"): _latin1,
    ("builtins", "bytes"): _bytes,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class _Unpickler(pickle._Unpickler):  # the pure-Python one, on purpose (see the module's doc)
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> object:
        found = ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"{module[:64]}.{name[:64]} is not read here")
        return found

    def persistent_load(self, pid: object) -> object:
        raise _Refused("persistent ids are not read here")

    def _build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, _DType | _Pending):
            raise _Refused(f"BUILD of a {type(inst).__name__} is not read here")
        inst.setstate(state)

    def _refuse(self) -> None:
        raise _Refused("object construction (NEWOBJ, INST, OBJ) is not read here")


def _containers() -> None:
    d = _Unpickler.dispatch

    def guard(opcode: bytes, kind: type, before_mark: bool) -> None:
        original = pickle._Unpickler.dispatch[opcode[0]]

        def load(self) -> None:
            # SETITEMS / APPENDS / ADDITEMS: the target sits below the mark, in metastack[-1]
            obj = (
                self.metastack[-1][-1] if before_mark else self.stack[-3 if opcode == pickle.SETITEM else -2]
            )
            if type(obj) is not kind:
                raise _Refused(f"{opcode!r} into a {type(obj).__name__} is not read here")
            original(self)

        d[opcode[0]] = load

    guard(pickle.SETITEM, dict, False)
    guard(pickle.SETITEMS, dict, True)
    guard(pickle.APPEND, list, False)
    guard(pickle.APPENDS, list, True)
    guard(pickle.ADDITEMS, set, True)
    d[pickle.BUILD[0]] = _Unpickler._build
    for op in (
        pickle.NEWOBJ,
        pickle.NEWOBJ_EX,
        pickle.INST,
        pickle.OBJ,
        pickle.EXT1,
        pickle.EXT2,
        pickle.EXT4,
    ):
        d[op[0]] = _Unpickler._refuse


_containers()


def _resolved(obj: Any, depth: int = 0) -> Any:
    """The message with numpy 1.x arrays in place of their stand-ins, checked to hold only
    plain values, arrays and commands."""
    if depth > MAX_DEPTH:
        raise _Refused(f"the message nests deeper than {MAX_DEPTH} levels")
    if isinstance(obj, _Pending):
        if obj.array is None:
            raise _Refused("an array without its state")
        return obj.array
    if isinstance(obj, dict):
        return {_resolved(k, depth + 1): _resolved(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return type(obj)(_resolved(v, depth + 1) for v in obj)
    if obj is None or isinstance(obj, bool | int | float | str | bytes | bytearray | np.ndarray | Command):
        return obj
    raise _Refused(f"a {type(obj).__name__} in the message is not read here")


def loads(body: bytes) -> dict[str, Any]:
    """The command dict of one request body; 400 ``Unreadable`` for anything else."""
    try:
        message = _resolved(_Unpickler(io.BytesIO(body)).load())
    except RecursionError:
        raise Unreadable("not a PolicyClient message: it nests too deeply") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
        MemoryError,
        struct.error,
    ) as exc:
        raise Unreadable(f"not a PolicyClient message: {str(exc)[:200]}") from None
    if not isinstance(message, dict) or not isinstance(message.get("command"), Command):
        raise Unreadable("not a PolicyClient message: a dict with a 'command' is expected")
    return message


def dumps(answer: dict[str, Any]) -> bytes:
    """An answer for the client's ``pickle.loads``: plain values and numpy arrays only."""
    return pickle.dumps(answer, protocol=4)
