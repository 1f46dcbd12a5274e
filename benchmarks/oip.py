"""``make bench``'s Open Inference Protocol part: ``/v2`` REST and gRPC next to ``/v1``, on one
server (ours as ``make serve`` runs it, the gRPC port on), in one run.

Two load generators, each compared with itself: ``wrk`` POSTs one CartPole observation to
``/v1/…/act`` and, as a JSON tensor, to ``/v2/…/infer``; Triton's ``perf_analyzer`` (installed by
``benchmarks.perf_analyzer``; skipped, saying why, where it cannot run) drives ``/v2`` REST
(binary tensors) and gRPC at the same concurrency, and steps the recurrent policy's sequences
over gRPC (``--streaming``, one stream per sequence) next to wrk stepping 64 ``/v1`` sessions.
perf_analyzer is a heavier client than wrk and shares the machine's cores with the server:
compare its lines with each other, wrk's with each other.

    python -m benchmarks.oip [--seconds 8] [--connections 32]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile

from benchmarks import perf_analyzer
from benchmarks.run import LSTM_POLICY, OBS, POLICY, ROOT, free_port, start, wrk, wrk_sessions


def perf(prefix: list[str], model: str, url: str, protocol: str, concurrency: int, seconds: int, *extra: str):
    """perf_analyzer's throughput and p99 (a dict like wrk's), or None when it failed."""
    cmd = [
        *prefix,
        "-m",
        model,
        "-u",
        url,
        "-i",
        protocol,
        "--concurrency-range",
        str(concurrency),
        "--measurement-interval",
        str(max(1000, seconds * 1000 // 3)),
        "--max-trials",
        "6",
        *extra,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    text = out.stdout + out.stderr
    rps = re.search(r"Throughput: ([\d.]+) infer/sec", text)
    p99 = re.search(r"p99 latency: (\d+) usec", text)
    p50 = re.search(r"p50 latency: (\d+) usec", text)
    if out.returncode != 0 or not rps or not p99:
        print(f"perf_analyzer {protocol} {model} failed: {text.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return {
        "rps": float(rps.group(1)),
        "p50_ms": int(p50.group(1)) / 1000 if p50 else float("nan"),
        "p99_ms": int(p99.group(1)) / 1000,
        "errors": 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk is not installed (apt-get install wrk): the /v2 benchmark needs it")
        return
    prefix = perf_analyzer.command()
    port, grpc_port = free_port(), free_port()
    env = {
        "POLICY_SERVER_MODEL_DIR": str(ROOT / "models"),
        "POLICY_SERVER_EMBEDDED_WORKER": "false",
        "POLICY_SERVER_DATA_DIR": tempfile.mkdtemp(),
        "POLICY_SERVER_REGISTRY_POLL_S": "0",
        "POLICY_SERVER_GRPC_PORT": str(grpc_port),
        "POLICY_SERVER_GRPC_HOST": "127.0.0.1",
    }
    proc = start([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env, port)
    base = f"http://127.0.0.1:{port}"
    v2_body = {"inputs": [{"name": "observation", "shape": [1, 4], "datatype": "FP32", "data": OBS}]}
    rows: dict[str, dict | None] = {}
    try:
        for name, url, body in (
            ("wrk /v1 act (JSON)", f"{base}/v1/policies/{POLICY}/act", {"observation": OBS}),
            ("wrk /v2 infer (JSON tensor)", f"{base}/v2/models/{POLICY}/infer", v2_body),
        ):
            wrk(url, body, 2, args.connections)  # warm-up
            rows[name] = wrk(url, body, args.seconds, args.connections)
        if prefix is not None:
            c = args.connections
            rows["perf_analyzer /v2 REST (binary)"] = perf(
                prefix, POLICY, f"127.0.0.1:{port}", "http", c, args.seconds
            )
            rows["perf_analyzer gRPC"] = perf(
                prefix, POLICY, f"127.0.0.1:{grpc_port}", "grpc", c, args.seconds
            )
        rows["wrk /v1 LSTM session steps (64 sessions)"] = wrk_sessions(
            base, LSTM_POLICY, 64, args.seconds, args.connections
        )
        if prefix is not None:
            rows["perf_analyzer gRPC LSTM sequences (streams)"] = perf(
                prefix, LSTM_POLICY, f"127.0.0.1:{grpc_port}", "grpc", 16, args.seconds, "--streaming"
            )
    finally:
        proc.terminate()
        proc.wait(30)
    print(
        f"one observation per request, policy {POLICY} ({LSTM_POLICY} for steps), "
        f"{args.connections} connections"
    )
    print(f"{'load':48} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for name, r in rows.items():
        if r is None:
            print(f"{name:48} {'failed':>9}")
            continue
        print(f"{name:48} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['errors']:8d}")
    v1, v2 = rows["wrk /v1 act (JSON)"], rows["wrk /v2 infer (JSON tensor)"]
    print(f"{'wrk: /v2 infer / /v1 act req/s':55} {v2['rps'] / v1['rps']:6.2f}")
    print(f"{'wrk: /v2 infer / /v1 act p99':55} {v2['p99_ms'] / v1['p99_ms']:6.2f}")
    rest, grpc = rows.get("perf_analyzer /v2 REST (binary)"), rows.get("perf_analyzer gRPC")
    if rest and grpc:
        print(f"{'perf_analyzer: gRPC / REST req/s':55} {grpc['rps'] / rest['rps']:6.2f}")
        print(f"{'perf_analyzer: gRPC / REST p99':55} {grpc['p99_ms'] / rest['p99_ms']:6.2f}")


if __name__ == "__main__":
    main()
