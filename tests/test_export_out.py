"""``GET /v1/policies/{name}/versions/{v}/export?format=onnx|pt2``: every shipped policy as a file
that onnxruntime and ``torch.export.load`` run without the server, answering the actions the
server answers (preprocessing, one-hot and dict inputs inside; the LSTM stepped over a sequence
with its state carried = a session), downloaded through the SDK's ``PolicyClient.download``."""

from __future__ import annotations

import io
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.test_open_inference import SHIPPED

FLAT = {  # policy -> a batch of observations in its /v1 form
    "cartpole-dqn": np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32) * 0.1,
    "taxi-dqn": np.array([3, 41, 328, 77, 120, 499]),
    "pendulum-sac": np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32),
    "pendulum-td3": np.random.default_rng(2).normal(size=(6, 3)).astype(np.float32),
}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(SHIPPED, root / "models")
    settings = Settings(
        model_dir=root / "models", data_dir=root / "var", registry_poll_s=0, embedded_worker=False
    )
    with TestClient(create_app(settings)) as c:
        yield c


def _file(client, name: str, fmt: str) -> bytes:
    version = client.get(f"/v1/policies/{name}").json()["default_version"]
    r = client.get(f"/v1/policies/{name}/versions/{version}/export", params={"format": fmt})
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"] == f'attachment; filename="{name}-v{version}.{fmt}"'
    return r.content


