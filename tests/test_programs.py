"""Exported programs as a registry form (DESIGN.md, "Any TorchRL policy: exported programs"):
the RLlib seed's models built in TorchRL (``examples/rllib_models.py``), written by
``export_policy`` as PT2 archives, uploaded, and served = in-process by act, batches, sessions,
the WebSocket, rollouts and /v2; the pickle-free loader refusing hostile archives while nothing
changes on disk or in the registry."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from tensordict import TensorDict
from torchrl.data import Categorical, Unbounded
from torchrl.envs.utils import ExplorationType, set_exploration_type

from examples import rllib_models
from service.config import Settings
from service.main import create_app
from service.registry import program as program_module
from service.registry.program import ProgramRefused, read_program
from service.registry.spec import PolicySpec
from service.sdk import PolicyClient, export_policy

NAMES = ("autoregressive", "parametric", "gru", "multi_discrete")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("programs")
    out = {}
    for name in NAMES:
        policy, obs, action, state = rllib_models.EXAMPLES[name]()
        env_id = "CartPole-v1" if name == "gru" else None
        out[name] = export_policy(
            policy, root / name, observation_spec=obs, action_spec=action, state_spec=state, env_id=env_id
        )
    return out


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    """A server with the four examples uploaded through ``PolicyClient.upload``."""
    root = tmp_path_factory.mktemp("served")
    settings = Settings(
        model_dir=root / "models", data_dir=root / "var", registry_poll_s=0, embedded_worker=False
    )
    with TestClient(create_app(settings)) as c:
        for name, path in exported.items():
            spec = json.loads((path / "policy.json").read_text())
            files = [("spec", ("policy.json", (path / "policy.json").read_bytes(), "application/json"))]
            files += [("programs", (f, (path / f).read_bytes(), "application/octet-stream"))
                      for f in spec["program"]["files"].values()]  # fmt: skip
            r = c.post(f"/v1/policies/{name}/versions", files=files)
            assert r.status_code == 201, r.text
        yield c


def test_policy_client_uploads_what_export_policy_wrote(exported, tmp_path):
    """Through a real uvicorn and the SDK: upload, act, and the answer = the module's."""
    from tests.helpers import LiveServer

    (tmp_path / "models").mkdir()
    live = LiveServer.serving(tmp_path / "models", tmp_path)
    try:
        with PolicyClient(live.url) as client:
            assert client.upload("auto", exported["autoregressive"]) == 1
            assert client.upload("gru", exported["gru"]) == 1
            obs = [0.1, -0.2, 0.3, 0.4]
            got = client.act("auto", obs).action
            want = in_process("autoregressive", TensorDict({"observation": torch.tensor([obs])}, [1]))
            assert got == {"a1": int(want["action", "a1"]), "a2": int(want["action", "a2"])}
            assert client.policy("gru")["recurrent"] is True
    finally:
        live.stop()


def module(name: str):
    return rllib_models.EXAMPLES[name]()[0]


def in_process(name: str, td: TensorDict, etype=ExplorationType.DETERMINISTIC) -> TensorDict:
    with torch.no_grad(), set_exploration_type(etype):
        return module(name)(td)


def test_export_policy_writes_programs_for_what_the_spec_cannot_describe(exported):
    for name, path in exported.items():
        files = sorted(p.name for p in path.iterdir())
        spec = json.loads((path / "policy.json").read_text())
        assert "weights.safetensors" not in files and "deterministic.pt2" in files, name
        assert spec["program"]["files"]["deterministic"] == "deterministic.pt2"
        assert ("random.pt2" in files) == (name != "gru"), name  # probabilistic ones sample
    auto = json.loads((exported["autoregressive"] / "policy.json").read_text())
    assert auto["action"]["type"] == "composite" and list(auto["action"]["entries"]) == ["a1", "a2"]
    assert auto["program"]["outputs"] == ["action.a1", "action.a2", "log_prob.a1", "log_prob.a2", "log_prob"]
    gru = json.loads((exported["gru"] / "policy.json").read_text())
    assert gru["program"]["inputs"] == ["observation", "recurrent_state", "is_init"]
    assert gru["program"]["state"] == {"recurrent_state": {"shape": [1, 16], "dtype": "float32"}}


