"""``make bench``: the act path against baselines, in one run, on this machine.

Starts five servers on loopback (ours as ``make serve`` runs it — on granian, its default HTTP
server —, and on uvicorn: the naive FastAPI endpoint, an empty FastAPI endpoint, the bare ASGI
app: the limit, and the floor: a raw ASGI app that only parses, batches and runs the same
network: what serving this policy costs at the least; ``benchmarks.http_servers`` compares all
three on both HTTP servers), drives each with
the same load (wrk when installed, else a Python load generator), and prints req/s, p50 and p99
side by side with the ratios. Then session steps over HTTP and over the WebSocket stream (vs a
bare WebSocket echo), and a batch of 1024 observations vs the policy called in-process.

    python -m benchmarks.run [--seconds 10] [--connections 32] [--workers 1]
    python -m benchmarks.run --stores [--rounds 3]   # only: LSTM session steps, memory vs Redis

Last (with wrk and redis-server installed), what ``--stores`` alone prints: 64 LSTM sessions
stepped by wrk on ``serve`` as a user runs it, its default HTTP server, with the memory store and
with ``SESSION_STORE=redis://`` (a ``redis-server`` on this machine), alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
POLICY = "cartpole-dqn"
OBS = [0.01, -0.02, 0.03, 0.04]
LSTM_POLICY, LSTM_OBS = "cartpole-lstm-dqn", [0.01, 0.03]  # CartPoleNoVel: positions only


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    cmd: list[str], env: dict, port: int, policy: str = POLICY, body: dict | None = None
) -> subprocess.Popen:
    """Start a server and wait until it answers an act call for ``policy``."""
    proc = subprocess.Popen(
        cmd, env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.post(
                f"http://127.0.0.1:{port}/v1/policies/{policy}/act",
                json=body or {"observation": OBS},
                timeout=5,
            )
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def wrk(url: str, body: dict, seconds: int, connections: int, paths: list[str] | None = None) -> dict:
    """wrk POSTing ``body`` to ``url``, or in turn to each of ``paths`` on its host."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = '{json.dumps(body)}'\n"
        )
        if paths:
            f.write(
                "local paths = {" + ", ".join(f'"{p}"' for p in paths) + "}\nlocal i = 0\n"
                "request = function()\n  i = i + 1\n"
                "  return wrk.format(nil, paths[(i % #paths) + 1])\nend\n"
            )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", f.name, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": pct("50"),
        "p99_ms": pct("99"),
        "errors": int(non2xx.group(1)) if non2xx else 0,
    }


async def pyload(url: str, body: dict, seconds: float, connections: int) -> dict:
    lat: list[float] = []
    stop = time.monotonic() + seconds

    async def worker(c: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            t = time.perf_counter()
            await c.post(url, json=body)
            lat.append(time.perf_counter() - t)

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=connections)) as c:
        start_t = time.monotonic()
        await asyncio.gather(*(worker(c) for _ in range(connections)))
        elapsed = time.monotonic() - start_t
    lat.sort()
    return {
        "rps": len(lat) / elapsed,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[int(len(lat) * 0.99)] * 1000,
        "errors": 0,
    }


def load(url: str, body: dict, seconds: int, connections: int) -> dict:
    if shutil.which("wrk"):
        return wrk(url, body, seconds, connections)
    return asyncio.run(pyload(url, body, seconds, connections))


def wrk_sessions(base: str, policy: str, n_sessions: int, seconds: int, connections: int) -> dict:
    """HTTP session steps of ``policy`` under wrk: ``n_sessions`` sessions stepped in turn."""
    with httpx.Client(base_url=base) as c:
        sids = [
            c.post("/v1/sessions", json={"policy": policy}).json()["session_id"] for _ in range(n_sessions)
        ]
    paths = [f"/v1/sessions/{s}/act" for s in sids]
    body = {"observation": LSTM_OBS}
    wrk(base + paths[0], body, 2, connections, paths)  # warm-up
    return wrk(base + paths[0], body, seconds, connections, paths)


async def ws_drive(urls: list[str], seconds: float) -> float:
    """Messages/s of one WebSocket client per URL, each sending an act body and awaiting the reply."""
    import websockets

    msg = json.dumps({"observation": OBS})

    async def worker(url: str, stop: float) -> int:
        k = 0
        async with websockets.connect(url) as ws:
            while time.monotonic() < stop:
                await ws.send(msg)
                await ws.recv()
                k += 1
        return k

    stop = time.monotonic() + seconds
    return sum(await asyncio.gather(*(worker(u, stop) for u in urls))) / seconds


async def ws_echo(base: str, n: int, seconds: float) -> float:
    """Messages/s of ``n`` WebSocket clients against the bare app's echo."""
    return await ws_drive([base.replace("http://", "ws://") + "/echo"] * n, seconds)


