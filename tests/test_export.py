"""``export_policy``: a TorchRL policy built as the seed tutorials build them, exported, uploaded
through the REST API, answers what the module answers in-process (actions; Q-values; recurrent
sessions carrying the state), or is refused with a sentence naming the part."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule as Mod
from tensordict.nn import TensorDictSequential as Seq
from torch import nn
from torchrl.data import Bounded, Categorical, Unbounded
from torchrl.envs import (
    Compose,
    GymEnv,
    InitTracker,
    ObservationNorm,
    StepCounter,
    ToTensorImage,
    TransformedEnv,
)
from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp
from torchrl.modules import (
    MLP,
    Actor,
    ConvNet,
    EGreedyModule,
    IndependentNormal,
    LSTMModule,
    MaskedCategorical,
    NormalParamExtractor,
    ProbabilisticActor,
    QValueActor,
    QValueModule,
    TanhNormal,
)

from service.registry.preprocess import GrayScale, Resize
from service.sdk import export_policy
from tests.helpers import new_session, upload_files

OBS4 = Unbounded(shape=(4,))
BOX = Bounded(low=torch.tensor([-2.0, -1.0]), high=torch.tensor([2.0, 0.5]))


def upload_dir(client, name: str, folder) -> int:
    spec = json.loads((folder / "policy.json").read_text())
    r = client.post(
        f"/v1/policies/{name}/versions",
        files=upload_files(spec, (folder / "weights.safetensors").read_bytes()),
    )
    assert r.status_code == 201, r.text
    return r.json()["version"]


def spread(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights large enough that actions differ across observations."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.8)
    return module


def in_process(policy, td: TensorDict) -> TensorDict:
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        return policy(td)


def obs_batch(n: int = 16, dim: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


# -- the shapes the seeds build --------------------------------------------------------------
def q_seq(key="observation", act=nn.Tanh, cells=(64,)):
    """The modules tutorial: TensorDictModule(MLP) -> QValueModule (+ EGreedy, dropped)."""
    value = Mod(
        MLP(in_features=4, out_features=2, num_cells=list(cells), activation_class=act),
        in_keys=[key],
        out_keys=["action_value"],
    )
    policy = Seq(value, QValueModule(spec=Categorical(2)))
    return Seq(policy, EGreedyModule(Categorical(2), eps_init=0.3, eps_end=0.3))


def q_actor():
    return QValueActor(
        MLP(in_features=4, out_features=3, num_cells=[32, 32], activation_class=nn.ReLU),
        in_keys=["obs"],
        spec=Categorical(3),
    )


QVALUE_CASES = {
    "tutorial TensorDictModule(MLP) + QValueModule + EGreedy": (q_seq, 2),
    "renamed key, ReLU, two layers": (lambda: q_seq("state", nn.ReLU, (16, 16)), 2),
    "QValueActor": (q_actor, 3),
}


@pytest.mark.parametrize("case", list(QVALUE_CASES))
def test_qvalue_policies_are_served_as_in_process(client, tmp_path, case):
    make, n = QVALUE_CASES[case]
    policy = spread(make())
    key = policy.in_keys[0]
    folder = export_policy(policy, tmp_path / "q", observation_spec=OBS4, action_spec=Categorical(n))
    upload_dir(client, "exported", folder)
    x = obs_batch()
    expected = in_process(policy, TensorDict({key: x}, batch_size=[16]))
    r = client.post("/v1/policies/exported/act", json={"observations": x.tolist(), "return_info": True})
    assert r.json()["actions"] == expected["action"].tolist()
    values = torch.tensor([i["action_value"] for i in r.json()["info"]])
    assert torch.allclose(values, expected["action_value"], atol=1e-5)


def actor_plain():
    return Actor(MLP(in_features=4, out_features=2, num_cells=[32]), in_keys=["observation"], spec=BOX)


def actor_tanh():
    return Actor(
        nn.Sequential(
            MLP(in_features=4, out_features=2, num_cells=[32, 32], activation_class=nn.ELU), nn.Tanh()
        ),
        in_keys=["observation"],
        spec=BOX,
    )


def prob(dist, **kwargs):
    net = nn.Sequential(
        MLP(in_features=4, out_features=4, num_cells=[32], activation_class=nn.SiLU), NormalParamExtractor()
    )
    return ProbabilisticActor(
        Mod(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        distribution_class=dist,
        distribution_kwargs=kwargs,
        spec=BOX,
    )


BOX_CASES = {
    "Actor(MLP), clipped into the box": actor_plain,
    "Actor(Sequential(MLP, Tanh))": actor_tanh,
    "ProbabilisticActor Normal": lambda: prob(torch.distributions.Normal),
    "ProbabilisticActor IndependentNormal": lambda: prob(IndependentNormal),
    "ProbabilisticActor TanhNormal with the box's bounds": lambda: prob(
        TanhNormal, low=BOX.space.low, high=BOX.space.high
    ),
}


@pytest.mark.parametrize("case", list(BOX_CASES))
def test_box_policies_are_served_as_in_process_clipped_into_the_box(client, tmp_path, case):
    policy = spread(BOX_CASES[case]())
    folder = export_policy(policy, tmp_path / "b", observation_spec=OBS4, action_spec=BOX)
    upload_dir(client, "exported", folder)
    x = obs_batch() * 3
    expected = in_process(policy, TensorDict({"observation": x}, batch_size=[16]))["action"]
    expected = expected.clamp(BOX.space.low, BOX.space.high)
    r = client.post("/v1/policies/exported/act", json={"observations": x.tolist()})
    assert r.status_code == 200, r.text
    assert torch.allclose(torch.tensor(r.json()["actions"]), expected, atol=1e-5)


@pytest.mark.parametrize("dist", [torch.distributions.Categorical, MaskedCategorical])
def test_categorical_policies_over_logits(client, tmp_path, dist):
    logits = Mod(
        MLP(in_features=4, out_features=3, num_cells=[16]), in_keys=["observation"], out_keys=["logits"]
    )
    in_keys = (
        ["logits"] if dist is torch.distributions.Categorical else {"logits": "logits", "mask": "action_mask"}
    )
    policy = spread(ProbabilisticActor(logits, in_keys=in_keys, distribution_class=dist, spec=Categorical(3)))
    upload_dir(
        client,
        "exported",
        export_policy(policy, tmp_path / "c", observation_spec=OBS4, action_spec=Categorical(3)),
    )
    x = obs_batch()
    td = TensorDict({"observation": x, "action_mask": torch.ones(16, 3, dtype=torch.bool)}, batch_size=[16])
    expected = in_process(policy, td)["action"]
    r = client.post("/v1/policies/exported/act", json={"observations": x.tolist()})
    assert r.json()["actions"] == expected.tolist()


def test_an_lstm_policy_steps_in_a_session_like_the_module_carrying_its_state(client, tmp_path):
    lstm = LSTMModule(input_size=4, hidden_size=12, in_key="obs_in", out_key="memory")
    head = Mod(
        MLP(in_features=12, out_features=2, num_cells=[16], activation_class=nn.ReLU),
        in_keys=["memory"],
        out_keys=["action_value"],
    )
    policy = spread(Seq(lstm, head, QValueModule(spec=Categorical(2))))
    upload_dir(
        client,
        "exported",
        export_policy(policy, tmp_path / "l", observation_spec=OBS4, action_spec=Categorical(2)),
    )
    seq = obs_batch(6, seed=4)
    sid = new_session(client, "exported")
    h = c = torch.zeros(1, 1, 12)
    for t in range(6):
        td = TensorDict(
            {
                "obs_in": seq[t : t + 1],
                "recurrent_state_h": h,
                "recurrent_state_c": c,
                "is_init": torch.tensor([[t == 0]]),
            },
            batch_size=[1],
        )
        out = in_process(policy, td)
        h, c = out["next", "recurrent_state_h"], out["next", "recurrent_state_c"]
        r = client.post(
            f"/v1/sessions/{sid}/act", json={"observation": seq[t].tolist(), "return_info": True}
        ).json()
        assert r["action"] == int(out["action"][0])
        assert torch.allclose(torch.tensor(r["info"]["action_value"]), out["action_value"][0], atol=1e-5)


def test_the_recurrent_pixel_seed_exports_with_its_env_transforms(client, tmp_path):
    """Seed 002's construction: GymEnv(from_pixels) + ToTensorImage, GrayScale, Resize,
    InitTracker, ObservationNorm; ConvNet (lazy, materialised) -> LSTMModule -> MLP -> QValueModule.
    A client sends the raw 400x600x3 frames through a session; the answers are the module's on
    the env's transformed pixels, carrying the LSTM state."""
    env = TransformedEnv(
        GymEnv("CartPole-v1", from_pixels=True, pixels_only=True),
        Compose(
            ToTensorImage(in_keys=["pixels"]),
            GrayScale(in_keys=["pixels"]),
            Resize(32, 32, in_keys=["pixels"]),
            StepCounter(),
            InitTracker(),
            ObservationNorm(
                loc=torch.tensor(0.9), scale=torch.tensor(0.2), standard_normal=True, in_keys=["pixels"]
            ),
        ),
    )
    feature = Mod(
        ConvNet(
            num_cells=[8, 8],
            kernel_sizes=[5, 3],
            strides=[2, 2],
            squeeze_output=True,
            aggregator_class=nn.AdaptiveAvgPool2d,
            aggregator_kwargs={"output_size": (1, 1)},
        ),
        in_keys=["pixels"],
        out_keys=["embed"],
    )
    feature(env.reset())  # materialise the lazy layer, as the seed does
    lstm = LSTMModule(input_size=8, hidden_size=16, in_key="embed", out_key="embed")
    env.append_transform(lstm.make_tensordict_primer())
    mlp = Mod(
        MLP(out_features=2, num_cells=[16], in_features=16), in_keys=["embed"], out_keys=["action_value"]
    )
    policy = spread(Seq(feature, lstm, mlp, QValueModule(spec=env.action_spec)))
    folder = export_policy(policy, tmp_path / "p", env=env)
    upload_dir(client, "pixel-seed", folder)
    spec = (folder / "policy.json").read_text()
    assert (
        '"grayscale"' in spec
        and '"observation_norm"' in spec
        and '"shape": [\n   400' in spec.replace(" ", " ")
    )

    raw_env = GymEnv("CartPole-v1", from_pixels=True, pixels_only=True)  # what the client has
    raw_env.set_seed(0)
    env.set_seed(0)
    ta, tb = raw_env.reset(), env.reset()
    sid = new_session(client, "pixel-seed")
    for t in range(8):
        out = in_process(policy, tb)
        frame = ta["pixels"].numpy()
        body = {
            "observation": {
                "b64": base64.b64encode(frame.tobytes()).decode(),
                "dtype": "uint8",
                "shape": list(frame.shape),
            },
            "reset": t == 0,
            "return_info": True,
        }
        r = client.post(f"/v1/sessions/{sid}/act", json=body).json()
        assert r["action"] == int(out["action"].argmax(-1)), t  # one-hot in the env, an index served
        assert torch.allclose(torch.tensor(r["info"]["action_value"]), out["action_value"], atol=1e-4), t
        ta = raw_env.step(ta.set("action", out["action"]))
        tb = env.step(out)
        assert not tb["next", "done"].any()
        ta, tb = step_mdp(ta), step_mdp(tb)
    raw_env.close()
    env.close()