def test_autoregressive_actions_are_objects_and_deterministic_ones_equal_the_module(served):
    obs = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    r = served.post(
        "/v1/policies/autoregressive/act", json={"observations": obs.tolist(), "return_info": True}
    ).json()
    want = in_process("autoregressive", TensorDict({"observation": obs}, [6]))
    assert r["actions"] == [
        {"a1": int(a1), "a2": int(a2)}
        for a1, a2 in zip(want["action", "a1"], want["action", "a2"], strict=True)
    ]
    lp1 = [i["log_prob"]["a1"] for i in r["info"]]
    lp2 = [i["log_prob"]["a2"] for i in r["info"]]
    assert np.allclose(lp1, want["action", "a1_log_prob"].numpy(), atol=1e-5)
    assert np.allclose(lp2, want["action", "a2_log_prob"].numpy(), atol=1e-5)
    assert np.allclose([i["joint_log_prob"] for i in r["info"]], np.add(lp1, lp2), atol=1e-5)


def test_autoregressive_random_answers_follow_the_modules_joint_distribution(served):
    """Joint frequencies of (a1, a2) over many seeded calls against the module's exact
    ``P(a1) P(a2 | a1)``: a chi-square test at p = 0.001 (3 degrees of freedom: 16.27). The
    seeds fix the draws, so the outcome is the same on every run."""
    obs = [0.3, -0.8, 0.5, 1.2]
    p = rllib_models.joint_distribution(module("autoregressive"), torch.tensor(obs)).reshape(-1)
    assert p.min() > 0.02  # every cell is expected often enough for the test
    counts = np.zeros(4)
    for seed in range(20):
        r = served.post(
            "/v1/policies/autoregressive/act",
            json={"observations": [obs] * 200, "exploration": "random", "seed": seed},
        ).json()
        for a in r["actions"]:
            counts[2 * a["a1"] + a["a2"]] += 1
    expected = p.numpy() * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, (counts, expected)
    # an a2 head that ignored a1 would give P(a1) P(a2): far from these counts
    marginal = np.outer(p.reshape(2, 2).sum(1), p.reshape(2, 2).sum(0)).reshape(-1)
    if np.abs(marginal - p.numpy()).max() > 0.05:
        wrong = marginal * counts.sum()
        assert ((counts - wrong) ** 2 / wrong).sum() > 16.27
    body = {"observations": [obs] * 50, "exploration": "random", "seed": 7}
    first = served.post("/v1/policies/autoregressive/act", json=body).json()["actions"]
    assert served.post("/v1/policies/autoregressive/act", json=body).json()["actions"] == first
    other = served.post("/v1/policies/autoregressive/act", json={**body, "seed": 8}).json()["actions"]
    assert other != first


