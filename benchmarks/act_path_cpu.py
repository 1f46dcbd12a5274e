"""CPU per act request through the whole ASGI stack, in process (no sockets, no load generator).

Middlewares, fast path, schema, service, micro-batcher and forward pass, driven by calling the
application directly: steadier than a wrk run on a shared machine, so it can tell two versions
of the code apart. ``--against DIR`` measures a second checkout (e.g. a ``git worktree`` of the
previous commit) in alternating runs in the same invocation and prints the ratio of the best
rounds.

    python -m benchmarks.act_path_cpu                                  # this checkout
    git worktree add /tmp/before HEAD~1
    python -m benchmarks.act_path_cpu --against /tmp/before --runs 3   # after / before
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBS = [0.01, -0.02, 0.03, 0.04]


async def measure(requests: int, rounds: int, policy: str) -> list[float]:
    from service.config import Settings
    from service.main import create_app

    settings = Settings(
        model_dir=Path("models"), data_dir=Path(tempfile.mkdtemp()), registry_poll_s=0, embedded_worker=False
    )
    app = create_app(settings)
    body = json.dumps({"observation": OBS}).encode()
    path = f"/v1/policies/{policy}/act"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    last: list[bytes] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            last[:] = [message["body"]]

    async with app.router.lifespan_context(app):
        for _ in range(2000):  # warm-up
            await app(dict(scope), receive, send)
        assert b'"action"' in last[0], last[0]
        out = []
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(requests):
                await app(dict(scope), receive, send)
            out.append((time.perf_counter() - t) / requests * 1e6)
    return out


def run_in(checkout: Path, args: argparse.Namespace) -> float:
    """Best round (µs per request) of this script run with ``checkout`` as the code under test."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--requests",
        str(args.requests),
        "--rounds",
        str(args.rounds),
        "--policy",
        args.policy,
    ]
    out = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, check=True).stdout
    return min(json.loads(out.strip().splitlines()[-1])["us_per_request"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per checkout")
    ap.add_argument("--policy", default="cartpole-dqn")
    ap.add_argument("--against", type=Path, help="another checkout to measure in alternation")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(Path.cwd()))  # the checkout under test, ahead of the installed one
        import uvloop

        if (Path.cwd() / "service" / "process.py").exists():  # older checkouts configure themselves
            from service.process import configure_process

            configure_process(torch_threads=1)
        rounds = uvloop.run(measure(args.requests, args.rounds, args.policy))
        print(json.dumps({"us_per_request": [round(r, 1) for r in rounds]}))
        return
    checkouts = {"this": ROOT} | ({"against": args.against.resolve()} if args.against else {})
    best: dict[str, list[float]] = {k: [] for k in checkouts}
    for _ in range(args.runs):
        for name, path in checkouts.items():
            best[name].append(run_in(path, args))
            print(f"{name:8} {path}: best round {best[name][-1]:.1f} µs/request", flush=True)
    summary = {k: min(v) for k, v in best.items()}
    print(json.dumps({"best_us_per_request": summary}))
    if args.against:
        print(f"this / against (µs per request, lower is faster): {summary['this'] / summary['against']:.3f}")


if __name__ == "__main__":
    main()
