"""The peers, side by side with ours: the same weights served by TorchServe, Triton (through
PyTriton), LitServe, Ray Serve and MLServer, each in its own environment
(``bash benchmarks/peers/install.sh``), and by this server as ``make serve`` runs it.

Every server is started, checked to answer the same greedy action as the version's MLP for each
of ``--check`` observations (one a request; a server that disagrees on any is reported and not
measured), warmed up, then driven by wrk (``--connections``, ``--seconds``) with
``--obs-per-request`` CartPole observations a request, one server at a time, ``--rounds``
alternating rounds. Prints req/s, observations/s, p50 and p99 per server (medians over the
rounds) and ours / each peer.

    python -m benchmarks.peers.run [--peers torchserve,pytriton,litserve,rayserve,mlserver]
        [--seconds 8] [--connections 32] [--obs-per-request 1] [--rounds 1] [--check 200]

Each peer's configuration, and why, is in docs/performance.md ("The peers").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from benchmarks.peers.policy import greedy, load_mlp
from benchmarks.run import POLICY, ROOT, free_port, wrk

HERE = Path(__file__).resolve().parent
VENVS = ROOT / ".venv-peers"
VERSION_DIR = ROOT / "models" / POLICY / "1"
START_TIMEOUT_S = 240  # Ray and TorchServe (a JVM) take tens of seconds on two cores


@dataclass
class Server:
    """How to start one server and speak to it."""

    start: Callable[[Path, int], tuple[list[str], dict, Path]]  # (workdir, port) -> cmd, env, cwd
    path: str  # the act URL's path
    body: Callable[[list], dict]  # observations -> request body
    actions: Callable[[dict, int], list[int]]  # response JSON, observations -> actions
    venv: str | None = None  # .venv-peers/<venv>; None: ours


def _ours_json(obs: list) -> dict:
    return {"observation": obs[0]} if len(obs) == 1 else {"observations": obs}


def _ours_actions(reply: dict, n: int) -> list[int]:
    return [reply["action"]] if n == 1 and "action" in reply else reply["actions"]


def _oip_body(obs: list) -> dict:  # Open Inference Protocol (KServe v2) JSON
    flat = [x for o in obs for x in o]
    return {
        "inputs": [
            {"name": "observation", "shape": [len(obs), len(obs[0])], "datatype": "FP32", "data": flat}
        ]
    }


def _oip_actions(reply: dict, n: int) -> list[int]:
    return [int(a) for a in reply["outputs"][0]["data"]]


def _peer_python(venv: str) -> str:
    return str(VENVS / venv / "bin" / "python")


def _ours(workdir: Path, port: int):
    env = {
        "POLICY_SERVER_MODEL_DIR": str(ROOT / "models"),
        "POLICY_SERVER_GRPC_PORT": str(free_port()),
        "POLICY_SERVER_EMBEDDED_WORKER": "false",
        "POLICY_SERVER_DATA_DIR": str(workdir),
        "POLICY_SERVER_REGISTRY_POLL_S": "0",
    }
    return [sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env, ROOT


def _torchserve(workdir: Path, port: int):
    store = workdir / "model-store"
    store.mkdir()
    archiver = VENVS / "torchserve" / "bin" / "torch-model-archiver"
    extra = ",".join(
        str(p) for p in (HERE / "policy.py", VERSION_DIR / "policy.json", VERSION_DIR / "weights.safetensors")
    )
    subprocess.run(
        [
            str(archiver),
            "--model-name",
            "cartpole",
            "--version",
            "1.0",
            "--handler",
            str(HERE / "torchserve_handler.py"),
            "--extra-files",
            extra,
            "--export-path",
            str(store),
        ],
        check=True,
    )
    models = {
        "cartpole": {
            "1.0": {
                "defaultVersion": True,
                "marName": "cartpole.mar",
                "minWorkers": 1,
                "maxWorkers": 1,
                # TorchServe batches nothing by default (batchSize 1): 64 requests or 1 ms
                "batchSize": 64,
                "maxBatchDelay": 1,
                "responseTimeout": 60,
            }
        }
    }
    (workdir / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{port}\n"
        f"management_address=http://127.0.0.1:{free_port()}\n"
        f"metrics_address=http://127.0.0.1:{free_port()}\n"
        f"model_store={store}\nload_models=cartpole.mar\n"
        f"models={json.dumps(models)}\n"
        "disable_token_authorization=true\ninstall_py_dep_per_model=false\n"
        "async_logging=true\ndisable_system_metrics=true\n"
    )
    ts = VENVS / "torchserve" / "bin" / "torchserve"
    cmd = [
        str(ts),
        "--start",
        "--foreground",
        "--ncs",
        "--disable-token-auth",
        "--ts-config",
        str(workdir / "config.properties"),
        "--model-store",
        str(store),
    ]
    return cmd, {"PATH": f"{VENVS / 'torchserve' / 'bin'}:{os.environ['PATH']}"}, workdir


def _pytriton(workdir: Path, port: int):
    cmd = [_peer_python("pytriton"), str(HERE / "pytriton_server.py"), str(VERSION_DIR), str(port)]
    # Triton's Python-backend stub links libpython3.11.so: the one of the Python that runs the
    # model's code, not another on the loader's path (a distribution's older 3.11 fails in the
    # stub's multiprocessing)
    env = {
        "LD_LIBRARY_PATH": ":".join(
            filter(None, [sysconfig.get_config_var("LIBDIR"), os.environ.get("LD_LIBRARY_PATH")])
        )
    }
    return [*cmd, str(free_port()), str(free_port())], env, workdir


def _litserve(workdir: Path, port: int):
    return (
        [_peer_python("litserve"), str(HERE / "litserve_server.py"), str(VERSION_DIR), str(port)],
        {},
        workdir,
    )


def _rayserve(workdir: Path, port: int):
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_LOG_TO_STDERR": "0"}
    return (
        [_peer_python("rayserve"), str(HERE / "rayserve_server.py"), str(VERSION_DIR), str(port)],
        env,
        workdir,
    )


def _mlserver(workdir: Path, port: int):
    model = workdir / "cartpole"
    model.mkdir()
    (model / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "cartpole",
                "implementation": "mlserver_runtime.PolicyModel",
                # adaptive batching is off by default (max_batch_size 0): 64 requests or 1 ms
                "max_batch_size": 64,
                "max_batch_time": 0.001,
                "parameters": {"uri": str(VERSION_DIR)},
            }
        )
    )
    (workdir / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": port,
                "grpc_port": free_port(),
                "metrics_port": free_port(),
                # the model in the server's own process: with the default (1 inference worker
                # process) MLServer 1.7.1's worker fails to start here ("There is no current
                # event loop in thread 'MainThread'"); MLSERVER_PARALLEL_WORKERS=1 shows it
                "parallel_workers": int(os.environ.get("MLSERVER_PARALLEL_WORKERS", "0")),
                "debug": False,
            }
        )
    )
    env = {"PYTHONPATH": str(HERE)}
    return [str(VENVS / "mlserver" / "bin" / "mlserver"), "start", str(workdir)], env, workdir


SERVERS: dict[str, Server] = {
    "ours": Server(_ours, f"/v1/policies/{POLICY}/act", _ours_json, _ours_actions),
    "torchserve": Server(_torchserve, "/predictions/cartpole", _ours_json, _ours_actions, "torchserve"),
    "pytriton": Server(_pytriton, "/v2/models/cartpole/infer", _oip_body, _oip_actions, "pytriton"),
    "litserve": Server(_litserve, "/predict", _ours_json, _ours_actions, "litserve"),
    "rayserve": Server(_rayserve, "/", _ours_json, _ours_actions, "rayserve"),
    "mlserver": Server(_mlserver, "/v2/models/cartpole/infer", _oip_body, _oip_actions, "mlserver"),
}


def installed(name: str) -> bool:
    venv = SERVERS[name].venv
    return venv is None or (VENVS / venv / ".installed").exists()


def observations(n: int, seed: int = 0) -> list[list[float]]:
    """``n`` CartPole-like observations (positions, velocities, angles within its ranges)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([2.0, 2.0, 0.2, 2.0])
    return ((torch.rand(n, 4, generator=g) * 2 - 1) * scale).tolist()