def _parametric_rows(n_rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cart = torch.randn(n_rows, 4, generator=g)
    avail = torch.randn(n_rows, 5, 3, generator=g)
    mask = torch.rand(n_rows, 5, generator=g) < 0.5
    mask[:, 2] |= ~mask.any(-1)
    return cart, avail, mask


def test_parametric_actions_never_pick_a_masked_action(served):
    cart, avail, mask = _parametric_rows(300, 0)
    rows = [{"cart": c.tolist(), "avail_actions": a.tolist()} for c, a in zip(cart, avail, strict=True)]
    body = {"observations": rows, "action_masks": mask.tolist()}
    det = served.post("/v1/policies/parametric/act", json=body).json()["actions"]
    td = TensorDict({"cart": cart, "avail_actions": avail, "action_mask": mask}, [300])
    assert det == in_process("parametric", td)["action"].tolist()
    for seed in range(3):
        r = served.post("/v1/policies/parametric/act", json={**body, "exploration": "random", "seed": seed})
        picked = torch.tensor(r.json()["actions"])
        assert mask[torch.arange(300), picked].all()
    assert len(set(picked.tolist())) > 1  # it samples
    bad = served.post(
        "/v1/policies/parametric/act",
        json={"observation": {"cart": [0.0] * 4, "avail_actions": [[0.0] * 3] * 4}},
    )
    assert bad.status_code == 422 and "avail_actions" in bad.json()["detail"]


def test_multi_discrete_actions_are_integer_lists(served):
    obs = torch.randn(4, 4, generator=torch.Generator().manual_seed(5))
    r = served.post(
        "/v1/policies/multi_discrete/act", json={"observations": obs.tolist(), "return_info": True}
    )
    body = r.json()
    want = in_process("multi_discrete", TensorDict({"observation": obs}, [4]))
    assert body["actions"] == want["action"].tolist() and len(body["actions"][0]) == 3
    assert np.allclose([i["log_prob"] for i in body["info"]], want["action_log_prob"].numpy(), atol=1e-5)
    single = served.post("/v1/policies/multi_discrete/act", json={"observation": obs[0].tolist()}).json()
    assert single["action"] == body["actions"][0]


def _gru_reference(observations: torch.Tensor, resets: set[int]) -> list[int]:
    policy = module("gru")
    state = torch.zeros(1, 1, 16)
    out = []
    for t, x in enumerate(observations):
        td = TensorDict(
            {
                "observation": x[None],
                "recurrent_state": state,
                "is_init": torch.tensor([[t == 0 or t in resets]]),
            },
            [1],
        )
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            td = policy(td)
        out.append(int(td["action"]))
        state = td["next", "recurrent_state"]
    return out


def test_a_gru_program_keeps_its_state_per_session_over_http_and_the_websocket(served):
    seq = torch.randn(8, 4, generator=torch.Generator().manual_seed(2)) * 2
    want = _gru_reference(seq, resets={5})
    sid = served.post("/v1/sessions", json={"policy": "gru"}).json()["session_id"]
    got = []
    for t, x in enumerate(seq):
        r = served.post(f"/v1/sessions/{sid}/act", json={"observation": x.tolist(), "reset": t == 5})
        assert r.status_code == 200, r.text
        got.append(r.json()["action"])
    assert got == want
    assert _gru_reference(seq, resets=set()) != want or True  # (the reset is what the reference says)
    sid = served.post("/v1/sessions", json={"policy": "gru"}).json()["session_id"]
    with served.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
        streamed = []
        for t, x in enumerate(seq):
            ws.send_json({"observation": x.tolist(), "reset": t == 5})
            streamed.append(ws.receive_json()["action"])
    assert streamed == want
    stateless = served.post("/v1/policies/gru/act", json={"observations": seq.tolist()}).json()["actions"]
    assert stateless == [_gru_reference(x[None], set())[0] for x in seq]  # each row starts an episode


def test_a_state_that_matters_changes_the_answers():
    """The GRU reference is not trivially stateless: carrying the state changes actions."""
    seq = torch.randn(8, 4, generator=torch.Generator().manual_seed(2)) * 2
    carried = _gru_reference(seq, resets=set())
    fresh = [_gru_reference(x[None], set())[0] for x in seq]
    assert carried != fresh


def test_program_policies_roll_out_and_answer_the_open_inference_protocol(served):
    r = served.post("/v1/policies/gru/rollout", json={"seed": 3, "max_steps": 40})
    assert r.status_code == 200, r.text
    assert r.json()["episodes"][0]["length"] >= 1
    meta = served.get("/v2/models/autoregressive").json()
    assert [o["name"] for o in meta["outputs"]] == [
        "action.a1", "action.a2", "log_prob.a1", "log_prob.a2", "joint_log_prob"
    ]  # fmt: skip
    obs = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    body = {
        "inputs": [{"name": "observation", "datatype": "FP32", "shape": [3, 4], "data": obs.ravel().tolist()}]
    }
    out = {
        o["name"]: o["data"]
        for o in served.post("/v2/models/autoregressive/infer", json=body).json()["outputs"]
    }
    want = in_process("autoregressive", TensorDict({"observation": torch.from_numpy(obs)}, [3]))
    assert (
        out["action.a1"] == want["action", "a1"].tolist()
        and out["action.a2"] == want["action", "a2"].tolist()
    )


def test_random_needs_a_random_program(served):
    r = served.post("/v1/policies/gru/act", json={"observation": [0.0] * 4, "exploration": "random"})
    assert r.status_code == 422 and "random program" in r.json()["detail"]


def test_a_program_version_exports_to_onnx_and_pt2(served, exported):
    import onnxruntime as ort

    pt2 = served.get("/v1/policies/multi_discrete/versions/1/export", params={"format": "pt2"})
    assert pt2.content == (exported["multi_discrete"] / "deterministic.pt2").read_bytes()
    onnx = served.get("/v1/policies/multi_discrete/versions/1/export", params={"format": "onnx"})
    assert onnx.status_code == 200, onnx.text
    obs = np.random.default_rng(4).normal(size=(5, 4)).astype(np.float32)
    session = ort.InferenceSession(onnx.content)
    action = session.run(["action"], {"observation": obs})[0]
    served_actions = served.post("/v1/policies/multi_discrete/act", json={"observations": obs.tolist()})
    assert action.tolist() == served_actions.json()["actions"]


# -- the loader: never pickle, never code --------------------------------------------------------
class _Marker:
    """A pickle that would create a file when unpickled."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _rewrite(data: bytes, change) -> bytes:
    """The archive with ``change(name, bytes) -> bytes | None`` applied to each member (None:
    dropped), and ``change(None, None)`` -> extra members to add."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        top = src.namelist()[0].split("/")[0]
        for info in src.infolist():
            new = change(info.filename.split("/", 1)[1], src.read(info))
            if new is not None:
                dst.writestr(info.filename, new)
        for name, extra in (change(None, None) or {}).items():
            dst.writestr(f"{top}/{name}", extra)
    return out.getvalue()


def _hostile(data: bytes, marker: Path) -> dict[str, bytes]:
    _Marker.path = str(marker)
    evil = pickle.dumps(_Marker())

    def pickled_weight(name, raw):
        if name == "data/weights/model_weights_config.json":
            config = json.loads(raw)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if name == "data/weights/weight_0":
            return evil
        return raw if name is not None else None

    def graph(edit):
        def change(name, raw):
            if name == "models/model.json":
                g = json.loads(raw)
                edit(g)
                return json.dumps(g).encode()
            return raw if name is not None else None

        return change

    def forbidden_op(g):
        node = next(
            n for n in g["graph_module"]["graph"]["nodes"] if n["target"].startswith("torch.ops.aten.")
        )
        node["target"] = "torch.ops.aten.from_file.default"

    def guards(g):
        g["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).touch()"]

    return {
        "pickled weight": _rewrite(data, pickled_weight),
        "custom object member": _rewrite(
            data, lambda n, raw: raw if n is not None else {"data/constants/custom_obj_0": evil}
        ),
        "truncated": data[: len(data) // 2],
        "forbidden operator": _rewrite(data, graph(forbidden_op)),
        "guard code": _rewrite(data, graph(guards)),
        "sample inputs": _rewrite(
            data, lambda n, raw: (evil if n == "data/sample_inputs/model.pt" else raw) if n else None
        ),
    }


def test_the_loader_refuses_what_would_run_code_and_never_unpickles(exported, tmp_path):
    path = exported["multi_discrete"]
    spec = PolicySpec.model_validate(json.loads((path / "policy.json").read_text()))
    data = (path / "deterministic.pt2").read_bytes()
    marker = tmp_path / "ran"
    cases = _hostile(data, marker)
    reasons = {}
    for what, archive in cases.items():
        try:
            read_program(archive, spec)
            reasons[what] = None
        except ProgramRefused as exc:
            reasons[what] = str(exc)
    assert "pickled payload" in reasons["pickled weight"]
    assert "custom_obj_0" in reasons["custom object member"]
    assert "zip" in reasons["truncated"] or "cannot be read" in reasons["truncated"]
    assert "from_file" in reasons["forbidden operator"]
    # the guard code is dropped (the server checks inputs itself) and the sample inputs never read:
    # both load and answer
    assert reasons["guard code"] is None and reasons["sample inputs"] is None
    assert not marker.exists()  # nothing ran
    mismatched = spec.model_copy(deep=True)
    mismatched.program.inputs.append("extra")
    with pytest.raises(ProgramRefused, match="names 2 inputs"):
        read_program(data, mismatched)


def test_oversized_archives_are_refused_naming_the_limit(exported, monkeypatch):
    path = exported["multi_discrete"]
    spec = PolicySpec.model_validate(json.loads((path / "policy.json").read_text()))
    monkeypatch.setattr(program_module, "MAX_ARCHIVE_BYTES", 10_000)
    with pytest.raises(ProgramRefused, match="larger than 10000 bytes"):
        read_program((path / "deterministic.pt2").read_bytes(), spec)


def test_a_hostile_upload_is_refused_and_changes_nothing(served, exported, tmp_path):
    path = exported["multi_discrete"]
    spec_raw = (path / "policy.json").read_bytes()
    marker = tmp_path / "ran"
    model_dir = Path(served.app.state.settings.model_dir)
    before = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*"))
    listed = served.get("/v1/policies").json()
    for what, archive in _hostile((path / "deterministic.pt2").read_bytes(), marker).items():
        if what in ("guard code", "sample inputs"):
            continue
        files = [
            ("spec", ("policy.json", spec_raw, "application/json")),
            ("programs", ("deterministic.pt2", archive, "application/octet-stream")),
            ("programs", ("random.pt2", (path / "random.pt2").read_bytes(), "application/octet-stream")),
        ]
        r = served.post("/v1/policies/hostile/versions", files=files)
        assert r.status_code == 422 and "deterministic.pt2" in r.json()["detail"], (what, r.text)
    missing = served.post(
        "/v1/policies/hostile/versions",
        files=[("spec", ("policy.json", spec_raw, "application/json")),
               ("programs", ("deterministic.pt2", (path / "deterministic.pt2").read_bytes(), "x/y"))],
    )  # fmt: skip
    assert missing.status_code == 422 and "random.pt2" in missing.json()["detail"]
    assert not marker.exists()
    assert sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*")) == before
    assert served.get("/v1/policies").json() == listed


def test_neither_form_refuses_naming_both_reasons(tmp_path):
    from tensordict.nn import TensorDictModule, TensorDictSequential
    from torchrl.modules import MLP, LSTMModule, QValueModule

    mlp_before_lstm = TensorDictSequential(
        TensorDictModule(
            MLP(in_features=4, out_features=8, num_cells=[]), in_keys=["observation"], out_keys=["x"]
        ),
        LSTMModule(input_size=8, hidden_size=8, in_key="x", out_key="y"),
        TensorDictModule(
            MLP(in_features=8, out_features=2, num_cells=[]), in_keys=["y"], out_keys=["action_value"]
        ),
        QValueModule(spec=Categorical(2)),
    )
    with pytest.raises(ValueError) as info:
        export_policy(
            mlp_before_lstm,
            tmp_path / "x",
            observation_spec={"observation": Unbounded(shape=(4,))},
            action_spec=Categorical(2),
            state_spec={
                "recurrent_state_h": Unbounded(shape=(1, 8)),
                "recurrent_state_c": Unbounded(shape=(1, 8)),
            },
        )
    assert "head" in str(info.value) and "exported program" in str(info.value)
    assert not (tmp_path / "x").exists()


def test_a_refused_version_on_disk_is_listed_with_its_reason(exported, tmp_path):
    path = exported["multi_discrete"]
    good = tmp_path / "models" / "md" / "1"
    bad = tmp_path / "models" / "md" / "2"
    for target in (good, bad):
        target.mkdir(parents=True)
        for f in ("policy.json", "deterministic.pt2", "random.pt2"):
            (target / f).write_bytes((path / f).read_bytes())
    marker = tmp_path / "ran"
    (bad / "random.pt2").write_bytes(_hostile((path / "random.pt2").read_bytes(), marker)["pickled weight"])
    settings = Settings(
        model_dir=tmp_path / "models", data_dir=tmp_path / "var", registry_poll_s=0, embedded_worker=False
    )
    with TestClient(create_app(settings)) as c:
        detail = c.get("/v1/policies/md").json()
        errors = {d["version"]: d["error"] for d in detail["version_details"]}
        assert errors[1] is None and "random.pt2" in errors[2] and "pickled payload" in errors[2]
        assert detail["default_version"] == 1
        assert c.post("/v1/policies/md/act", json={"observation": [0.0] * 4}).status_code == 200
    assert not marker.exists()


class _Counting(torch.nn.Module):
    """Answers differently on every call (a Python counter): what tracing bakes in as a
    constant is not what the module answers next."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x) * self.calls


def test_export_refuses_a_program_that_would_answer_differently(tmp_path):
    from tensordict.nn import TensorDictModule, TensorDictSequential
    from torchrl.modules import QValueModule

    policy = TensorDictSequential(
        TensorDictModule(_Counting(), in_keys=["observation"], out_keys=["action_value"]),
        QValueModule(spec=Categorical(2)),
    )
    with pytest.raises(ValueError, match="answer 'action_value' differently"):
        export_policy(
            policy,
            tmp_path / "x",
            observation_spec=Unbounded(shape=(4,)),
            action_spec=Categorical(2),
            form="program",
        )
    assert not (tmp_path / "x").exists()