async def session_steps(base: str, n_sessions: int, seconds: float) -> dict:
    async with httpx.AsyncClient(base_url=base) as c:
        sids = [
            (await c.post("/v1/sessions", json={"policy": POLICY})).json()["session_id"]
            for _ in range(n_sessions)
        ]

        async def http_worker(sid: str, stop: float) -> int:
            n = 0
            while time.monotonic() < stop:
                r = await c.post(f"/v1/sessions/{sid}/act", json={"observation": OBS})
                assert r.status_code == 200
                n += 1
            return n

        stop = time.monotonic() + seconds
        http_n = sum(await asyncio.gather(*(http_worker(s, stop) for s in sids)))

    ws_base = base.replace("http://", "ws://")
    ws_per_s = await ws_drive([f"{ws_base}/v1/sessions/{sid}/stream" for sid in sids], seconds)
    return {"http_steps_per_s": http_n / seconds, "ws_steps_per_s": ws_per_s}


def big_batch(base: str, repeats: int = 20) -> dict:
    from service.registry.registry import Registry
    from service.registry.store import ModelStore
    from service.runtime.policy import PolicyRuntime

    g = torch.Generator().manual_seed(0)
    obs = torch.randn(1024, 4, generator=g)
    body = json.dumps({"observations": obs.tolist()}).encode()  # encoded once: time the server
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=base, timeout=60) as c:
        c.post(f"/v1/policies/{POLICY}/act", content=body, headers=headers)
        t = time.perf_counter()
        for _ in range(repeats):
            r = c.post(f"/v1/policies/{POLICY}/act", content=body, headers=headers)
            assert r.status_code == 200
        http_s = (time.perf_counter() - t) / repeats
    registry = Registry(ModelStore(ROOT / "models"), prepare=PolicyRuntime)
    registry.load_all()
    runtime = registry.resolve(POLICY).runtime
    runtime.act(obs)
    t = time.perf_counter()
    for _ in range(repeats):
        runtime.act(obs)
    local_s = (time.perf_counter() - t) / repeats
    return {"http_obs_per_s": 1024 / http_s, "inprocess_obs_per_s": 1024 / local_s, "ratio": local_s / http_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="serve --workers N for ours")
    ap.add_argument("--stores", action="store_true", help="only: LSTM sessions, memory vs Redis store")
    ap.add_argument("--rounds", type=int, default=3, help="(--stores) alternating rounds")
    args = ap.parse_args()
    if args.stores:
        stores(args.seconds, args.connections, args.rounds)
        return
    torch.set_num_threads(1)
    py = sys.executable
    env = {
        "POLICY_SERVER_MODEL_DIR": str(ROOT / "models"),
        "POLICY_SERVER_GRPC_PORT": str(free_port()),  # on, as make serve runs it, off its 8001
        "POLICY_SERVER_EMBEDDED_WORKER": "false",
        "POLICY_SERVER_DATA_DIR": tempfile.mkdtemp(),
        "POLICY_SERVER_REGISTRY_POLL_S": "0",
    }
    results = {}
    servers = {
        # the configuration make serve runs: log level info, the access log on
        "ours": [py, "-m", "service.cli", "serve", "--workers", str(args.workers), "--port"],
        "naive": [py, "-m", "benchmarks.baselines", "naive", str(ROOT / "models"), POLICY],
        "empty": [py, "-m", "benchmarks.baselines", "empty", str(ROOT / "models"), POLICY],
        "bare": [py, "-m", "benchmarks.baselines", "bare", str(ROOT / "models"), POLICY],
        "floor": [py, "-m", "benchmarks.baselines", "floor", str(ROOT / "models"), POLICY],
    }
    if args.workers > 1:
        env["POLICY_SERVER_SESSION_STORE"] = os.environ.get(
            "POLICY_SERVER_SESSION_STORE", "redis://127.0.0.1:6379/0"
        )
    body = {"observation": OBS}
    for name, cmd in servers.items():
        port = free_port()
        proc = start([*cmd, str(port)], env, port)  # stderr (ours: the access log) written to /dev/null
        try:
            url = f"http://127.0.0.1:{port}/v1/policies/{POLICY}/act"
            load(url, body, 2, args.connections)  # warm-up
            results[name] = load(url, body, args.seconds, args.connections)
            if name == "ours":
                base = f"http://127.0.0.1:{port}"
                results["sessions"] = asyncio.run(session_steps(base, args.connections, args.seconds))
                results["batch_1024"] = big_batch(base)
                if shutil.which("wrk") and args.workers > 1:  # (one worker: --stores below)
                    results["lstm_sessions"] = wrk_sessions(
                        base, LSTM_POLICY, 64, args.seconds, args.connections
                    )
            if name == "bare":
                bare = f"http://127.0.0.1:{port}"
                results["ws_echo"] = asyncio.run(ws_echo(bare, args.connections, args.seconds))
        finally:
            proc.terminate()
            proc.wait(10)
    print(
        f"load: {'wrk' if shutil.which('wrk') else 'python'}; {args.connections} connections, "
        f"{args.seconds}s, single observation, policy {POLICY}"
    )
    print(f"{'server':8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for name in servers:
        r = results[name]
        print(f"{name:8} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['errors']:8d}")
    o, n, e, z, f = (results[k] for k in ("ours", "naive", "empty", "bare", "floor"))
    s, b = results["sessions"], results["batch_1024"]
    ratios = {
        "ours/naive req/s (target >= 2.0)": o["rps"] / n["rps"],
        "ours/empty req/s (target >= 0.7)": o["rps"] / e["rps"],
        "ours/empty p99 (target <= 2.0)": o["p99_ms"] / e["p99_ms"],
        "ours/bare ASGI req/s (target >= 0.5)": o["rps"] / z["rps"],
        "ours/bare ASGI p99 (target <= 2.0)": o["p99_ms"] / z["p99_ms"],
        "floor/bare ASGI req/s (what the policy itself allows)": f["rps"] / z["rps"],
        "ours/floor req/s": o["rps"] / f["rps"],
        "ws session steps/bare ws echo (target >= 0.5)": s["ws_steps_per_s"] / results["ws_echo"],
        "ws/http session steps (target >= 3.0)": s["ws_steps_per_s"] / s["http_steps_per_s"],
        "batch 1024 http/in-process obs/s (target >= 0.25)": b["ratio"],
    }
    print(json.dumps({"sessions": s, "ws_echo_per_s": results["ws_echo"], "batch_1024": b}, indent=None))
    if "lstm_sessions" in results:
        store = env.get("POLICY_SERVER_SESSION_STORE", "memory")
        line = _line(results["lstm_sessions"])
        print(f"LSTM session steps over HTTP (wrk, 64 sessions, store {store}): {line}")
    for k, v in ratios.items():
        print(f"{k:55} {v:6.2f}")
    if shutil.which("wrk") and shutil.which("redis-server") and args.workers == 1:
        print("LSTM session steps, 64 sessions, serve as make serve runs it, memory vs Redis store:")
        stores(args.seconds, args.connections)


def _line(r: dict) -> str:
    return f"{r['rps']:.0f}/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, non-2xx {r['errors']}"


def redis_server(port: int) -> subprocess.Popen:
    """A throwaway ``redis-server`` on ``port`` (no persistence)."""
    return subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )


