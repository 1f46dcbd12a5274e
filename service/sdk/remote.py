"""``RemotePolicy``: a policy of the server as a TorchRL module, for a ``Collector``.

``Collector(env, RemotePolicy(url, "cartpole-dqn", action_spec=env.action_spec), …)`` collects
with the server's actions: each call sends the env batch in one request, under the collector's
exploration type (``torchrl.envs.utils.exploration_type()``; ``exploration=`` fixes one).

- A stateless policy is called through the Open Inference Protocol (``/v2/…/infer``, the
  observations as raw binary tensors, no JSON numbers): one request per env batch.
- A stateful one (an LSTM, stacked frames) steps a server session of as many envs as the batch
  has, ``is_init`` (TorchRL's ``InitTracker``) marking the envs whose episode starts; the server
  keeps the recurrent state, the tensordict carries none. The steps go over the session's
  WebSocket stream (``transport="ws"``, the default when ``websockets`` is installed) or a POST
  each (``"http"``). A batch of another size opens a new session. ``close()`` deletes it.

It writes ``action`` and ``policy_version`` (the version that answered) and keeps a ``spec`` of
both (the env's action spec when given, else one built from the policy's), so a collector
learns its outputs without probing it with a call at construction. Actions come
back in that spec's encoding (one-hot for a ``OneHot`` spec). Needs torch, tensordict and
torchrl besides httpx and numpy: import it from ``service.sdk.remote``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import orjson
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.data import Bounded, Categorical, Composite, OneHot, TensorSpec, Unbounded
from torchrl.envs.utils import ExplorationType, exploration_type

from service.sdk.client import PolicyClient, PolicyServerError, encode_observation

EXPLORATION = {
    ExplorationType.RANDOM: "random",
    ExplorationType.DETERMINISTIC: "deterministic",
    ExplorationType.MODE: "mode",
    ExplorationType.MEAN: "mean",
}
DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP64": np.float64,
}
HEADER = "Inference-Header-Content-Length"
# the version that answered, per row: TorchRL's key for the behaviour policy's version (its
# PolicyClientModule and PolicyVersion write it too)
VERSION = "policy_version"


class RemotePolicy(TensorDictModuleBase):
    """A served policy (``version``: the default when None) as a TensorDict module.

    Args:
        url: the server, e.g. ``http://localhost:8000``.
        policy: the policy's name.
        version: a version number; None takes the default at construction (and keeps it).
        action_spec: the env's action spec (its encoding is kept: one-hot, categorical, box);
            None builds one from the policy's spec.
        exploration: ``"random"`` / ``"deterministic"`` / ``"mode"`` / ``"mean"`` for every call;
            None follows the caller's (the collector's) exploration type.
        api_key: the bearer key, when the server protects inference.
        timeout: seconds per request.
        transport: how a stateful policy's session is stepped: ``"ws"`` (its WebSocket stream,
            one connection for the session's life), ``"http"`` (a POST per step), or
            ``"auto"``: the WebSocket when ``websockets`` is installed.
    """

    def __init__(
        self,
        url: str,
        policy: str,
        *,
        version: int | None = None,
        action_spec: TensorSpec | None = None,
        exploration: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: str = "auto",
    ) -> None:
        super().__init__()
        if transport not in ("auto", "ws", "http"):
            raise ValueError(f"transport must be 'auto', 'ws' or 'http', not {transport!r}")
        if transport == "auto":
            try:
                import websockets.sync.client  # noqa: F401
            except ImportError:
                transport = "http"
            else:
                transport = "ws"
        self.transport = transport
        self.timeout = timeout
        self.client = PolicyClient(url, api_key, timeout=timeout)
        self.policy = policy
        detail = self.client.policy(policy)
        self.version = version if version is not None else detail["default_version"]
        spec = next((d["spec"] for d in detail["version_details"] if d["version"] == self.version), None)
        if spec is None:
            raise PolicyServerError(404, f"policy {policy} has no served version {self.version}")
        path = f"/v2/models/{policy}/versions/{self.version}"
        meta = self.client.request("GET", path)
        self.stateful = "sequence_batching" in self.client.request("GET", f"{path}/config")
        self._inputs = {t["name"]: t for t in meta["inputs"]}
        observations = [name for name in self._inputs if name != "action_mask"]
        self.in_keys = observations + (["is_init"] if self.stateful else [])
        self.out_keys = ["action", VERSION]
        self._action = spec["action"]
        self.action_spec = action_spec if action_spec is not None else _action_spec(spec["action"])
        self.spec = Composite(action=self.action_spec, **{VERSION: Unbounded(shape=(), dtype=torch.int64)})
        self.exploration = exploration
        self._infer = f"{path}/infer"
        self._session: tuple[str, int] | None = None  # (id, num_envs)
        self._ws = None  # the session's WebSocket stream (transport "ws")

    # -- the call ---------------------------------------------------------------------------
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        batch = tuple(tensordict.batch_size)
        rows = math.prod(batch)
        explore = self.exploration or EXPLORATION.get(exploration_type())
        if self.stateful:
            actions = self._step(tensordict, rows, explore)
        else:
            actions = self._infer_batch(tensordict, rows, explore)
        tensordict.set("action", self._encode(actions, batch))
        tensordict.set(VERSION, torch.full(batch, self.version, dtype=torch.int64))
        return tensordict

    def _infer_batch(self, td: TensorDictBase, rows: int, explore: str | None) -> np.ndarray:
        """One ``/v2`` infer of the whole batch, inputs and the action as raw binary tensors."""
        inputs, blobs = [], []
        for name, t in self._inputs.items():
            if name == "action_mask" and name not in td.keys():
                continue
            array = np.ascontiguousarray(
                td.get(name).detach().cpu().numpy().astype(DTYPES[t["datatype"]], copy=False)
            ).reshape(rows, *t["shape"][1:])
            raw = array.tobytes()
            inputs.append(
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": t["datatype"],
                    "parameters": {"binary_data_size": len(raw)},
                }
            )
            blobs.append(raw)
        head: dict[str, Any] = {
            "inputs": inputs,
            "outputs": [{"name": "action", "parameters": {"binary_data": True}}],
        }
        if explore is not None:
            head["parameters"] = {"exploration": explore}
        header = orjson.dumps(head)
        response = self.client.raw_request(
            "POST", self._infer, content=header + b"".join(blobs), headers={HEADER: str(len(header))}
        )
        cut = int(response.headers[HEADER])
        answer = orjson.loads(response.content[:cut])
        out = answer["outputs"][0]
        return np.frombuffer(response.content[cut:], DTYPES[out["datatype"]]).reshape(out["shape"])

    def _step(self, td: TensorDictBase, rows: int, explore: str | None) -> np.ndarray:
        """One step of the server session (opened for ``rows`` envs on first use)."""
        if self._session is None or self._session[1] != rows:
            self.close_session()
            body = self.client.request(
                "POST",
                "/v1/sessions",
                json={"policy": self.policy, "version": self.version, "num_envs": rows},
            )
            self._session = (body["session_id"], rows)
            resets = [True] * rows
        elif "is_init" in td.keys():
            resets = td.get("is_init").reshape(rows).tolist()
        else:
            raise ValueError(
                f"{self.policy} is recurrent: the env must mark episode starts with is_init "
                "(add torchrl.envs.InitTracker() to it)"
            )
        names = [n for n in self._inputs if n != "action_mask"]
        # each row as the SDK sends it: large arrays (images) as raw bytes, small ones as lists
        parts = {
            n: td.get(n).detach().cpu().numpy().reshape(rows, *self._inputs[n]["shape"][1:]) for n in names
        }
        if names == ["observation"]:
            observations = [encode_observation(row) for row in parts["observation"]]
        else:
            observations = [{n: encode_observation(parts[n][i]) for n in names} for i in range(rows)]
        body: dict[str, Any] = {"observations": observations, "reset": resets}
        if "action_mask" in td.keys():
            body["action_masks"] = td.get("action_mask").reshape(rows, -1).tolist()
        if explore is not None:
            body["exploration"] = explore
        if self.transport == "ws":
            answer = self._stream_step(body)
        else:
            answer = self.client.request("POST", f"/v1/sessions/{self._session[0]}/act", json=body)
        return np.asarray(answer["actions"])

    def _stream_step(self, body: dict) -> dict:
        """One step over the session's WebSocket (opened on first use): a message out, its
        reply in; a refused step's reply is ``{"status", "detail"}``."""
        if self._ws is None:
            from websockets.sync.client import connect

            url = self.client.base_url.replace("http", "ws", 1) + f"/v1/sessions/{self._session[0]}/stream"
            key = self.client.api_key
            headers = {"Authorization": f"Bearer {key}"} if key else None
            self._ws_scope = contextlib.ExitStack()  # websockets wants connect() as a context
            self._ws = self._ws_scope.enter_context(
                connect(url, additional_headers=headers, max_size=None, open_timeout=self.timeout)
            )
        self._ws.send(orjson.dumps(body).decode())
        answer = orjson.loads(self._ws.recv(timeout=self.timeout))
        if "status" in answer and "actions" not in answer:
            raise PolicyServerError(answer["status"], answer.get("detail"))
        return answer

    def _encode(self, actions: np.ndarray, batch: tuple[int, ...]) -> torch.Tensor:
        """The server's actions in the action spec's encoding and shape."""
        spec = self.action_spec
        if self._action["type"] != "discrete":
            return torch.tensor(actions, dtype=spec.dtype).reshape(batch + tuple(self._action["shape"]))
        index = torch.tensor(actions, dtype=torch.int64).reshape(batch)
        if isinstance(spec, OneHot):
            return torch.nn.functional.one_hot(index, spec.space.n).to(spec.dtype)
        # a categorical spec, of one env (``()`` or ``(1,)``) or of the batch (``batch + …``)
        shape = tuple(spec.shape)
        event = shape[len(batch) :] if shape[: len(batch)] == batch else shape
        return index.reshape(batch + event).to(spec.dtype)

    # -- lifetime ---------------------------------------------------------------------------
    def close_session(self) -> None:
        if self._ws is not None:
            self._ws_scope.close()
            self._ws = None
        if self._session is not None:
            try:
                self.client.request("DELETE", f"/v1/sessions/{self._session[0]}")
            except PolicyServerError as exc:
                if exc.status != 404:
                    raise
            self._session = None

    def close(self) -> None:
        self.close_session()
        self.client.close()

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _action_spec(action: dict) -> TensorSpec:
    if action["type"] == "discrete":
        return Categorical(action["n"])
    return Bounded(
        low=torch.tensor(action["low"], dtype=torch.float32),
        high=torch.tensor(action["high"], dtype=torch.float32),
        shape=tuple(action["shape"]),
        dtype=torch.float32,
    )