class Runner:
    """One exported file, run as its runtime runs it: ``run({input: array}) -> [outputs]``."""

    def __init__(self, content: bytes, fmt: str) -> None:
        self.fmt = fmt
        if fmt == "onnx":
            self.session = ort.InferenceSession(content)
            self.inputs = [i.name for i in self.session.get_inputs()]
        else:
            self.module = torch.export.load(io.BytesIO(content)).module()

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        if self.fmt == "onnx":
            return self.session.run(None, {k: feeds[k] for k in self.inputs})
        with torch.no_grad():
            return [t.numpy() for t in self.module(*(torch.from_numpy(feeds[n]) for n in names))]


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_stateless_policies_answer_what_the_server_answers(shipped, fmt):
    for name, obs in FLAT.items():
        runner = Runner(_file(shipped, name, fmt), fmt)
        server = shipped.post(f"/v1/policies/{name}/act", json={"observations": obs.tolist()}).json()[
            "actions"
        ]
        feeds = {"observation": obs}
        names = ["observation"]
        if name.endswith("dqn"):
            n = len(
                shipped.post(
                    f"/v1/policies/{name}/act", json={"observation": obs[0].tolist(), "return_info": True}
                ).json()["info"]["action_value"]
            )
            feeds["action_mask"] = np.ones((len(obs), n), bool)
            names.append("action_mask")
        got = runner.run(feeds, names)[0]
        if name.startswith("pendulum"):
            np.testing.assert_allclose(got, np.array(server, np.float32), rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            assert got.tolist() == server, name
    # a dict observation's entries as inputs of their own, a mask that forbids the greedy action
    runner = Runner(_file(shipped, "cartpole-dict-dqn", fmt), fmt)
    cart = np.array([[0.01, 0.0], [0.2, -0.1]], np.float32)
    pole = np.array([[0.03, 0.0], [-0.05, 0.2]], np.float32)
    rows = [{"cart": c, "pole": p} for c, p in zip(cart.tolist(), pole.tolist(), strict=True)]
    server = shipped.post("/v1/policies/cartpole-dict-dqn/act", json={"observations": rows}).json()["actions"]
    feeds = {"cart": cart, "pole": pole, "action_mask": np.ones((2, 2), bool)}
    assert runner.run(feeds, ["cart", "pole", "action_mask"])[0].tolist() == server
    masked = np.ones((2, 2), bool)
    masked[np.arange(2), server] = False
    feeds["action_mask"] = masked
    assert runner.run(feeds, ["cart", "pole", "action_mask"])[0].tolist() == [1 - a for a in server]


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("name", ["cartpole-lstm-dqn", "cartpole-pixels-dqn"])
def test_a_recurrent_policy_carries_its_state_as_a_session_does(shipped, fmt, name):
    """Steps of one episode (two envs), the state fed back each step, = a session's actions
    and Q-values; pixels as raw uint8 frames, the preprocessing inside the file."""
    runner = Runner(_file(shipped, name, fmt), fmt)
    rng = np.random.default_rng(3)
    if name == "cartpole-pixels-dqn":
        frames = [rng.integers(0, 256, size=(2, 400, 600, 3), dtype=np.uint8) for _ in range(3)]
    else:
        frames = [rng.normal(size=(2, 2)).astype(np.float32) * 0.05 for _ in range(6)]
    sid = shipped.post("/v1/sessions", json={"policy": name, "num_envs": 2}).json()["session_id"]
    layers_hidden = None
    h = c = None
    names = ["observation", "action_mask", "recurrent_state_h", "recurrent_state_c", "is_init"]
    for t, obs in enumerate(frames):
        if name == "cartpole-pixels-dqn":
            import base64

            rows = [
                {"b64": base64.b64encode(f.tobytes()).decode(), "dtype": "uint8", "shape": [400, 600, 3]}
                for f in obs
            ]
        else:
            rows = obs.tolist()
        answer = shipped.post(
            f"/v1/sessions/{sid}/act", json={"observations": rows, "return_info": True}
        ).json()
        if h is None:
            layers_hidden = (1, 128)
            h = c = np.zeros((2, *layers_hidden), np.float32)
        feeds = {
            "observation": obs,
            "action_mask": np.ones((2, 2), bool),
            "recurrent_state_h": h,
            "recurrent_state_c": c,
            "is_init": np.full(2, t == 0),
        }
        action, values, h, c = runner.run(feeds, names)
        assert action.tolist() == answer["actions"], (t, action, answer["actions"])
        np.testing.assert_allclose(values, [i["action_value"] for i in answer["info"]], rtol=1e-4, atol=1e-4)
    assert np.abs(h).sum() > 0  # the state moved


def test_export_is_for_admins_and_says_what_it_takes(shipped, tmp_path):
    assert shipped.get("/v1/policies/cartpole-dqn/versions/1/export?format=tflite").status_code == 422
    assert shipped.get("/v1/policies/cartpole-dqn/versions/99/export").status_code == 404
    app = shipped.app
    app.state.settings.api_key = "k"
    try:
        assert shipped.get("/v1/policies/cartpole-dqn/versions/1/export").status_code == 401
    finally:
        app.state.settings.api_key = None


def test_the_sdk_downloads_a_version(tmp_path):
    from service.sdk import PolicyClient
    from tests.helpers import LiveServer

    live = LiveServer.serving(SHIPPED, tmp_path)
    try:
        with PolicyClient(live.url) as client:
            path = client.download("cartpole-dqn", 1, "onnx", tmp_path / "policy.onnx")
        session = ort.InferenceSession(path.read_bytes())
        obs = FLAT["cartpole-dqn"]
        got = session.run(["action"], {"observation": obs, "action_mask": np.ones((6, 2), bool)})[0]
        with PolicyClient(live.url) as client:
            assert got.tolist() == client.act_batch("cartpole-dqn", obs.tolist()).actions
    finally:
        live.stop()


def test_a_frame_stack_is_an_explicit_history(client):
    """``cat_frames``'s history is the file's ``frame_history`` input and output: fed back each
    step, the answers are a session's (which keeps the same history server-side)."""
    import base64

    from tests.helpers import new_session, random_weights, upload
    from tests.test_pixels import PIX_CAT

    assert upload(client, "pix-cat", PIX_CAT, random_weights(PIX_CAT)).status_code == 201
    r = client.get("/v1/policies/pix-cat/versions/1/export", params={"format": "onnx"})
    session = ort.InferenceSession(r.content)
    assert [i.name for i in session.get_inputs()] == [
        "observation",
        "action_mask",
        "frame_history",
        "is_init",
    ]
    assert [o.name for o in session.get_outputs()] == ["action", "action_value", "next_frame_history"]
    sid = new_session(client, "pix-cat")
    rng = np.random.default_rng(4)
    history = np.zeros((1, 2, 1, 24, 24), np.uint8)
    for t in range(4):
        frame = rng.integers(0, 256, size=(1, 400, 600, 3), dtype=np.uint8)
        row = {"b64": base64.b64encode(frame[0].tobytes()).decode(), "dtype": "uint8", "shape": [400, 600, 3]}
        served = client.post(f"/v1/sessions/{sid}/act", json={"observation": row, "return_info": True}).json()
        feeds = {
            "observation": frame,
            "action_mask": np.ones((1, 2), bool),
            "frame_history": history,
            "is_init": np.full(1, t == 0),
        }
        action, values, history = session.run(None, feeds)
        assert action.tolist() == [served["action"]], t
        # onnxruntime's antialiased Resize (400x600 -> 24x24) differs from torch's by ~1e-3
        np.testing.assert_allclose(values[0], served["info"]["action_value"], rtol=2e-3, atol=3e-3)
