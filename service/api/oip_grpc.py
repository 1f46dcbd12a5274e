"""The Open Inference Protocol over gRPC: Triton's ``inference.GRPCInferenceService`` on its own
port (``POLICY_SERVER_GRPC_PORT``), in the app's event loop. Framing only — protobuf messages
<-> the arrays and parameters ``serving/inference.InferService`` takes, as ``api/oip`` does for
REST — with the same inference key (``authorization`` metadata), limits (the body limit is the
largest message), request timeout and metrics. Outputs go in ``raw_output_contents``.
``ModelStreamInfer`` answers a stream's requests in order: the way to step a sequence.

The messages and the servicer base are the code Triton generates from its
``grpc_service.proto``, as ``tritonclient[grpc]`` ships it; this module is the one that imports
them (no protoc step of ours, and one set of descriptors when a client runs in-process).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from service.api.auth import check_inference
from service.api.errors import status_of
from service.config import Settings
from service.errors import InvalidInput, NotFound, ServiceError, TimedOut
from service.observability import Metrics
from service.runtime.tensors import NAMES, from_bytes, from_values
from service.serving.inference import InferParams, InferService, options

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
UNKNOWN = "other"  # the metrics label of a model name that is not a policy (bounded labels)

# the HTTP status /v1 gives a fault -> the gRPC code Triton gives it
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# the typed ``InferTensorContents`` field of each datatype (FP16 has none: raw bytes only)
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _version(version: str) -> int | None:
    if version == "":
        return None
    if not version.isdecimal() or int(version) < 1:
        raise InvalidInput(f"model version {version[:32]!r} is not a positive integer")
    return int(version)


def _parameters(message_parameters) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as plain values (what REST's JSON gives)."""
    out = {}
    for key, value in message_parameters.items():
        kind = value.WhichOneof("parameter_choice")
        out[key] = None if kind is None else getattr(value, kind)
    return out