def disagreements(
    ask: Callable[[list], list[int]], obs: list[list[float]], reference: list[int]
) -> list[int]:
    """Indices of the observations whose served action (asked one a request) is not the reference's."""
    return [i for i, (o, a) in enumerate(zip(obs, reference, strict=True)) if ask([o]) != [a]]


class Running:
    """One server, started in its own process group (TorchServe's JVM, Ray's raylets and
    MLServer's workers go down with it)."""

    def __init__(self, name: str, port: int) -> None:
        self.name, self.port, self.server = name, port, SERVERS[name]
        self.workdir = Path(tempfile.mkdtemp(prefix=f"peer-{name}-"))
        cmd, env, cwd = self.server.start(self.workdir, port)
        self.log = open(self.workdir / "server.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            cwd=cwd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def ask(self, obs: list) -> list[int]:
        r = self.client.post(self.server.path, json=self.server.body(obs))
        r.raise_for_status()
        return self.server.actions(r.json(), len(obs))

    def wait(self, probe: list) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}); see {self.workdir}/server.log"
                )
            try:
                self.ask([probe])
                return
            except (httpx.HTTPError, KeyError, ValueError):
                time.sleep(0.5)
        raise RuntimeError(
            f"{self.name} did not answer within {START_TIMEOUT_S} s; see {self.workdir}/server.log"
        )

    def stop(self) -> None:
        self.client.close()
        if self.name == "torchserve":  # its --foreground JVM stops cleanly on --stop
            subprocess.run([str(VENVS / "torchserve" / "bin" / "torchserve"), "--stop"], capture_output=True)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(20)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        self.log.close()


