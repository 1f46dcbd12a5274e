"""Observations that are tensors of any rank (images): decoded from the ``{b64, dtype, shape}``
raw-bytes form or from nested JSON lists, and checked against the spec before anything is
allocated for them."""

from __future__ import annotations

import binascii
import math
from dataclasses import dataclass

import numpy as np

from service.errors import InvalidInput
from service.registry.spec import ObservationSpec

NUMPY_DTYPES = {"uint8": np.dtype("uint8"), "float32": np.dtype("<f4")}


@dataclass(frozen=True, slots=True)
class EncodedArray:
    """The raw-bytes form of one array: base64 of its C-order little-endian buffer."""

    b64: str
    dtype: str
    shape: tuple[int, ...]


def decode(value: object, spec: ObservationSpec, where: str, policy: str) -> np.ndarray:
    """One observation as a numpy array of the spec's shape and dtype.

    Raw bytes are checked before decoding (shape and dtype against the spec, byte count against
    the shape), then viewed without a copy (``np.frombuffer``). Nested lists are converted with
    the spec's dtype; numbers outside a ``uint8``'s range are refused, not wrapped.

    Raises:
        InvalidInput: naming ``where`` and what was expected.
    """
    shape, dtype = tuple(spec.shape), NUMPY_DTYPES[spec.dtype]
    if isinstance(value, EncodedArray):
        if value.dtype != spec.dtype:
            raise InvalidInput(f"{where} has dtype {value.dtype}, policy {policy} expects {spec.dtype}")
        if value.shape != shape:
            raise InvalidInput(
                f"{where} has shape {list(value.shape)}, policy {policy} expects {list(shape)}"
            )
        need = math.prod(shape) * dtype.itemsize
        # base64: 4 characters per 3 bytes; a length that cannot hold `need` bytes is refused
        # before decoding anything
        if len(value.b64) != 4 * math.ceil(need / 3):
            raise InvalidInput(
                f"{where} holds {len(value.b64)} base64 characters; shape {list(shape)} of "
                f"{spec.dtype} is {need} bytes = {4 * math.ceil(need / 3)} characters"
            )
        try:
            raw = binascii.a2b_base64(value.b64, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"{where} is not valid base64: {exc}") from None
        if len(raw) != need:
            raise InvalidInput(f"{where} decodes to {len(raw)} bytes; shape {list(shape)} needs {need}")
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    elif isinstance(value, list):
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                as_float = np.asarray(value, dtype=np.float32)
        except ValueError:
            raise InvalidInput(
                f"{where} is not a regular array of numbers; policy {policy} expects shape {list(shape)}"
            ) from None
        if as_float.shape != shape:
            raise InvalidInput(
                f"{where} has shape {list(as_float.shape)}, policy {policy} expects {list(shape)}"
            )
        if spec.dtype == "uint8":
            if not (np.all(as_float == np.round(as_float)) and as_float.min() >= 0 and as_float.max() <= 255):
                raise InvalidInput(f"{where} holds values that are not integers in [0, 255] (uint8)")
            array = as_float.astype(np.uint8)
        else:
            array = as_float
    else:
        raise InvalidInput(
            f"{where} is a {type(value).__name__}; policy {policy} expects an array of shape {list(shape)} "
            f"({spec.dtype}): nested number lists or {{b64, dtype, shape}}"
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"{where} holds values that are not finite as float32")
    return array
