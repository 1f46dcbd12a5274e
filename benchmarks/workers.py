"""``serve --workers N`` with Redis sessions: act req/s and LSTM session steps/s for each N, the
server pinned to its cores and wrk to the others (``taskset``), so the load generator does not
take the server's CPU. On a 2-core machine: the server on core 0, wrk on core 1.

    python -m benchmarks.workers [--workers 1 2] [--server-cpus 0] [--load-cpus 1] [--seconds 8]

A ``redis-server`` is started here (sessions in Redis for every N, so N = 1 and N = 2 do the
same work per step).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from unittest import mock

from benchmarks import run
from benchmarks.run import LSTM_POLICY, OBS, POLICY, ROOT, free_port, redis_server, start, wrk, wrk_sessions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--server-cpus", default="0")
    ap.add_argument("--load-cpus", default="1")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    redis_port = free_port()
    redis = redis_server(redis_port)
    env = {
        "POLICY_SERVER_MODEL_DIR": str(ROOT / "models"),
        "POLICY_SERVER_GRPC_PORT": "0",
        "POLICY_SERVER_EMBEDDED_WORKER": "false",
        "POLICY_SERVER_DATA_DIR": tempfile.mkdtemp(),
        "POLICY_SERVER_REGISTRY_POLL_S": "0",
        "POLICY_SERVER_SESSION_STORE": f"redis://127.0.0.1:{redis_port}/0",
    }
    real_run = subprocess.run

    def pinned_run(cmd, *a, **kw):  # wrk on the load generator's cores
        if cmd and cmd[0] == "wrk":
            cmd = ["taskset", "-c", args.load_cpus, *cmd]
        return real_run(cmd, *a, **kw)

    results: dict[int, list[dict]] = {}
    try:
        with mock.patch.object(run.subprocess, "run", pinned_run):
            for round_ in range(args.rounds):
                for n in args.workers:
                    port = free_port()
                    cmd = ["taskset", "-c", args.server_cpus, sys.executable, "-m", "service.cli", "serve"]
                    proc = start([*cmd, "--workers", str(n), "--port", str(port)], env, port)
                    try:
                        url = f"http://127.0.0.1:{port}/v1/policies/{POLICY}/act"
                        wrk(url, {"observation": OBS}, 2, args.connections)
                        act = wrk(url, {"observation": OBS}, args.seconds, args.connections)
                        base = f"http://127.0.0.1:{port}"
                        steps = wrk_sessions(base, LSTM_POLICY, 64, args.seconds, args.connections)
                    finally:
                        proc.terminate()
                        proc.wait(30)
                    r = {"workers": n, "round": round_, "act": act, "lstm_sessions_redis": steps}
                    results.setdefault(n, []).append(r)
                    print(json.dumps(r), flush=True)
    finally:
        redis.terminate()
    for n, rs in results.items():
        act = max(r["act"]["rps"] for r in rs)
        steps = max(r["lstm_sessions_redis"]["rps"] for r in rs)
        print(f"workers {n}: act {act:.0f} req/s, LSTM Redis session steps {steps:.0f}/s (best of {len(rs)})")


if __name__ == "__main__":
    main()
