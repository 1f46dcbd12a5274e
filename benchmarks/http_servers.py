"""Which HTTP server: the bare ASGI app, the floor and ours, each on uvicorn (httptools +
uvloop, as ``serve`` runs it) and on granian (Rust, the same ASGI apps) under several of its
settings, alternating rounds in one run, wrk with one CartPole observation a request.

    python -m benchmarks.http_servers [--seconds 8] [--connections 32] [--rounds 3]

Prints each server's req/s and p99 per round, their medians, and per HTTP server the ratios
this decision reads: floor/bare (what serving the policy at the least costs there) and
ours/floor (what our code costs: target >= 0.8 req/s, <= 1.5 p99), and WebSocket session steps
against the bare app's echo on the same HTTP server (target >= 0.5); and the observations per
forward pass the floor and ours formed under the same load (the batches wrk's connections
make). Ours runs as ``make serve`` does: log level info, the access log on (written to
/dev/null here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import httpx

from benchmarks.run import OBS, POLICY, ROOT, free_port, load, start, ws_drive, ws_echo

GRANIAN = {  # label -> granian's options
    "granian": ["--http", "1"],
    "granian-uvloop-st": ["--http", "1", "--loop", "uvloop", "--runtime-mode", "st"],
    "granian-uvloop-mt2": [
        "--http",
        "1",
        "--loop",
        "uvloop",
        "--runtime-mode",
        "mt",
        "--runtime-threads",
        "2",
    ],
}


def commands(http: str, kind: str, port: int) -> tuple[list[str], dict]:
    py, models = sys.executable, str(ROOT / "models")
    if http == "uvicorn":
        if kind == "ours":
            return [py, "-m", "service.cli", "serve", "--port", str(port)], {}
        return [py, "-m", "benchmarks.baselines", kind, models, POLICY, str(port)], {}
    granian = [str(Path(sys.executable).parent / "granian"), "--interface", "asgi", "--factory"]
    granian += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *GRANIAN[http]]
    if kind == "ours":  # the app of one ``serve`` process, its JSON log and access log at info
        return [*granian, "service.cli:worker_app"], {"_POLICY_SERVER_WORKERS_LOG_LEVEL": "info"}
    return [*granian, "benchmarks.baselines:make_app"], {"BASELINE": f"{kind} {models} {POLICY}"}


def passes(base: str, kind: str) -> tuple[float, float]:
    """(forward passes, observations in them) so far: ours' /metrics histogram, the floor's GET."""
    if kind == "floor":
        got = httpx.get(base + "/").json()
        return got["passes"], got["rows"]
    text = httpx.get(base + "/metrics").text
    count = re.search(r"^policy_server_forward_batch_size_count (\S+)$", text, re.M).group(1)
    rows = re.search(r"^policy_server_forward_batch_size_sum (\S+)$", text, re.M).group(1)
    return float(count), float(rows)


async def ws_sessions(base: str, n: int, seconds: float) -> float:
    """Session steps/s of ``n`` sessions of the policy, each over its WebSocket stream."""
    async with httpx.AsyncClient(base_url=base) as c:
        sids = [
            (await c.post("/v1/sessions", json={"policy": POLICY})).json()["session_id"] for _ in range(n)
        ]
    ws = base.replace("http://", "ws://")
    return await ws_drive([f"{ws}/v1/sessions/{sid}/stream" for sid in sids], seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--servers", default=",".join(["uvicorn", *GRANIAN]))
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")
    env = {
        "POLICY_SERVER_MODEL_DIR": str(ROOT / "models"),
        "POLICY_SERVER_EMBEDDED_WORKER": "false",
        "POLICY_SERVER_DATA_DIR": tempfile.mkdtemp(),
        "POLICY_SERVER_REGISTRY_POLL_S": "0",
    }
    https = args.servers.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    body = {"observation": OBS}
    for round_ in range(args.rounds):
        for http in https:
            for kind in ("bare", "floor", "ours"):
                port = free_port()
                cmd, extra = commands(http, kind, port)
                proc = start(cmd, {**env, **extra, "POLICY_SERVER_GRPC_PORT": str(free_port())}, port)
                try:
                    url = f"http://127.0.0.1:{port}/v1/policies/{POLICY}/act"
                    load(url, body, 2, args.connections)  # warm-up
                    base = f"http://127.0.0.1:{port}"
                    before = passes(base, kind) if kind != "bare" else None
                    r = load(url, body, args.seconds, args.connections)
                    if before is not None:  # observations per forward pass under this load
                        after = passes(base, kind)
                        r["rows_per_pass"] = round((after[1] - before[1]) / max(after[0] - before[0], 1), 2)
                    if kind == "bare":  # WebSocket messages/s: the echo, then ours' session steps
                        r["ws_per_s"] = asyncio.run(ws_echo(base, args.connections, args.seconds))
                    elif kind == "ours":
                        r["ws_per_s"] = asyncio.run(ws_sessions(base, args.connections, args.seconds))
                finally:
                    proc.terminate()
                    proc.wait(15)
                runs.setdefault((http, kind), []).append(r)
                print(json.dumps({"round": round_, "http": http, "server": kind, **r}), flush=True)

    def median(http: str, kind: str, key: str) -> float:
        values = sorted(r[key] for r in runs[(http, kind)])
        return values[len(values) // 2]

    print(f"\n{'http server':20} {'server':6} {'req/s':>8} {'p99 ms':>7}   (medians of {args.rounds} rounds)")
    for http in https:
        for kind in ("bare", "floor", "ours"):
            print(f"{http:20} {kind:6} {median(http, kind, 'rps'):8.0f} {median(http, kind, 'p99_ms'):7.2f}")
    for http in https:
        ratios = {
            "floor/bare req/s": median(http, "floor", "rps") / median(http, "bare", "rps"),
            "ours/floor req/s (>= 0.8)": median(http, "ours", "rps") / median(http, "floor", "rps"),
            "ours/floor p99 (<= 1.5)": median(http, "ours", "p99_ms") / median(http, "floor", "p99_ms"),
            "ours/uvicorn ours req/s": median(http, "ours", "rps") / median(https[0], "ours", "rps"),
            "rows per pass, floor": median(http, "floor", "rows_per_pass"),
            "rows per pass, ours": median(http, "ours", "rows_per_pass"),
            "ws session steps/ws echo (>= 0.5)": median(http, "ours", "ws_per_s")
            / median(http, "bare", "ws_per_s"),
        }
        print(http, json.dumps({k: round(v, 2) for k, v in ratios.items()}))


if __name__ == "__main__":
    os.environ.setdefault("RL_WARNINGS", "False")
    main()
