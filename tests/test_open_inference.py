"""The Open Inference Protocol (KServe v2 / Triton REST) under /v2, driven by an unmodified
``tritonclient`` against a real uvicorn server: metadata, config, infer with JSON and binary
tensors, dict and image observations, masks, parameters, errors — the same answers as /v1."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import LiveServer

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer.serving(SHIPPED, tmp_path_factory.mktemp("oip"))
    yield live
    live.stop()


@pytest.fixture()
def triton(server):
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


def _input(name: str, array: np.ndarray, datatype: str, binary: bool = True):
    t = httpclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


def _v1(server, policy: str, body: dict) -> dict:
    r = httpx.post(f"{server.url}/v1/policies/{policy}/act", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_server_and_model_metadata_and_config(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "policy-server" and "binary_tensor_data" in meta["extensions"]
    model = triton.get_model_metadata("cartpole-dqn")
    assert model["versions"] == ["1"]
    assert model["inputs"][0] == {"name": "observation", "datatype": "FP32", "shape": [-1, 4]}
    assert [o["name"] for o in model["outputs"]] == ["action", "action_value", "chosen_action_value"]
    assert triton.is_model_ready("cartpole-dqn") and triton.is_model_ready("cartpole-lstm-dqn", "3")
    assert not triton.is_model_ready("no-such-policy")
    config = triton.get_model_config("cartpole-dqn")
    assert config["max_batch_size"] == 4096 and config["input"][0]["dims"] == [4]
    assert config["output"][0] == {
        "name": "action",
        "data_type": "TYPE_INT64",
        "dims": [1],
        "reshape": {"shape": []},
    }
    dict_model = triton.get_model_metadata("cartpole-dict-dqn")
    assert [i["name"] for i in dict_model["inputs"]] == ["cart", "pole", "action_mask"]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_answers_what_v1_act_answers(server, triton, binary):
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32) * 0.05
    outputs = [
        httpclient.InferRequestedOutput("action", binary_data=binary),
        httpclient.InferRequestedOutput("action_value", binary_data=binary),
    ]
    result = triton.infer("cartpole-dqn", [_input("observation", obs, "FP32", binary)], outputs=outputs)
    v1 = _v1(server, "cartpole-dqn", {"observations": obs.tolist(), "return_info": True})
    assert result.as_numpy("action").tolist() == v1["actions"]
    np.testing.assert_array_equal(
        result.as_numpy("action_value"), np.array([i["action_value"] for i in v1["info"]], np.float32)
    )
    assert result.as_numpy("chosen_action_value") is None  # not asked for
    assert result.get_response()["model_version"] == "1"


def test_dict_observations_masks_and_seeded_exploration(server, triton):
    cart = np.array([[0.01, 0.0], [0.2, -0.1]], np.float32)
    pole = np.array([[0.03, 0.0], [-0.05, 0.2]], np.float32)
    result = triton.infer("cartpole-dict-dqn", [_input("cart", cart, "FP32"), _input("pole", pole, "FP32")])
    rows = [{"cart": c, "pole": p} for c, p in zip(cart.tolist(), pole.tolist(), strict=True)]
    assert (
        result.as_numpy("action").tolist()
        == _v1(server, "cartpole-dict-dqn", {"observations": rows})["actions"]
    )

    states = np.array([3, 41, 328], np.int64)
    mask = np.zeros((3, 6), np.bool_)
    mask[:, 4] = mask[1, 2] = True
    masked = triton.infer(
        "taxi-dqn", [_input("observation", states, "INT64"), _input("action_mask", mask, "BOOL")]
    )
    assert all(mask[i, a] for i, a in enumerate(masked.as_numpy("action").tolist()))

    obs = np.zeros((16, 3), np.float32)
    params = {"exploration": "random", "seed": 7}
    draws = [
        triton.infer("pendulum-sac", [_input("observation", obs, "FP32")], parameters=params).as_numpy(
            "action"
        )
        for _ in range(2)
    ]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert len({round(float(a), 6) for a in draws[0].reshape(-1)}) > 1  # samples, not the mean
    deterministic = triton.infer("pendulum-sac", [_input("observation", obs, "FP32")])
    assert not np.array_equal(deterministic.as_numpy("action"), draws[0])


def test_image_frames_go_as_raw_binary_tensors(server, triton):
    """A pixel policy reads uint8 400x600x3 frames as binary tensors (no base64): the same
    Q-values as /v1 with base64 frames."""
    frames = np.random.default_rng(1).integers(0, 256, size=(2, 400, 600, 3), dtype=np.uint8)
    result = triton.infer("cartpole-pixels-dqn", [_input("observation", frames, "UINT8")])
    b64 = [
        {"b64": base64.b64encode(f.tobytes()).decode(), "dtype": "uint8", "shape": [400, 600, 3]}
        for f in frames
    ]
    v1 = _v1(server, "cartpole-pixels-dqn", {"observations": b64, "return_info": True})
    assert result.as_numpy("action").tolist() == v1["actions"]
    np.testing.assert_allclose(
        result.as_numpy("action_value"), np.array([i["action_value"] for i in v1["info"]]), rtol=1e-6
    )


def test_bad_requests_are_refused_with_the_v1_status_and_an_error_sentence(server, triton):
    cases = [
        (
            dict(inputs=[_input("observation", np.zeros((1, 3), np.float32), "FP32")]),
            "422",
            "expects ['B', 4]",
        ),
        (dict(inputs=[_input("observation", np.zeros((1, 4), np.float64), "FP64")]), "422", "takes FP32"),
        (dict(inputs=[_input("obs", np.zeros((1, 4), np.float32), "FP32")]), "422", "not one of"),
        (
            dict(inputs=[_input("observation", np.full((1, 4), np.inf, np.float32), "FP32")]),
            "422",
            "not finite",
        ),
        (
            dict(
                inputs=[
                    _input("observation", np.zeros((1, 4), np.float32), "FP32"),
                    _input("action_mask", np.zeros((1, 2), np.bool_), "BOOL"),
                ]
            ),
            "422",
            "allows no action",
        ),
        (  # a sequence that was never opened
            dict(inputs=[_input("observation", np.zeros((1, 4), np.float32), "FP32")], sequence_id=5),
            "404",
            "sequence_start",
        ),
        (
            dict(
                inputs=[_input("observation", np.zeros((1, 4), np.float32), "FP32")],
                parameters={"epsilon": 3},
            ),
            "422",
            "epsilon",
        ),
    ]
    for kwargs, status, expected in cases:
        with pytest.raises(InferenceServerException) as refused:
            triton.infer("cartpole-dqn", **kwargs)
        assert refused.value.status() == status and expected in refused.value.message(), (
            kwargs,
            refused.value,
        )
    with pytest.raises(InferenceServerException) as unknown:
        triton.infer("no-such-policy", [_input("observation", np.zeros((1, 4), np.float32), "FP32")])
    assert unknown.value.status() == "404"
    # framing that does not add up: a header length past the body, binary bytes nobody announced
    head = json.dumps(
        {"inputs": [{"name": "observation", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]}
    )
    for body, length in ((head.encode(), str(len(head) + 10)), (head.encode() + b"\0" * 8, str(len(head)))):
        r = httpx.post(
            f"{server.url}/v2/models/cartpole-dqn/infer",
            content=body,
            headers={"Inference-Header-Content-Length": length},
        )
        assert r.status_code == 422 and "error" in r.json(), r.text
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # still serving


def test_v2_sits_behind_the_inference_key_and_is_counted_in_metrics(settings):
    from fastapi.testclient import TestClient

    from service.main import create_app

    settings.api_key, settings.protect_inference = "k", True
    body = {"inputs": [{"name": "observation", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]}
    with TestClient(create_app(settings)) as c:
        for r in (c.post("/v2/models/q/infer", json=body), c.get("/v2/models/q")):
            assert r.status_code == 401 and "Bearer" in r.json()["error"]
        r = c.post("/v2/models/q/infer", json=body, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and r.json()["outputs"][0]["name"] == "action"
        assert c.get("/v2/health/live").json() == {"live": True}  # health stays open, as /healthz
        assert 'route="/v2/models/{name}/infer"' in c.get("/metrics").text


def test_sequences_step_sessions_as_v1_sessions_do(server, triton):
    """``sequence_start`` opens a session, each infer of the sequence steps it (the LSTM state
    kept by the server), ``sequence_end`` closes it: two interleaved sequences answer what two
    /v1 sessions stepping the same observations answer, and never see each other's state."""
    rng = np.random.default_rng(2)
    streams = {7: rng.normal(size=(10, 2)).astype(np.float32) * 0.05, "run-b": np.zeros((10, 2), np.float32)}
    got: dict = {k: [] for k in streams}
    for t in range(10):
        for seq, obs in streams.items():
            r = triton.infer(
                "cartpole-lstm-dqn",
                [_input("observation", obs[t : t + 1], "FP32")],
                sequence_id=seq,
                sequence_start=t == 0,
                sequence_end=t == 9,
            )
            got[seq].append(r.as_numpy("action_value")[0])
    for seq, obs in streams.items():
        sid = httpx.post(f"{server.url}/v1/sessions", json={"policy": "cartpole-lstm-dqn"}).json()[
            "session_id"
        ]
        for t in range(10):
            r = httpx.post(
                f"{server.url}/v1/sessions/{sid}/act",
                json={"observation": obs[t].tolist(), "return_info": True},
            ).json()
            np.testing.assert_allclose(got[seq][t], r["info"]["action_value"], rtol=1e-5, atol=1e-6)
    alone = triton.infer("cartpole-lstm-dqn", [_input("observation", streams[7][5:6], "FP32")])
    assert not np.allclose(alone.as_numpy("action_value")[0], got[7][5])  # the state mattered
    for kwargs in ({"sequence_id": 7}, {"sequence_id": "never-started"}):  # closed at its end / never opened
        with pytest.raises(InferenceServerException) as closed:
            triton.infer("cartpole-lstm-dqn", [_input("observation", streams[7][:1], "FP32")], **kwargs)
        assert closed.value.status() == "404" and "sequence_start" in closed.value.message()
    config = triton.get_model_config("cartpole-lstm-dqn")
    assert config["sequence_batching"]["max_sequence_idle_microseconds"] > 0


def test_a_version_of_unicode_digits_is_refused_not_a_crash(server):
    """``"¹".isdigit()`` is true but ``int("¹")`` raises: such a version once answered 500."""
    for version in ("%C2%B9", "%E2%91%A0", "0"):
        r = httpx.get(f"{server.url}/v2/models/cartpole-dqn/versions/{version}/ready", timeout=30)
        assert r.status_code in (400, 404, 422), (version, r.status_code, r.text)
        q = httpx.get(f"{server.url}/v2/models/cartpole-dqn/ready?version={version}", timeout=30)
        assert 400 <= q.status_code < 500, (version, q.status_code, q.text)
