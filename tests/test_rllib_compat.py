"""RLlib ``PolicyClient`` (``inference_mode="remote"``) against ``POST /rllib/{policy}``: the exact
bytes the client sends (its command enum pickled under RLlib's module paths by stand-ins, numpy
arrays as numpy 2 and numpy 1 write them), episodes on a served policy and on a
``source: sessions`` job, the local-mode commands refused, the compatibility off by default,
and hostile pickles refused with nothing run."""

from __future__ import annotations

import contextlib
import enum
import os
import pickle
import sys
import types

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.rllib_wire import Command, loads
from service.errors import Unreadable
from service.main import create_app
from service.training.experience import ExperienceDir
from tests.helpers import LiveServer
from tests.test_learn_from_clients import client_job
from tests.test_open_inference import SHIPPED


def _stand_in(module: str, cls_name: str) -> type[enum.Enum]:
    """RLlib's command enum under its own module path (ray is not installed here), so pickle
    writes what the real client writes."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    members = {c.name: c.value for c in Command}
    cls = enum.Enum(cls_name, members, module=module)
    setattr(sys.modules[module], cls_name, cls)
    return cls


RLlink = _stand_in("ray.rllib.env.external.rllink", "RLlink")  # ray 2.60
Commands = _stand_in("ray.rllib.env.policy_client", "Commands")  # older ray


def send(post, url: str, data: dict) -> object:
    """``PolicyClient._send``: pickle (cloudpickle's protocol 5), POST, unpickle the answer."""
    r = post(url, content=pickle.dumps(data, protocol=5))
    assert r.status_code == 200, r.text
    return pickle.loads(r.content)


@contextlib.contextmanager
def pickled_by_name():
    """The enum pickled as ``getattr(RLlink, name)`` (newer Pythons) instead of ``RLlink(value)``."""
    RLlink.__reduce_ex__ = lambda self, proto: (getattr, (type(self), self.name))
    try:
        yield
    finally:
        del RLlink.__reduce_ex__


def numpy1(payload: object) -> bytes:
    """What a numpy 1.x client writes: protocol 2, ``numpy.core.multiarray._reconstruct``."""
    return pickle.dumps(payload, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def test_the_messages_of_every_client_generation_are_read():
    obs = np.array([0.01, -0.02, 0.03, 0.04], np.float32)
    bodies = [
        pickle.dumps({"command": c, "observation": obs, "episode_id": "e"}, protocol=5)
        for c in (RLlink.GET_ACTION, Commands.GET_ACTION)
    ]
    with pickled_by_name():
        bodies.append(
            pickle.dumps({"command": RLlink.GET_ACTION, "observation": obs, "episode_id": "e"}, protocol=5)
        )
    assert b"getattr" in bodies[-1]
    for body in bodies:
        message = loads(body)
        assert message["command"] is Command.GET_ACTION and message["episode_id"] == "e"
        np.testing.assert_array_equal(message["observation"], obs)
    old = loads(
        numpy1({"command": Commands.LOG_RETURNS, "reward": np.float64(1.5), "obs": obs.astype(">f8")})
    )
    assert old["reward"] == 1.5 and old["obs"].dtype == np.dtype(">f8")
    np.testing.assert_allclose(old["obs"], obs, rtol=1e-6)
    mixed = loads(
        pickle.dumps(
            {"command": RLlink.LOG_ACTION, "action": np.int64(1), "info": {"k": [1, (2.0, None)], "s": {3}}},
            protocol=4,
        )
    )
    assert mixed["action"] == 1 and mixed["info"] == {"k": [1, (2.0, None)], "s": {3}}


class _Evil:
    def __init__(self, reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(
            lambda m: {"command": RLlink.GET_ACTION, "x": _Evil((os.system, (f"touch {m}",)))}, id="os.system"
        ),
        pytest.param(lambda m: {"command": _Evil((eval, (f"open({str(m)!r}, 'w')",)))}, id="eval"),
        pytest.param(lambda m: {"command": _Evil((getattr, (RLlink, "__class__")))}, id="getattr-dunder"),
        pytest.param(
            lambda m: {"command": _Evil((getattr, (_Evil((getattr, (RLlink, "__init__"))), "__globals__")))},
            id="getattr-chain",
        ),
        pytest.param(lambda m: {"command": _Evil((np.zeros, (10**12,)))}, id="numpy-zeros"),
        pytest.param(lambda m: {"command": _Evil((np.ndarray, ((10**6, 10**6),)))}, id="ndarray-new"),
        pytest.param(
            lambda m: {
                "command": RLlink.GET_ACTION,
                "o": _Evil((np._core.numeric._frombuffer, (b"", np.dtype("f8"), (10**11,), "C"))),
            },
            id="frombuffer-huge",
        ),
        pytest.param(
            lambda m: {"command": RLlink.GET_ACTION, "o": np.array([object(), 1], dtype=object)},
            id="object-array",
        ),
        pytest.param(lambda m: [RLlink.GET_ACTION], id="not-a-dict"),
    ],
)
def test_hostile_pickles_are_refused_and_run_nothing(tmp_path, payload):
    marker = tmp_path / "ran"
    body = pickle.dumps(payload(marker), protocol=5)
    with pytest.raises(Unreadable):
        loads(body)
    assert not marker.exists()


def test_hand_made_hostile_opcodes_are_refused():
    bodies = [
        b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.",  # GLOBAL posix.system
        b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00cbuiltins\n__import__\n.",  # a bare callable
        # BUILD on our own enum member (would rewrite it for every later request)
        pickle.dumps(RLlink.GET_ACTION, protocol=4)[:-1] + b"}\x8c\x06_value_\x8c\x01xsb.",
        b"\x80\x04cnumpy\nndarray\n)\x81.",  # NEWOBJ ndarray
        b"\x80\x04]r\xff\xff\xff\xff.",  # LONG_BINPUT far past the body: no memo table is allocated
        b"\x80\x05\x95\xff\xff\xff\xff\xff\x00\x00\x00.",  # a frame longer than the body
        b"\x80\x05\x8e\xff\xff\xff\xff\xff\x00\x00\x00",  # BINBYTES8 past the body
        b"\x80\x04" + b"(" * 100_000 + b".",  # marks without end
        b"",
    ]
    for body in bodies:
        with pytest.raises(Unreadable):
            loads(body)
    assert Command.GET_ACTION.value == "GET_ACTION"


@pytest.fixture()
def rllib_client(settings):
    settings.rllib_compat = True
    with TestClient(create_app(settings)) as c:
        yield c


def test_an_episode_on_a_served_policy_answers_what_v1_act_answers(rllib_client):
    """An episode on a recurrent policy: the server keeps its LSTM state, as a /v1 session
    stepping the same observations does."""
    c = rllib_client
    url = "/rllib/q-lstm"
    episode = send(
        c.post, url, {"command": RLlink.START_EPISODE, "episode_id": None, "training_enabled": True}
    )
    episode_id = episode["episode_id"]
    sid = c.post("/v1/sessions", json={"policy": "q-lstm"}).json()["session_id"]
    rng = np.random.default_rng(3)
    actions = []
    for _ in range(12):
        obs = rng.normal(size=4).astype(np.float32)
        get = {"command": RLlink.GET_ACTION, "observation": obs, "episode_id": episode_id}
        action = send(c.post, url, get)["action"]
        v1 = c.post(f"/v1/sessions/{sid}/act", json={"observation": obs.tolist()}).json()["action"]
        assert action == v1 and isinstance(action, int)
        actions.append(action)
        log = {
            "command": RLlink.LOG_RETURNS,
            "reward": 1.0,
            "info": {},
            "episode_id": episode_id,
            "done": None,
        }
        assert send(c.post, url, log) == {}
    assert len(set(actions)) > 1
    assert (
        send(c.post, url, {"command": RLlink.END_EPISODE, "observation": obs, "episode_id": episode_id}) == {}
    )
    r = c.post(
        url,
        content=pickle.dumps({"command": RLlink.GET_ACTION, "observation": obs, "episode_id": episode_id}),
    )
    assert r.status_code == 404 and "start_episode" in r.json()["detail"]
    for command in (RLlink.GET_WORKER_ARGS, RLlink.GET_WEIGHTS, RLlink.REPORT_SAMPLES):
        r = c.post(url, content=pickle.dumps({"command": command}))
        assert r.status_code == 422 and 'inference_mode="remote"' in r.json()["detail"]
    r = c.post("/rllib/nope", content=pickle.dumps({"command": RLlink.START_EPISODE, "episode_id": None}))
    assert r.status_code == 404 and "neither a served policy nor a job" in r.json()["detail"]
    r = c.post(url, content=b"\x80\x02cposix\nsystem\n.")
    assert r.status_code == 400 and "posix.system is not read here" in r.json()["detail"]


def test_the_compatibility_is_off_by_default(client):
    r = client.post("/rllib/q", content=pickle.dumps({"command": RLlink.START_EPISODE, "episode_id": None}))
    assert r.status_code == 404 and "POLICY_SERVER_RLLIB_COMPAT" in r.json()["detail"]


def test_episodes_on_a_job_feed_it_rewards_actions_and_ends(rllib_client, settings):
    c = rllib_client
    job_id = client_job(c)
    url = f"/rllib/{job_id}"
    eid = send(
        c.post, url, {"command": RLlink.START_EPISODE, "episode_id": "ep-1", "training_enabled": True}
    )["episode_id"]
    assert eid == "ep-1"
    obs = [np.full(4, 0.01 * t, np.float32) for t in range(6)]
    send(c.post, url, {"command": RLlink.GET_ACTION, "observation": obs[0], "episode_id": eid})
    for reward in (0.5, 0.25):  # two reports for one action add up
        send(c.post, url, {"command": RLlink.LOG_RETURNS, "reward": reward, "episode_id": eid})
    send(
        c.post,
        url,
        {"command": RLlink.LOG_ACTION, "observation": obs[1], "action": np.int64(1), "episode_id": eid},
    )
    send(c.post, url, {"command": RLlink.LOG_RETURNS, "reward": 2.0, "episode_id": eid})
    send(c.post, url, {"command": RLlink.GET_ACTION, "observation": obs[2], "episode_id": eid})
    send(c.post, url, {"command": RLlink.LOG_RETURNS, "reward": 4.0, "episode_id": eid})
    send(c.post, url, {"command": RLlink.END_EPISODE, "observation": obs[3], "episode_id": eid})
    c.app.state.job_feeds.flush_all()
    data = torch.cat(ExperienceDir(settings.data_dir / "experience" / job_id).read_new())
    assert data["next", "reward"].flatten().tolist() == [0.75, 2.0, 4.0]
    assert data["action"].flatten().tolist()[1] == 1  # the action the client logged
    assert data["next", "terminated"].flatten().tolist() == [False, False, True]
    np.testing.assert_allclose(data["next", "observation"][-1].numpy(), obs[3])
    assert float(data["episode_return"][-1]) == pytest.approx(6.75)
    assert c.get(f"/v1/sessions/rllib:{job_id}:ep-1").status_code == 404  # ended: closed


def test_a_policy_client_reaches_a_real_server(tmp_path):
    live = LiveServer.serving(SHIPPED, tmp_path, rllib_compat="true")
    try:
        url = f"{live.url}/rllib/cartpole-dqn"
        eid = send(
            httpx.post, url, {"command": RLlink.START_EPISODE, "episode_id": None, "training_enabled": False}
        )["episode_id"]
        obs = np.array([0.02, 0.0, -0.03, 0.01], np.float32)
        action = send(httpx.post, url, {"command": RLlink.GET_ACTION, "observation": obs, "episode_id": eid})[
            "action"
        ]
        v1 = httpx.post(f"{live.url}/v1/policies/cartpole-dqn/act", json={"observation": obs.tolist()}).json()
        assert action == v1["action"]
        r = httpx.post(url, content=pickle.dumps({"command": _Evil((os.system, ("true",)))}, protocol=5))
        assert r.status_code == 400
        assert httpx.get(f"{live.url}/healthz").status_code == 200
    finally:
        live.stop()
