"""HTTP clients of the policy server: ``PolicyClient`` (blocking) and ``AsyncPolicyClient``.

They need httpx only (numpy when you pass numpy arrays; websockets for ``stream``; tqdm for a
progress bar): no torch. Calls that get 429 or 503 are retried with backoff, honouring
``Retry-After``; any other error raises :class:`PolicyServerError` carrying the server's
``detail``. Numpy arrays of ``BINARY_MIN_BYTES`` or more are sent in the raw-bytes form
``{b64, dtype, shape}``; smaller ones as JSON numbers.

Example:
    >>> with PolicyClient("http://localhost:8000") as client:           # doctest: +SKIP
    ...     client.act("cartpole-dqn", [0.01, 0.0, 0.03, 0.0]).action
    1
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BINARY_MIN_BYTES = 1024
RETRY_STATUSES = (429, 503)
FINISHED = ("succeeded", "failed", "cancelled")


class PolicyServerError(Exception):
    """A refused call: ``status`` (HTTP) and ``detail`` (the server's sentence, or its list of
    validation errors)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass
class ActResult:
    """One act answer: ``action`` (single) or ``actions`` (batch), and what came with it."""

    policy: str
    version: int
    exploration: str
    action: Any = None
    actions: list | None = None
    info: Any = None
    step: int | None = None  # sessions: steps taken so far
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, body: dict) -> ActResult:
        keys = ("policy", "version", "exploration", "action", "actions", "info", "step")
        return cls(**{k: body.get(k) for k in keys}, raw=body)


@dataclass
class Job:
    job_id: str
    status: str
    progress: dict | None
    result: dict | None
    error: str | None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, body: dict) -> Job:
        return cls(
            body["job_id"], body["status"], body.get("progress"), body.get("result"), body.get("error"), body
        )

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def encode_observation(obs: Any) -> Any:
    """An observation as the server reads it: numpy arrays of ``BINARY_MIN_BYTES`` or more as
    raw bytes, smaller ones as lists; numpy scalars as numbers; dicts entry by entry."""
    if isinstance(obs, dict):
        return {k: encode_observation(v) for k, v in obs.items()}
    if type(obs).__module__ == "numpy":
        import numpy as np

        array = np.asarray(obs)
        if array.ndim == 0:
            return array.item()
        if array.nbytes >= BINARY_MIN_BYTES and array.dtype in (np.uint8, np.float32):
            data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
            return {
                "b64": base64.b64encode(data.tobytes()).decode(),
                "dtype": str(array.dtype),
                "shape": list(array.shape),
            }
        return array.tolist()
    return obs


def _act_body(
    observation: Any = None,
    observations: list | None = None,
    *,
    action_mask: Any = None,
    action_masks: Any = None,
    **options: Any,
) -> dict:
    body: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    if observations is not None:
        body["observations"] = [encode_observation(o) for o in observations]
    else:
        body["observation"] = encode_observation(observation)
    if action_mask is not None:
        body["action_mask"] = [bool(x) for x in action_mask]
    if action_masks is not None:
        body["action_masks"] = [[bool(x) for x in m] for m in action_masks]
    return body


def _retry_after(response: httpx.Response, attempt: int) -> float:
    header = response.headers.get("retry-after")
    try:
        return max(0.0, float(header)) if header is not None else min(0.2 * 2**attempt, 10.0)
    except ValueError:
        return min(0.2 * 2**attempt, 10.0)