def measure(name: str, args: argparse.Namespace, obs: list, reference: list[int]) -> dict:
    port = free_port()
    run = Running(name, port)
    try:
        run.wait(obs[0])
        wrong = disagreements(run.ask, obs, reference)
        if wrong:
            return {"error": f"{len(wrong)} of {len(obs)} actions differ from the MLP's (first: #{wrong[0]})"}
        batch = observations(args.obs_per_request, seed=1)
        if run.ask(batch) != greedy(load_mlp(VERSION_DIR), batch):
            return {"error": f"a request of {len(batch)} observations answered other actions"}
        url = f"http://127.0.0.1:{port}{run.server.path}"
        body = run.server.body(batch)
        wrk(url, body, 2, args.connections)  # warm-up
        return wrk(url, body, args.seconds, args.connections)
    except RuntimeError as exc:
        return {"error": str(exc)}
    finally:
        run.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", default="torchserve,pytriton,litserve,rayserve,mlserver")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--obs-per-request", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--check", type=int, default=200)
    args = ap.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    missing = [p for p in peers if p not in SERVERS or not installed(p)]
    for p in missing:
        print(f"{p}: not installed (bash benchmarks/peers/install.sh {p}); skipped", file=sys.stderr)
    names = ["ours", *(p for p in peers if p not in missing)]
    if len(names) == 1:
        print("no peer installed: make bench-peers installs them all", file=sys.stderr)
        return
    obs = observations(args.check)
    reference = greedy(load_mlp(VERSION_DIR), obs)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            results[name].append(measure(name, args, obs, reference))
            print(f"  {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    print(
        f"wrk: {args.connections} connections, {args.seconds} s, {args.obs_per_request} observation(s) "
        f"a request, policy {POLICY}, {args.rounds} round(s) (medians); every server checked on "
        f"{args.check} observations"
    )
    print(
        f"{'server':11} {'req/s':>9} {'obs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'ours/it':>8}"
    )
    ok = {n: [r for r in rs if "error" not in r] for n, rs in results.items()}
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in ok.items() if rs}
    for name in names:
        if name not in med:
            print(f"{name:11} {results[name][-1]['error']}")
            continue
        m = med[name]
        ratio = med["ours"]["rps"] / m["rps"] if "ours" in med else float("nan")
        print(
            f"{name:11} {m['rps']:9.0f} {m['rps'] * args.obs_per_request:9.0f} {m['p50_ms']:8.2f} "
            f"{m['p99_ms']:8.2f} {m['errors']:8.0f} {ratio:8.2f}"
        )


if __name__ == "__main__":
    main()
