"""The Open Inference Protocol over gRPC (Triton's ``inference.GRPCInferenceService``), driven
by an unmodified ``tritonclient.grpc`` against a real ``policy-server serve`` with its gRPC port
on: metadata and config, infer with raw and typed tensors, sequences over ``ModelStreamInfer``
stepping what /v1 sessions step, errors with Triton's status codes, the inference key, metrics
and a clean shutdown."""

from __future__ import annotations

import queue
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import LiveServer, free_port

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "models"
KEY = {"authorization": "Bearer grpc-key"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    live = LiveServer.serving(
        SHIPPED,
        tmp_path_factory.mktemp("oip-grpc"),
        grpc_port=str(port),
        grpc_host="127.0.0.1",
        api_key="grpc-key",
        protect_inference="true",
    )
    live.grpc = f"127.0.0.1:{port}"
    yield live
    live.stop()


@pytest.fixture()
def triton(server):
    client = grpcclient.InferenceServerClient(url=server.grpc)
    yield client
    client.close()


def _input(name: str, array: np.ndarray, datatype: str):
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def _post(server, path: str, body: dict) -> dict:
    r = httpx.post(f"{server.url}{path}", json=body, headers=KEY, timeout=30)
    assert r.is_success, r.text
    return r.json()


def test_metadata_and_config_as_over_rest(server, triton):
    assert triton.is_server_live(headers=KEY) and triton.is_server_ready(headers=KEY)
    meta = triton.get_server_metadata(headers=KEY, as_json=True)
    assert meta["name"] == "policy-server" and "sequence" in meta["extensions"]
    model = triton.get_model_metadata("cartpole-dqn", headers=KEY, as_json=True)
    rest = httpx.get(f"{server.url}/v2/models/cartpole-dqn", headers=KEY).json()
    assert model["versions"] == rest["versions"] == ["1"]
    assert model["inputs"][0] == {"name": "observation", "datatype": "FP32", "shape": ["-1", "4"]}
    assert [o["name"] for o in model["outputs"]] == [o["name"] for o in rest["outputs"]]
    assert triton.is_model_ready("cartpole-lstm-dqn", "3", headers=KEY)
    assert not triton.is_model_ready("no-such-policy", headers=KEY)
    config = triton.get_model_config("cartpole-lstm-dqn", headers=KEY, as_json=True)["config"]
    assert config["max_batch_size"] == 4096 and config["input"][0]["dims"] == ["2"]
    assert int(config["sequence_batching"]["max_sequence_idle_microseconds"]) > 0
    plain = triton.get_model_config("cartpole-dqn", headers=KEY, as_json=True)["config"]
    assert "sequence_batching" not in plain


def test_infer_with_raw_and_typed_tensors_answers_what_v1_act_answers(server, triton):
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32) * 0.05
    outputs = [grpcclient.InferRequestedOutput("action"), grpcclient.InferRequestedOutput("action_value")]
    result = triton.infer(
        "cartpole-dqn", [_input("observation", obs, "FP32")], outputs=outputs, request_id="r-1", headers=KEY
    )
    v1 = _post(server, "/v1/policies/cartpole-dqn/act", {"observations": obs.tolist(), "return_info": True})
    assert result.as_numpy("action").tolist() == v1["actions"]
    np.testing.assert_array_equal(
        result.as_numpy("action_value"), np.array([i["action_value"] for i in v1["info"]], np.float32)
    )
    assert result.as_numpy("chosen_action_value") is None  # not asked for
    response = result.get_response()
    assert response.id == "r-1" and response.model_version == "1" and len(response.raw_output_contents) == 2

    # the same rows as typed ``contents`` (what a client without the raw form sends), masked
    import grpc

    request = service_pb2.ModelInferRequest(model_name="taxi-dqn")
    states = request.inputs.add(name="observation", datatype="INT64", shape=[3])
    states.contents.int64_contents.extend([3, 41, 328])
    mask = request.inputs.add(name="action_mask", datatype="BOOL", shape=[3, 6])
    allowed = np.zeros((3, 6), bool)
    allowed[:, 4] = allowed[1, 2] = True
    mask.contents.bool_contents.extend(allowed.reshape(-1).tolist())
    with grpc.insecure_channel(server.grpc) as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=tuple(KEY.items())
        )
    actions = np.frombuffer(answer.raw_output_contents[0], np.int64)
    assert all(allowed[i, a] for i, a in enumerate(actions.tolist()))
    v1 = _post(
        server,
        "/v1/policies/taxi-dqn/act",
        {"observations": [3, 41, 328], "action_masks": allowed.tolist()},
    )
    assert actions.tolist() == v1["actions"]

    draws = [
        triton.infer(
            "pendulum-sac",
            [_input("observation", np.zeros((16, 3), np.float32), "FP32")],
            parameters={"exploration": "random", "seed": 7},
            headers=KEY,
        ).as_numpy("action")
        for _ in range(2)
    ]
    np.testing.assert_array_equal(draws[0], draws[1])  # seeded samples reproduce
    assert len({round(float(a), 6) for a in draws[0].reshape(-1)}) > 1


