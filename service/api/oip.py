"""The Open Inference Protocol (KServe v2 / Triton) over REST, under ``/v2``: HTTP and framing
only — JSON tensors and Triton's binary tensor extension (``Inference-Header-Content-Length``)
in both directions — then ``serving/inference.InferService``. The body is read as bytes
whatever its content-type (tritonclient sends none). Infer itself is answered by ``answer``,
a hot route of the edge (``api/edge``); the metadata routes are FastAPI's. Errors are
``{"error": "sentence"}`` with the status ``/v1`` gives the same fault (``api/errors.STATUS``).
"""

from __future__ import annotations

import math

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from service.api.asgi import Route, dumps
from service.api.auth import check_inference
from service.api.errors import error_answer
from service.errors import InvalidInput, ServiceError
from service.runtime.tensors import NAMES, dtype_of, from_bytes, from_values
from service.schemas import OipInferRequest
from service.serving.inference import InferParams, InferService, options

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
JSON, BINARY = b"application/json", b"application/octet-stream"


def _json(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status, headers=headers, media_type="application/json")


def _error(exc: ServiceError) -> Response:
    status, body, headers = error_answer(exc)
    return _json({"error": body["detail"]}, status, headers)


def _service(request: Request) -> InferService:
    return request.app.state.infer_service


def _version(version: str | None) -> int | None:
    if version is None or version == "":
        return None
    if not version.isdecimal() or int(version) < 1:
        raise InvalidInput(f"model version {version[:32]!r} is not a positive integer")
    return int(version)


@router.get("/health/live")
async def live() -> Response:
    return _json({"live": True})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    ok = _service(request).ready()
    return _json({"ready": ok}, 200 if ok else 503)


@router.get("")
async def server_metadata(request: Request) -> Response:
    return _json(_service(request).server())


def _guarded(request: Request, answer) -> Response:
    """``answer()`` as JSON, behind the inference key; a domain error as ``{"error"}``."""
    try:
        check_inference(request.app.state.settings, request.headers.get("authorization"))
        return _json(answer())
    except ServiceError as exc:
        return _error(exc)


def _model_route(suffix: str, answer) -> None:
    """``GET /v2/models/{name}[/versions/{version}]<suffix>``: ``answer(service, name, version)``."""

    async def route(request: Request, name: str, version: str | None = None) -> Response:
        return _guarded(request, lambda: answer(_service(request), name, _version(version)))

    route.__name__ = "model" + (suffix.replace("/", "_") or "_metadata")
    router.get(f"/models/{{name}}{suffix}")(route)
    router.get(f"/models/{{name}}/versions/{{version}}{suffix}")(route)


_model_route("", InferService.model)  # metadata: versions, inputs, outputs
_model_route("/ready", InferService.model_ready)
_model_route("/config", InferService.config)  # Triton's model configuration (perf_analyzer)


async def answer(
    state, route: Route, body: bytes, authorization: bytes | None, header_length: bytes | None
) -> tuple[int, bytes, bytes, dict[str, str] | None]:
    """``(status, body, content type, headers)`` of ``POST /v2/models/{name}[/versions/{v}]/infer``:
    the edge's hot route (``api/edge``; FastAPI's routing would cost more than the call itself)."""
    try:
        check_inference(state.settings, authorization)
        length = None if header_length is None else header_length.decode("latin-1")
        params, binary_out, request_id = _parse(body, length, route.policy, _version(route.version))
        result = await state.infer_service.infer(params)
    except ServiceError as exc:
        status, detail, headers = error_answer(exc)
        return status, dumps({"error": detail["detail"]}), JSON, headers
    return _answer(result, binary_out, request_id)


DOCUMENTED = APIRouter(prefix="/v2", tags=["open inference protocol"])


@DOCUMENTED.post("/models/{name}/infer")
async def infer(name: str, body: OipInferRequest) -> None:
    """Infer with the default version (JSON tensors, or Triton's binary tensor extension with an
    ``Inference-Header-Content-Length`` header); answered by ``service.api.oip.answer``."""


@DOCUMENTED.post("/models/{name}/versions/{version}/infer")
async def infer_version(name: str, version: str, body: OipInferRequest) -> None:
    """Infer with one version; answered by ``service.api.oip.answer``."""


def _parse(
    body: bytes, header_length: str | None, name: str, version: int | None
) -> tuple[InferParams, set[str], str | None]:
    """The request's parameters and arrays, the outputs to send as binary, the request's id."""
    binary = memoryview(b"")
    if header_length is not None:
        if not header_length.isdecimal() or int(header_length) > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length[:32]!r} is not a length within the "
                f"body's {len(body)} bytes"
            )
        cut = int(header_length)
        body, binary = body[:cut], memoryview(body)[cut:]  # the tensors are read in place
    try:
        request = OipInferRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise InvalidInput(f"invalid inference request: {where}: {first.get('msg', '')}") from None
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for t in request.inputs:
        if t.name in tensors:
            raise InvalidInput(f"input {t.name!r} is given twice")
        size = (t.parameters or {}).get("binary_data_size")
        if size is not None:
            needed = math.prod(t.shape) * dtype_of(t.name, t.datatype).itemsize
            if type(size) is not int or size != needed:
                raise InvalidInput(
                    f"input {t.name!r}: binary_data_size {size!r} does not fit shape {t.shape} of "
                    f"{t.datatype} ({needed} bytes)"
                )
            if offset + size > len(binary):
                raise InvalidInput(f"input {t.name!r}: the body holds fewer binary bytes than announced")
            array = from_bytes(t.name, binary[offset : offset + size], t.datatype, t.shape)
            offset += size
        elif t.data is not None:
            array = from_values(t.name, t.data, t.datatype, t.shape)
        else:
            raise InvalidInput(f"input {t.name!r} has neither 'data' nor parameters.binary_data_size")
        tensors[t.name] = array
    if offset != len(binary):
        raise InvalidInput(f"the body has {len(binary) - offset} binary bytes that no input announced")
    p = request.parameters or {}
    explore, seed, sequence = options(p)
    wanted = None if request.outputs is None else [o.name for o in request.outputs]
    all_binary = bool(p.get("binary_data_output"))
    binary_out = {
        o.name for o in request.outputs or () if (o.parameters or {}).get("binary_data", all_binary)
    }
    if request.outputs is None and all_binary:
        binary_out = {"*"}
    params = InferParams(name, version, tensors, explore, seed, wanted, sequence)
    return params, binary_out, request.id


def _answer(
    answer: dict, binary_out: set[str], request_id: str | None
) -> tuple[int, bytes, bytes, dict[str, str] | None]:
    head: dict = {"model_name": answer["model_name"], "model_version": answer["model_version"]}
    if request_id is not None:
        head["id"] = request_id
    head["outputs"] = []
    blobs: list[bytes] = []
    for name, array in answer["outputs"].items():
        out = {"name": name, "datatype": NAMES[array.dtype], "shape": list(array.shape)}
        if "*" in binary_out or name in binary_out:
            raw = np.ascontiguousarray(array).tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            out["data"] = array.reshape(-1).tolist()
        head["outputs"].append(out)
    header = orjson.dumps(head)
    if not blobs:
        return 200, header, JSON, None
    return 200, header + b"".join(blobs), BINARY, {"Inference-Header-Content-Length": str(len(header))}
