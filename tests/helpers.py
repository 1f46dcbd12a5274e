"""Test helpers: specs of every kind, policies written to a model repository, a live server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from service.registry.build import build_policy, weights_bytes
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``policy-server serve`` in a subprocess on a free port (a real uvicorn)."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
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
            ],
            env=full_env,
            cwd=cwd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(cwd / f'server-{self.port}.log').read_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready")

    @classmethod
    def serving(cls, model_dir: Path, root: Path, **settings: str) -> LiveServer:
        """A server of ``model_dir`` with its data under ``root/var``, no embedded worker, and
        ``settings`` as ``POLICY_SERVER_<NAME>`` variables."""
        env = {
            "POLICY_SERVER_MODEL_DIR": str(model_dir),
            "POLICY_SERVER_DATA_DIR": str(root / "var"),
            "POLICY_SERVER_EMBEDDED_WORKER": "false",
            **{f"POLICY_SERVER_{k.upper()}": v for k, v in settings.items()},
        }
        return cls(env, root)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