def _answer(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            body = response.json()
            detail = body.get("detail", body.get("error"))  # /v1's {"detail"}, /v2's {"error"}
        except (ValueError, AttributeError):
            detail = response.text
        raise PolicyServerError(response.status_code, detail)
    if response.status_code == 204 or not response.content:
        return None
    return response.json()


class PolicyClient:
    """A blocking client. ``api_key`` is sent as a bearer token; ``retries`` is how many times a
    429/503 answer is retried (waiting ``Retry-After``, else an exponential backoff)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.retries = retries
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer of a call (None for an empty one), retried on 429/503."""
        return _answer(self._send(method, path, **kwargs))

    def raw_request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The response itself (its bytes and headers: binary protocols), retried and checked
        as ``request`` does."""
        response = self._send(method, path, **kwargs)
        if response.status_code >= 400:
            _answer(response)  # raises PolicyServerError with the server's sentence
        return response

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = self._http.request(method, path, **kwargs)
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                self._sleep(_retry_after(response, attempt))
                continue
            return response
        raise AssertionError("unreachable")

    # -- policies -------------------------------------------------------------------------------
    def policies(self) -> list[dict]:
        return self.request("GET", "/v1/policies")["policies"]

    def policy(self, name: str) -> dict:
        return self.request("GET", f"/v1/policies/{name}")

    def upload(self, name: str, path: str | Path) -> int:
        """Publish the directory ``export_policy`` wrote as a new version (policy.json and its
        weights, or its PT2 archives); returns the version."""
        folder = Path(path)
        spec = (folder / "policy.json").read_bytes()
        files: list = [("spec", ("policy.json", spec, "application/json"))]
        program = json.loads(spec).get("program")
        if program:
            for filename in program["files"].values():
                data = (folder / filename).read_bytes()
                files.append(("programs", (filename, data, "application/octet-stream")))
        else:
            data = (folder / "weights.safetensors").read_bytes()
            files.append(("weights", ("weights.safetensors", data, "application/octet-stream")))
        return self.request("POST", f"/v1/policies/{name}/versions", files=files)["version"]

    def download(self, name: str, version: int, format: str = "onnx", path: str | Path | None = None) -> Path:
        """Export a version (``onnx`` for onnxruntime, ``pt2`` for ``torch.export.load``) into
        ``path`` (default: ``<name>-v<version>.<format>`` here); returns the path written."""
        response = self.raw_request(
            "GET", f"/v1/policies/{name}/versions/{version}/export", params={"format": format}
        )
        target = Path(path) if path is not None else Path(f"{name}-v{version}.{format}")
        target.write_bytes(response.content)
        return target

    def set_default(self, name: str, version: int) -> dict:
        return self.request("PUT", f"/v1/policies/{name}/default", json={"version": version})

    def delete_version(self, name: str, version: int) -> None:
        self.request("DELETE", f"/v1/policies/{name}/versions/{version}")

    # -- acting ---------------------------------------------------------------------------------
    def act(self, policy: str, observation: Any, **options: Any) -> ActResult:
        """One observation; options: ``version``, ``exploration``, ``epsilon``, ``noise_std``,
        ``seed``, ``return_info``, ``action_mask``."""
        return ActResult.of(
            self.request("POST", f"/v1/policies/{policy}/act", json=_act_body(observation, **options))
        )

    def act_batch(self, policy: str, observations: list, **options: Any) -> ActResult:
        """A batch; ``action_masks`` one per observation."""
        body = _act_body(observations=observations, **options)
        return ActResult.of(self.request("POST", f"/v1/policies/{policy}/act", json=body))

    def policy_fn(self, policy: str, **options: Any) -> Callable[[Any], Any]:
        """``obs -> action`` for your own loop (stateless: a recurrent policy starts an episode
        at every call; use ``session(...).policy_fn()`` to carry its state)."""
        return lambda obs: self.act(policy, obs, **options).action

    def rollout(self, policy: str, **options: Any) -> dict:
        return self.request("POST", f"/v1/policies/{policy}/rollout", json=options)

    def envs(self) -> list[dict]:
        return self.request("GET", "/v1/envs")["envs"]

    # -- sessions -------------------------------------------------------------------------------
    @contextmanager
    def session(self, policy: str | None = None, **options: Any) -> Iterator[Session]:
        """A session (deleted on exit) of a served ``policy``, or with ``job=job_id`` of a job that
        learns from sessions (then ``step`` takes ``reward``, ``terminated``, ``truncated``);
        options: ``version``, ``num_envs``, ``exploration``, ``epsilon``, ``noise_std``, ``ttl_s``."""
        body = self.request(
            "POST", "/v1/sessions", json={**({"policy": policy} if policy else {}), **options}
        )
        session = Session(self, body)
        try:
            yield session
        finally:
            try:
                self.request("DELETE", f"/v1/sessions/{session.session_id}")
            except PolicyServerError as exc:
                if exc.status != 404:
                    raise

    # -- jobs -----------------------------------------------------------------------------------
    def submit_job(self, **request: Any) -> Job:
        """``algorithm``, ``env_id``, ``policy_name``, ``total_frames``, ``recurrent``, ``seed``,
        ``device``, ``hyperparameters``; or ``source="sessions"`` with ``observation``, ``action``
        and optionally ``experience_from`` (earlier such jobs' ids) instead of ``env_id``."""
        body = self.request("POST", "/v1/jobs", json=request)
        return self.job(body["job_id"])

    def job(self, job_id: str) -> Job:
        return Job.of(self.request("GET", f"/v1/jobs/{job_id}"))

    def job_metrics(self, job_id: str) -> list[dict]:
        return self.request("GET", f"/v1/jobs/{job_id}/metrics")["points"]

    def cancel_job(self, job_id: str) -> None:
        self.request("POST", f"/v1/jobs/{job_id}/cancel")

    def resume_job(self, job_id: str) -> Job:
        """Queue a failed ``source="sessions"`` job again (it continues where it was)."""
        return Job.of(self.request("POST", f"/v1/jobs/{job_id}/resume"))

    def wait_job(
        self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None, progress: bool = True
    ) -> Job:
        """Poll until the job finishes; a tqdm bar of frames (and the mean return) when tqdm is
        installed and ``progress``."""
        bar = _progress_bar(progress)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                job = self.job(job_id)
                _update_bar(bar, job)
                if job.finished:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job.status} after {timeout_s} s")
                self._sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()


class Session:
    """A server-held session: ``step`` sends an observation (one per env) and returns the
    answer; ``reset`` starts new episodes; ``stream`` steps over the WebSocket."""

    def __init__(self, client: PolicyClient, body: dict) -> None:
        self.client = client
        self.session_id: str = body["session_id"]
        self.policy: str = body["policy"]
        self.version: int = body["version"]
        self.num_envs: int = body["num_envs"]

    def step(
        self, observation: Any = None, *, observations: list | None = None, reset: Any = None, **options: Any
    ) -> ActResult:
        body = _act_body(observation, observations, reset=reset, **options)
        return ActResult.of(self.client.request("POST", f"/v1/sessions/{self.session_id}/act", json=body))

    def reset(self) -> None:
        self.client.request("POST", f"/v1/sessions/{self.session_id}/reset")

    def info(self) -> dict:
        return self.client.request("GET", f"/v1/sessions/{self.session_id}")

    def policy_fn(self, **options: Any) -> Callable[..., Any]:
        """``(obs, reset=False) -> action`` carrying the recurrent state between calls."""
        return lambda obs, reset=False: self.step(obs, reset=reset, **options).action

    @contextmanager
    def stream(self) -> Iterator[Callable[..., ActResult]]:
        """Step over the WebSocket: yields ``send(observation, **options) -> ActResult``."""
        from websockets.sync.client import connect

        url = self.client.base_url.replace("http", "ws", 1) + f"/v1/sessions/{self.session_id}/stream"
        headers = {"Authorization": f"Bearer {self.client.api_key}"} if self.client.api_key else None
        with connect(url, additional_headers=headers, max_size=None) as ws:

            def send(observation: Any = None, **options: Any) -> ActResult:
                ws.send(json.dumps(_act_body(observation, **options)))
                body = json.loads(ws.recv())
                if "detail" in body and "action" not in body and "actions" not in body:
                    raise PolicyServerError(body.get("status", 422), body["detail"])
                return ActResult.of(body)

            yield send


class AsyncPolicyClient:
    """The asyncio twin of :class:`PolicyClient` (act, sessions, rollouts, jobs)."""

    def __init__(
        self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0, retries: int = 5
    ) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncPolicyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        for attempt in range(self.retries + 1):
            response = await self._http.request(method, path, **kwargs)
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                await asyncio.sleep(_retry_after(response, attempt))
                continue
            return _answer(response)
        raise AssertionError("unreachable")

    async def act(self, policy: str, observation: Any, **options: Any) -> ActResult:
        body = _act_body(observation, **options)
        return ActResult.of(await self.request("POST", f"/v1/policies/{policy}/act", json=body))

    async def act_batch(self, policy: str, observations: list, **options: Any) -> ActResult:
        body = _act_body(observations=observations, **options)
        return ActResult.of(await self.request("POST", f"/v1/policies/{policy}/act", json=body))

    async def create_session(self, policy: str, **options: Any) -> str:
        return (await self.request("POST", "/v1/sessions", json={"policy": policy, **options}))["session_id"]

    async def step(self, session_id: str, observation: Any = None, **options: Any) -> ActResult:
        body = _act_body(observation, **options)
        return ActResult.of(await self.request("POST", f"/v1/sessions/{session_id}/act", json=body))

    async def delete_session(self, session_id: str) -> None:
        await self.request("DELETE", f"/v1/sessions/{session_id}")

    async def rollout(self, policy: str, **options: Any) -> dict:
        return await self.request("POST", f"/v1/policies/{policy}/rollout", json=options)

    async def submit_job(self, **request: Any) -> Job:
        body = await self.request("POST", "/v1/jobs", json=request)
        return Job.of(await self.request("GET", f"/v1/jobs/{body['job_id']}"))

    async def job(self, job_id: str) -> Job:
        return Job.of(await self.request("GET", f"/v1/jobs/{job_id}"))

    async def wait_job(self, job_id: str, *, poll_s: float = 1.0) -> Job:
        while not (job := await self.job(job_id)).finished:
            await asyncio.sleep(poll_s)
        return job


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=None, unit="frame")


def _update_bar(bar, job: Job) -> None:
    if bar is None or not job.progress:
        return
    p = job.progress
    if p.get("total_frames") and bar.total != p["total_frames"]:
        bar.total = p["total_frames"]
    bar.n = p.get("frames") or 0
    if p.get("mean_return") is not None:
        bar.set_postfix(mean_return=round(p["mean_return"], 2), status=job.status, refresh=False)
    bar.refresh()
