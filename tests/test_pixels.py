"""Pixel policies: image observations (JSON lists or raw base64 bytes), the spec's TorchRL
preprocessing run by the server, ConvNet (-> LSTM) -> MLP -> Q, and pixel DQN training with
uint8 replay storage."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torch.nn import functional
from torchrl.modules import set_recurrent_mode

from service.registry.build import build_policy, load_weights
from service.registry.preprocess import GrayScale, Resize, make_preprocess
from service.registry.spec import PolicySpec
from service.training.common import train_offpolicy
from service.training.dqn import DQN, DQNConfig
from tests.helpers import new_session, random_weights, upload, upload_files

SHAPE = [40, 60, 3]
PIX = {
    "kind": "qvalue",
    "observation": {"shape": SHAPE, "dtype": "uint8"},
    "preprocess": [
        {"type": "to_tensor_image"},
        {"type": "grayscale"},
        {"type": "resize", "w": 21, "h": 30},
        {"type": "observation_norm", "loc": [[[0.5]]], "scale": [[[0.25]]]},
    ],
    "action": {"type": "discrete", "n": 3},
    "network": {
        "num_cells": [16],
        "conv": {"num_cells": [4, 8], "kernel_sizes": [4, 3], "strides": [2, 1], "activation": "relu"},
    },
}
PIX_LSTM = {**PIX, "recurrent": {"type": "lstm", "hidden_size": 8}}
FLOAT_IMG = {
    **PIX,
    "observation": {"shape": [3, 8, 8], "dtype": "float32"},
    "preprocess": [],
    "network": {"num_cells": [8], "conv": {"num_cells": [4], "aggregator": "adaptive_avg_pool"}},
}


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


def b64(frame: np.ndarray) -> dict:
    return {
        "b64": base64.b64encode(frame.tobytes()).decode(),
        "dtype": str(frame.dtype),
        "shape": list(frame.shape),
    }


def module_and_transforms(spec: dict, weights: bytes):
    built = build_policy(PolicySpec.model_validate(spec))
    load_weights(built, weights)
    return built.core, make_preprocess(PolicySpec.model_validate(spec).preprocess)


def in_process(spec: dict, weights: bytes, batch: np.ndarray) -> TensorDict:
    """The TorchRL module with the same transforms, called directly."""
    core, transforms = module_and_transforms(spec, weights)
    td = TensorDict({"observation": torch.from_numpy(batch)}, batch_size=[len(batch)])
    with torch.no_grad():
        return core(transforms(td) if transforms is not None else td)


def test_pixel_policy_answers_like_the_module_with_its_transforms(client):
    weights = random_weights(PIX)
    assert upload(client, "pix", PIX, weights).status_code == 201
    batch = frames(5)
    expected = in_process(PIX, weights, batch)
    r = client.post(
        "/v1/policies/pix/act", json={"observations": [b64(f) for f in batch], "return_info": True}
    )
    assert r.status_code == 200, r.text
    assert r.json()["actions"] == expected["action"].tolist()
    values = torch.tensor([i["action_value"] for i in r.json()["info"]])
    assert torch.allclose(values, expected["action_value"], atol=1e-4)
    # nested JSON lists and raw bytes are the same observation, and mix in one batch
    mixed = client.post("/v1/policies/pix/act", json={"observations": [batch[0].tolist(), b64(batch[1])]})
    assert mixed.json()["actions"] == expected["action"][:2].tolist()
    one = client.post("/v1/policies/pix/act", json={"observation": b64(batch[3])})
    assert one.json()["action"] == int(expected["action"][3])


def test_float_images_and_an_adaptive_pooling_convnet(client):
    weights = random_weights(FLOAT_IMG)
    assert upload(client, "fimg", FLOAT_IMG, weights).status_code == 201
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    r = client.post("/v1/policies/fimg/act", json={"observations": [b64(f) for f in x]})
    assert r.status_code == 200, r.text
    assert r.json()["actions"] == in_process(FLOAT_IMG, weights, x)["action"].tolist()
    nan = x[0].copy()
    nan[1, 2, 3] = np.nan
    r = client.post("/v1/policies/fimg/act", json={"observation": b64(nan)})
    assert r.status_code == 422 and "not finite" in r.json()["detail"], r.text


def test_resize_and_grayscale_compute_what_torchvision_does_for_tensors():
    """torchvision's tensor resize is interpolate(antialias=True) (uint8: in float, rounded);
    its grayscale the ITU-R 601-2 weighted sum, truncated to the input dtype."""
    img = torch.from_numpy(frames(2)).permute(0, 3, 1, 2).contiguous()  # [2, 3, 40, 60] uint8
    out = Resize(21, 30, in_keys=["x"])._apply_transform(img)
    ref = functional.interpolate(
        img.float(), size=[21, 30], mode="bilinear", antialias=True, align_corners=False
    )
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 21, 30)
    assert torch.equal(out, ref.round().clamp(0, 255).to(torch.uint8))
    gray = GrayScale(in_keys=["x"])._apply_transform(img)
    r, g, b = img.unbind(-3)
    assert gray.shape == (2, 1, 40, 60)
    assert torch.equal(gray[:, 0], (0.2989 * r + 0.587 * g + 0.114 * b).to(torch.uint8))
    # leading batch/time dims are kept
    assert Resize(8, in_keys=["x"])._apply_transform(img.float().unsqueeze(0)).shape == (1, 2, 3, 8, 8)


def test_a_recurrent_pixel_session_steps_like_the_whole_sequence(client):
    weights = random_weights(PIX_LSTM)
    upload(client, "pix-lstm", PIX_LSTM, weights)
    seq = frames(5, seed=2)
    sid = new_session(client, "pix-lstm")
    answers = []
    for t, f in enumerate(seq):
        r = client.post(f"/v1/sessions/{sid}/act", json={"observation": b64(f), "return_info": True})
        assert r.status_code == 200, r.text
        answers.append(r.json())
        if t == 2:  # a refused call in the middle changes nothing
            bad = client.post(
                f"/v1/sessions/{sid}/act", json={"observation": {**b64(f), "shape": [40, 60, 4]}}
            )
            assert bad.status_code == 422
    assert client.get(f"/v1/sessions/{sid}").json()["steps"] == 5
    core, transforms = module_and_transforms(PIX_LSTM, weights)
    td = TensorDict({"observation": torch.from_numpy(seq)}, batch_size=[5])
    td = transforms(td).unsqueeze(0)  # [1, T]
    td["is_init"] = torch.zeros(1, 5, 1, dtype=torch.bool)
    td["is_init"][0, 0] = True
    with torch.no_grad(), set_recurrent_mode(True):
        out = core(td)
    assert [a["action"] for a in answers] == out["action"][0].tolist()
    values = torch.tensor([a["info"]["action_value"] for a in answers])
    assert torch.allclose(values, out["action_value"][0], atol=1e-4)


def _bad(frame: np.ndarray) -> list[tuple[object, str]]:
    good = b64(frame)
    return [
        ({**good, "shape": [40, 60, 4]}, "has shape [40, 60, 4], policy pix expects [40, 60, 3]"),
        ({**good, "dtype": "float32"}, "has dtype float32, policy pix expects uint8"),
        ({**good, "b64": good["b64"][:-8]}, "base64 characters"),
        ({**good, "b64": "!" * len(good["b64"])}, "not valid base64"),
        ({**good, "shape": [65536, 65536, 4096]}, "policy pix expects [40, 60, 3]"),  # 16 TB declared
        (frame[:, :-1].tolist(), "has shape [40, 59, 3]"),
        ((frame.astype(np.int64) + 300).tolist(), "not integers in [0, 255]"),
        ([[1, 2], [3]], "not a regular array"),
        (5, "expects an array of shape [40, 60, 3]"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_pixel_observations_that_do_not_fit_are_422(client, case):
    upload(client, "pix", PIX, random_weights(PIX))
    observation, expected = _bad(frames(1)[0])[case]
    r = client.post("/v1/policies/pix/act", json={"observation": observation})
    assert r.status_code == 422 and expected in str(r.json()["detail"]), r.text


def test_specs_whose_preprocessing_does_not_fit_the_network_are_refused(client):
    cases = [
        ({**PIX, "preprocess": []}, "preprocess with to_tensor_image"),  # conv on HWC uint8
        ({**PIX, "network": {"num_cells": [8]}}, "add network.conv"),  # MLP on an image
        ({**PIX, "preprocess": [{"type": "grayscale"}]}, "grayscale does not fit"),  # HWC, 60 "channels"
        (
            {**PIX, "network": {"conv": {"num_cells": [4], "kernel_sizes": 64}}},
            "network.conv does not fit",
        ),
    ]
    for spec, expected in cases:
        r = client.post("/v1/policies/bad/versions", files=upload_files(spec, random_weights(PIX)))
        assert r.status_code == 422 and expected in str(r.json()["detail"]), (expected, r.text)


def test_pixel_dqn_stores_uint8_frames_and_publishes_the_whole_preprocessing(client):
    config = DQNConfig.with_defaults(
        {
            "frames_per_batch": 50,
            "updates_per_batch": 2,
            "init_random_frames": 100,
            "eval_episodes": 1,
            "resize": 24,
            "conv_cells": [4],
            "conv_kernels": [4],
            "conv_strides": [2],
            "norm_init_frames": 20,
            "num_cells": [8],
            "hidden_size": 8,
            "slice_len": 4,
            "batch_size": 4,
            "buffer_size": 1000,
        },
        env_id="CartPolePixels-v1",
        total_frames=200,
        recurrent=True,
    )
    algo = DQN(config)
    trained = train_offpolicy(algo, config)
    stored = algo.buffer[:]
    assert stored["observation"].dtype == torch.uint8 and stored["observation"].shape[1:] == (1, 24, 24)
    assert "observation_preprocessed" not in stored.keys()
    kinds = [p.type for p in trained.spec.preprocess]
    assert kinds == ["to_tensor_image", "grayscale", "resize", "observation_norm"]
    assert trained.spec.recurrent is not None and trained.spec.network.conv.num_cells == [4]
    # the published version serves raw 400x600x3 frames
    assert (
        client.post(
            "/v1/policies/px/versions",
            files=upload_files(trained.spec.model_dump(mode="json"), trained.weights),
        ).status_code
        == 201
    )
    frame = np.full((400, 600, 3), 255, dtype=np.uint8)
    sid = new_session(client, "px")
    r = client.post(f"/v1/sessions/{sid}/act", json={"observation": b64(frame)})
    assert r.status_code == 200 and r.json()["action"] in (0, 1), r.text


def test_pixel_rollouts_and_jobs_are_offered(client):
    spec = {
        **PIX,
        "observation": {"shape": [400, 600, 3], "dtype": "uint8"},
        "action": {"type": "discrete", "n": 2},
    }
    spec["preprocess"] = [*PIX["preprocess"][:2], {"type": "resize", "w": 24}, PIX["preprocess"][3]]
    upload(client, "pix-cp", spec, random_weights(spec))
    r = client.post(
        "/v1/policies/pix-cp/rollout",
        json={"env_id": "CartPolePixels-v1", "episodes": 1, "max_steps": 5, "seed": 0},
    )
    assert r.status_code == 200 and r.json()["episodes"][0]["length"] <= 5, r.text
    body = {
        "algorithm": "dqn",
        "env_id": "CartPolePixels-v1",
        "policy_name": "p",
        "recurrent": True,
        "total_frames": 1000,
    }
    assert client.post("/v1/jobs", json=body).status_code == 202


PIX_CAT = {
    "kind": "qvalue",
    "observation": {"shape": [400, 600, 3], "dtype": "uint8"},
    "preprocess": [
        {"type": "to_tensor_image", "from_int": False, "dtype": "uint8"},
        {"type": "grayscale"},
        {"type": "resize", "w": 24},
        {"type": "cat_frames", "N": 3, "dim": -3},
        {"type": "observation_norm", "loc": 200.0, "scale": 60.0},
    ],
    "action": {"type": "discrete", "n": 2},
    "network": {"num_cells": [16], "conv": {"num_cells": [6], "kernel_sizes": 4, "strides": 2}},
}


def test_cat_frames_history_is_session_state_and_matches_torchrl_in_an_env(client):
    """A client steps a session with raw frames; a TorchRL env with the same transforms
    (TorchRL's own CatFrames keeping the history) steps the same seeded episodes: the served
    answers are the module's on the env's stacked observations, across an episode boundary."""
    from torchrl.envs.utils import step_mdp

    from service.envs import make_env
    from service.registry.preprocess import make_transform

    weights = random_weights(PIX_CAT)
    assert upload(client, "pix-cat", PIX_CAT, weights).status_code == 201
    core, _ = module_and_transforms(PIX_CAT, weights)
    spec = PolicySpec.model_validate(PIX_CAT)
    raw, stacked = make_env("CartPolePixels-v1"), make_env("CartPolePixels-v1")
    for entry in spec.preprocess:
        stacked.append_transform(make_transform(entry))
    raw.set_seed(3)
    stacked.set_seed(3)
    ta, tb = raw.reset(), stacked.reset()
    g = torch.Generator().manual_seed(0)
    sid = new_session(client, "pix-cat")
    starts, reset = 0, True
    for _ in range(30):
        assert torch.equal(ta["step_count"], tb["step_count"])
        body = {"observation": b64(ta["observation"].numpy()), "reset": reset, "return_info": True}
        served = client.post(f"/v1/sessions/{sid}/act", json=body).json()
        with torch.no_grad():
            expected = core(TensorDict({"observation": tb["observation"].unsqueeze(0)}, batch_size=[1]))
        assert served["action"] == int(expected["action"][0])
        assert torch.allclose(
            torch.tensor(served["info"]["action_value"]), expected["action_value"][0], atol=1e-4
        )
        action = torch.randint(2, (), generator=g)
        ta = raw.step(ta.set("action", action))
        tb = stacked.step(tb.set("action", action))
        reset = bool(ta["next", "done"])
        ta, tb = step_mdp(ta), step_mdp(tb)
        if reset:
            starts += 1
            ta, tb = raw.reset(), stacked.reset()
    raw.close()
    stacked.close()
    assert starts >= 1  # the comparison crossed an episode boundary
    # a stateless act starts an episode: its answer is a session's first step
    frame = b64(ta["observation"].numpy())
    first = client.post(f"/v1/sessions/{new_session(client, 'pix-cat')}/act", json={"observation": frame})
    assert (
        client.post("/v1/policies/pix-cat/act", json={"observation": frame}).json()["action"]
        == first.json()["action"]
    )