def test_what_cannot_be_represented_is_refused_naming_the_part(tmp_path):
    """``form="declarative"``: the spec's refusals (``auto`` writes exported programs instead)."""
    dropout = Seq(
        Mod(
            nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2)),
            in_keys=["observation"],
            out_keys=["action_value"],
        ),
        QValueModule(spec=Categorical(2)),
    )
    with pytest.raises(ValueError, match="Dropout"):
        export_policy(
            dropout, tmp_path / "x", observation_spec=OBS4, action_spec=Categorical(2), form="declarative"
        )
    lazy = Seq(
        Mod(ConvNet(num_cells=[4]), in_keys=["pixels"], out_keys=["e"]),
        Mod(MLP(out_features=2, num_cells=[4]), in_keys=["e"], out_keys=["action_value"]),
        QValueModule(spec=Categorical(2)),
    )
    with pytest.raises(ValueError, match="lazy"):
        export_policy(
            lazy,
            tmp_path / "x",
            observation_spec=Unbounded(shape=(3, 16, 16)),
            action_spec=Categorical(2),
            form="declarative",
        )
    other_bounds = prob(TanhNormal, low=-1.0, high=1.0)
    with pytest.raises(ValueError, match="bounds"):
        export_policy(
            other_bounds, tmp_path / "x", observation_spec=OBS4, action_spec=BOX, form="declarative"
        )
    custom_scale = ProbabilisticActor(
        Mod(
            nn.Sequential(
                MLP(in_features=4, out_features=4, num_cells=[8]), NormalParamExtractor(scale_mapping="exp")
            ),
            in_keys=["observation"],
            out_keys=["loc", "scale"],
        ),
        in_keys=["loc", "scale"],
        distribution_class=IndependentNormal,
        spec=BOX,
    )
    with pytest.raises(ValueError, match="answer differently"):
        export_policy(
            custom_scale, tmp_path / "x", observation_spec=OBS4, action_spec=BOX, form="declarative"
        )
    assert not (tmp_path / "x" / "policy.json").exists()  # nothing written on a refusal
    mlp_before_lstm = Seq(
        Mod(MLP(in_features=4, out_features=8, num_cells=[]), in_keys=["observation"], out_keys=["x"]),
        LSTMModule(input_size=8, hidden_size=8, in_key="x", out_key="y"),
        Mod(MLP(in_features=8, out_features=2, num_cells=[]), in_keys=["y"], out_keys=["action_value"]),
        QValueModule(spec=Categorical(2)),
    )
    with pytest.raises(ValueError, match="head"):
        export_policy(
            mlp_before_lstm,
            tmp_path / "x",
            observation_spec=OBS4,
            action_spec=Categorical(2),
            form="declarative",
        )