def stores(seconds: int, connections: int, rounds: int = 3) -> None:
    """LSTM session steps with the memory store vs the Redis store (a redis-server started here),
    alternating, same load: ``python -m benchmarks.run --stores``."""
    redis_port = free_port()
    redis = redis_server(redis_port)
    base_env = {
        "POLICY_SERVER_MODEL_DIR": str(ROOT / "models"),
        "POLICY_SERVER_GRPC_PORT": "0",  # no gRPC service: it would claim port 8001
        "POLICY_SERVER_EMBEDDED_WORKER": "false",
        "POLICY_SERVER_DATA_DIR": tempfile.mkdtemp(),
        "POLICY_SERVER_REGISTRY_POLL_S": "0",
    }
    runs: dict[str, list[dict]] = {"memory": [], "redis": []}
    try:
        for _ in range(rounds):
            for store in runs:
                env = {**base_env, "POLICY_SERVER_SESSION_STORE": store}
                if store == "redis":
                    env["POLICY_SERVER_SESSION_STORE"] = f"redis://127.0.0.1:{redis_port}/0"
                port = free_port()
                proc = start([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env, port)
                try:
                    base = f"http://127.0.0.1:{port}"
                    runs[store].append(wrk_sessions(base, LSTM_POLICY, 64, seconds, connections))
                finally:
                    proc.terminate()
                    proc.wait(10)
    finally:
        redis.terminate()
    for store, rs in runs.items():
        for r in rs:
            print(f"{store:7} {_line(r)}")
    mem = max(r["rps"] for r in runs["memory"])
    red = max(r["rps"] for r in runs["redis"])
    p99m = min(r["p99_ms"] for r in runs["memory"])
    p99r = min(r["p99_ms"] for r in runs["redis"])
    # each round's pair ran back to back: its ratio is the steadier figure on a shared machine
    pairs = [r["rps"] / m["rps"] for m, r in zip(runs["memory"], runs["redis"], strict=True)]
    print(f"redis/memory steps/s per round: {' '.join(f'{x:.2f}' for x in pairs)}")
    print(f"redis/memory steps/s (median of the pairs; target >= 0.7) {statistics.median(pairs):6.2f}")
    print(f"redis/memory steps/s (best of {rounds}; target >= 0.7) {red / mem:6.2f}")
    print(f"redis/memory p99 (best of {rounds}; target <= 2.0)     {p99r / p99m:6.2f}")


if __name__ == "__main__":
    main()