def infer_params(request: service_pb2.ModelInferRequest) -> InferParams:
    """The arrays and parameters of one ``ModelInferRequest``."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs: "
            "send one per input"
        )
    if len(request.inputs) > 40:
        raise InvalidInput(f"the request has {len(request.inputs)} inputs; at most 40 are accepted")
    tensors: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        name, shape = t.name, list(t.shape)
        if name in tensors:
            raise InvalidInput(f"input {name[:64]!r} is given twice")
        if not 1 <= len(shape) <= 8 or any(d < 0 for d in shape):
            raise InvalidInput(f"input {name[:64]!r} has shape {shape[:9]}: 1 to 8 dimensions of sizes >= 0")
        if raw:
            tensors[name] = from_bytes(name, raw[i], t.datatype, shape)
            continue
        field = CONTENTS.get(t.datatype)
        if field is None:
            raise InvalidInput(
                f"input {name[:64]!r} of datatype {t.datatype[:16]!r} must come in raw_input_contents"
            )
        tensors[name] = from_values(name, list(getattr(t.contents, field)), t.datatype, shape)
    explore, seed, sequence = options(_parameters(request.parameters))
    wanted = [o.name for o in request.outputs] or None
    return InferParams(
        request.model_name, _version(request.model_version), tensors, explore, seed, wanted, sequence
    )


def infer_response(answer: dict[str, Any], request_id: str) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(
        model_name=answer["model_name"], model_version=answer["model_version"], id=request_id
    )
    for name, array in answer["outputs"].items():
        response.outputs.add(name=name, datatype=NAMES[array.dtype], shape=list(array.shape))
        response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return response


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The protocol's health, metadata, config and infer methods; the repository, statistics,
    shared-memory, trace and log methods stay UNIMPLEMENTED (the generated base's answer)."""

    def __init__(self, service: InferService, settings: Settings, metrics: Metrics) -> None:
        self.service = service
        self.settings = settings
        self.metrics = metrics

    # health and metadata -------------------------------------------------------------------

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.service.ready())

    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(**self.service.server())

    async def ModelReady(self, request, context):
        async def answer():
            try:
                self.service.model_ready(request.name, _version(request.version))
            except NotFound:
                return service_pb2.ModelReadyResponse(ready=False)
            return service_pb2.ModelReadyResponse(ready=True)

        return await self._call("ModelReady", request.name, context, answer)

    async def ModelMetadata(self, request, context):
        async def answer():
            meta = self.service.model(request.name, _version(request.version))
            response = service_pb2.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"]
            )
            for t in meta["inputs"]:
                response.inputs.add(**t)
            for t in meta["outputs"]:
                response.outputs.add(**t)
            return response

        return await self._call("ModelMetadata", request.name, context, answer)

    async def ModelConfig(self, request, context):
        async def answer():
            config = self.service.config(request.name, _version(request.version))
            return service_pb2.ModelConfigResponse(
                config=json_format.ParseDict(config, model_config_pb2.ModelConfig())
            )

        return await self._call("ModelConfig", request.name, context, answer)

    # infer -----------------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        async def answer():
            return infer_response(await self.service.infer(infer_params(request)), request.id)

        return await self._call("ModelInfer", request.model_name, context, answer)

    async def ModelStreamInfer(
        self, request_iterator, context
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """Each request's answer in order; a failed one is an ``error_message`` and the stream
        goes on (Triton's behaviour). The key is checked once, when the stream opens."""
        try:
            self._authorize(context)
        except ServiceError as exc:
            await context.abort(CODES.get(status_of(exc), grpc.StatusCode.INVALID_ARGUMENT), exc.detail)
        route = f"/{SERVICE}/ModelStreamInfer"
        async for request in request_iterator:
            start, status = time.perf_counter(), 500
            try:
                async with asyncio.timeout(self.settings.request_timeout_s):
                    answer = await self.service.infer(infer_params(request))
                status = 200
                yield service_pb2.ModelStreamInferResponse(infer_response=infer_response(answer, request.id))
            except TimeoutError:
                status = 504
                yield service_pb2.ModelStreamInferResponse(error_message=self._timeout_detail())
            except ServiceError as exc:
                status = status_of(exc)
                yield service_pb2.ModelStreamInferResponse(error_message=exc.detail)
            except Exception:
                log.exception("stream infer failed")
                yield service_pb2.ModelStreamInferResponse(error_message="internal error")
            finally:
                self._observe(route, status, request.model_name, time.perf_counter() - start)

    # the per-call work of every unary method --------------------------------------------------

    async def _call(self, method: str, model: str, context, answer):
        """``await answer()`` behind the inference key, within the request timeout, measured;
        a domain error as the status code Triton gives it."""
        start, status = time.perf_counter(), 500
        try:
            self._authorize(context)
            async with asyncio.timeout(self.settings.request_timeout_s):
                response = await answer()
            status = 200
            return response
        except TimeoutError:
            status = 504
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, self._timeout_detail())
        except ServiceError as exc:
            status = status_of(exc)
            await context.abort(CODES.get(status, grpc.StatusCode.INVALID_ARGUMENT), exc.detail)
        except Exception:
            log.exception("gRPC %s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            self._observe(f"/{SERVICE}/{method}", status, model, time.perf_counter() - start)

    def _authorize(self, context) -> None:
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value
        check_inference(self.settings, authorization)

    def _timeout_detail(self) -> str:
        return TimedOut(f"the request took longer than {self.settings.request_timeout_s:g} s").detail

    def _observe(self, route: str, status: int, model: str, seconds: float) -> None:
        policy = model if not model or self.metrics.known_policy(model) else UNKNOWN
        self.metrics.observe_request(route, "GRPC", status, policy, seconds)


class GrpcServer:
    """The gRPC server of one process: started and stopped by the app's lifespan."""

    def __init__(
        self, service: InferService, settings: Settings, metrics: Metrics, shared_port: bool
    ) -> None:
        limit = settings.max_body_bytes
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", max(limit, 64 * 1024 * 1024)),
                # ``serve --workers N``: every process binds the port and the kernel spreads the
                # connections; one process alone must fail on a port that is taken
                ("grpc.so_reuseport", 1 if shared_port else 0),
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(service, settings, metrics), self.server
        )
        self.address = f"{settings.grpc_host}:{settings.grpc_port}"

    async def start(self) -> None:
        self.server.add_insecure_port(self.address)  # raises when the port cannot be bound
        await self.server.start()
        log.info("gRPC inference service on %s", self.address)

    async def stop(self, grace_s: float = 5.0) -> None:
        """No new calls; the calls in flight get ``grace_s`` to finish."""
        await self.server.stop(grace_s)