def test_auto_writes_an_exported_program_where_the_spec_cannot_describe_the_module(tmp_path):
    dropout = Seq(
        Mod(
            nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2)),
            in_keys=["observation"],
            out_keys=["action_value"],
        ),
        QValueModule(spec=Categorical(2)),
    )
    out = export_policy(dropout.eval(), tmp_path / "x", observation_spec=OBS4, action_spec=Categorical(2))
    spec = json.loads((out / "policy.json").read_text())
    assert spec["kind"] == "qvalue" and spec["program"]["outputs"] == ["action", "action_value"]
    assert sorted(p.name for p in out.iterdir()) == ["deterministic.pt2", "policy.json"]
    plain = Seq(
        Mod(
            MLP(in_features=4, out_features=2, num_cells=[8]),
            in_keys=["observation"],
            out_keys=["action_value"],
        ),
        QValueModule(spec=Categorical(2)),
    )
    out = export_policy(plain, tmp_path / "y", observation_spec=OBS4, action_spec=Categorical(2))
    assert (out / "weights.safetensors").exists()
    assert json.loads((out / "policy.json").read_text())["program"] is None


def test_numpy_frames_round_trip_in_the_raw_bytes_form():
    from service.sdk.client import encode_observation

    frame = np.arange(400 * 600 * 3, dtype=np.uint8).reshape(400, 600, 3)
    enc = encode_observation(frame)
    assert enc["shape"] == [400, 600, 3] and enc["dtype"] == "uint8"
    assert np.array_equal(np.frombuffer(base64.b64decode(enc["b64"]), np.uint8).reshape(400, 600, 3), frame)
    assert encode_observation(np.float32([0.5, 1.0])) == [0.5, 1.0]  # small: JSON numbers