def test_a_stream_steps_sequences_as_v1_sessions_do(server, triton):
    """Two interleaved sequences over one ``ModelStreamInfer`` stream answer what two /v1
    sessions stepping the same observations answer; a step of a sequence never opened is an
    error on the stream, which goes on."""
    answers: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)), headers=KEY)
    rng = np.random.default_rng(2)
    streams = {7: rng.normal(size=(8, 2)).astype(np.float32) * 0.05, "run-b": np.zeros((8, 2), np.float32)}
    got: dict = {k: [] for k in streams}
    try:
        for t in range(8):
            for seq, obs in streams.items():
                triton.async_stream_infer(
                    "cartpole-lstm-dqn",
                    [_input("observation", obs[t : t + 1], "FP32")],
                    sequence_id=seq,
                    sequence_start=t == 0,
                    sequence_end=t == 7,
                )
                result, error = answers.get(timeout=30)
                assert error is None, error
                got[seq].append(result.as_numpy("action_value")[0])
        triton.async_stream_infer(
            "cartpole-lstm-dqn", [_input("observation", streams[7][:1], "FP32")], sequence_id=7
        )  # closed at its end
        result, error = answers.get(timeout=30)
        assert result is None and "sequence_start" in error.message()
        zeros = np.zeros((1, 4), np.float32)
        triton.async_stream_infer("cartpole-dqn", [_input("observation", zeros, "FP32")])
        result, error = answers.get(timeout=30)
        assert error is None and result.as_numpy("action").shape == (1,)  # the stream went on
    finally:
        triton.stop_stream()
    for seq, obs in streams.items():
        sid = _post(server, "/v1/sessions", {"policy": "cartpole-lstm-dqn"})["session_id"]
        for t in range(8):
            step = {"observation": obs[t].tolist(), "return_info": True}
            r = _post(server, f"/v1/sessions/{sid}/act", step)
            np.testing.assert_allclose(got[seq][t], r["info"]["action_value"], rtol=1e-5, atol=1e-6)


def test_errors_carry_triton_status_codes_and_the_v1_sentence(server, triton):
    obs = np.zeros((1, 4), np.float32)
    three = np.zeros((1, 3), np.float32)
    cases = [
        ("cartpole-dqn", [_input("observation", three, "FP32")], {}, "INVALID_ARGUMENT", "expects ['B', 4]"),
        (
            "cartpole-dqn",
            [_input("observation", obs, "FP32")],
            {"parameters": {"epsilon": 3}},
            "INVALID_ARGUMENT",
            "epsilon",
        ),
        ("cartpole-dqn", [_input("obs", obs, "FP32")], {}, "INVALID_ARGUMENT", "not one of"),
        ("no-such-policy", [_input("observation", obs, "FP32")], {}, "NOT_FOUND", "no-such-policy"),
        ("cartpole-dqn", [_input("observation", obs, "FP32")], {"model_version": "9"}, "NOT_FOUND", "9"),
    ]
    for model, inputs, kwargs, code, expected in cases:
        with pytest.raises(InferenceServerException) as refused:
            triton.infer(model, inputs, headers=KEY, **kwargs)
        assert refused.value.status() == f"StatusCode.{code}" and expected in refused.value.message(), (
            model,
            kwargs,
            refused.value,
        )
    # raw contents that do not match the announced shape
    bad = _input("observation", obs, "FP32")
    bad._raw_content = b"\0" * 12
    with pytest.raises(InferenceServerException) as short:
        triton.infer("cartpole-dqn", [bad], headers=KEY)
    assert "12 bytes do not fit shape [1, 4]" in short.value.message()
    assert triton.is_server_ready(headers=KEY)  # still serving


def test_the_inference_key_guards_grpc_and_calls_are_counted(server, triton):
    with pytest.raises(InferenceServerException) as missing:
        triton.infer("cartpole-dqn", [_input("observation", np.zeros((1, 4), np.float32), "FP32")])
    assert missing.value.status() == "StatusCode.UNAUTHENTICATED" and "Bearer" in missing.value.message()
    with pytest.raises(InferenceServerException) as wrong:
        triton.get_model_metadata("cartpole-dqn", headers={"authorization": "Bearer nope"})
    assert wrong.value.status() == "StatusCode.PERMISSION_DENIED"
    answers: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))  # no key
    try:
        try:
            triton.async_stream_infer(
                "cartpole-dqn", [_input("observation", np.zeros((1, 4), np.float32), "FP32")]
            )
        except InferenceServerException:
            pass  # the refusal came first: the stream is closed, its error went to the callback
        result, error = answers.get(timeout=30)
        assert result is None and "Bearer" in error.message()
    finally:
        triton.stop_stream()
    triton.infer("cartpole-dqn", [_input("observation", np.zeros((1, 4), np.float32), "FP32")], headers=KEY)
    metrics = httpx.get(f"{server.url}/metrics").text
    line = next(
        line
        for line in metrics.splitlines()
        if 'route="/inference.GRPCInferenceService/ModelInfer"' in line
        and 'status="200"' in line
        and line.startswith("policy_server_requests_total")
    )
    assert 'policy="cartpole-dqn"' in line and 'method="GRPC"' in line and float(line.rsplit(" ", 1)[1]) >= 1
    assert any(
        "GRPCInferenceService/ModelInfer" in line and 'status="401"' in line for line in metrics.splitlines()
    )


def test_serve_stops_cleanly_with_the_grpc_service_on(tmp_path):
    port = free_port()
    live = LiveServer.serving(SHIPPED, tmp_path, grpc_port=str(port), grpc_host="127.0.0.1")
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    assert client.is_server_live()
    live.proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal once its shutdown (the lifespan's, the gRPC server's stop
    # included) is done
    assert live.proc.wait(30) in (0, -signal.SIGTERM)
    live.stop()
    log = (tmp_path / f"server-{live.port}.log").read_text()
    assert "Traceback" not in log, log
    with pytest.raises(InferenceServerException):
        client.is_server_live(client_timeout=2)
    client.close()
