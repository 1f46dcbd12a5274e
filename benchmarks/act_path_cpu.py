"""CPU per act request through the whole ASGI stack, in process (no sockets, no load generator).

Middlewares, fast path, schema, service, micro-batcher and forward pass, driven by calling the
application directly: steadier than a wrk run on a shared machine, so it can tell two versions
of the code apart. ``--against DIR`` measures a second checkout (e.g. a ``git worktree`` of the
previous commit) in alternating runs in the same invocation and prints the ratio of the best
rounds.

    python -m benchmarks.act_path_cpu                                  # this checkout
    git worktree add /tmp/before HEAD~1
    python -m benchmarks.act_path_cpu --against /tmp/before --runs 3   # after / before
    python -m benchmarks.act_path_cpu --session --against /tmp/before  # LSTM session steps

``--concurrency C``: C requests in flight at a time (the micro-batcher forms batches of up to C),
as under a load generator with C connections.

``--store redis://…``: sessions in Redis (a running redis-server).

``--routing``: also measure this checkout with ``--policy`` split 50/50 between two versions
(``PUT …/routing``), each request carrying an ``X-Routing-Key``: the cost of choosing a version.

``--floor``: also the floor server's app (``benchmarks.baselines``: parse, one batched forward
pass, the argmax, nothing else) driven the same way: what our code costs per request over the
least a server of this policy does, without the HTTP server's share or the load generator's
noise; then the cost of one forward pass alone, ours and the floor's, at batches of 1, 9, 32
(``pass_us_by_batch``: what a smaller batch adds per request). ``--access-log``: ours with the
access log on, as ``make serve`` runs (lines to /dev/null); without it the log is off, as in a
process that configured no logging.

``--session``: steps of one session (one per concurrent request) of ``cartpole-lstm-dqn``, or
of ``--policy`` (``POST /v1/sessions/{id}/act``, the server carrying the LSTM state) instead of
act calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBS = [0.01, -0.02, 0.03, 0.04]


def http_scope(path: str, body: bytes, key: bytes | None = None) -> dict:
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
    if key is not None:
        scope["headers"].append((b"x-routing-key", key))
    return scope


def split_models(policy: str) -> Path:
    """A copy of ``models/`` where ``policy`` has a second version (the same files) and a 50/50
    split between the two."""
    import shutil

    from service.registry.store import ModelStore

    root = Path(tempfile.mkdtemp()) / "models"
    shutil.copytree(ROOT / "models", root)
    store = ModelStore(root)
    (v,) = store.versions(policy)
    spec = store.read_spec_json(policy, v)
    other = store.write_version(policy, spec, store.read_weights(policy, v))
    store.write_routing(policy, {"weights": {str(v): 1.0, str(other): 1.0}, "shadow": None})
    return root


def choose_cost(policy: str, n: int = 200_000) -> dict[str, float]:
    """µs per ``Registry.routed`` call (what the act call does to pick its version): without a
    split, with a 50/50 split and a routing key, with one and no key. The steady part of what
    ``--routing`` adds, free of the whole-stack noise."""
    import timeit

    from service.registry.registry import Registry
    from service.registry.store import ModelStore

    registry = Registry(ModelStore(split_models(policy)))
    registry.load_all()
    plain = Registry(ModelStore(ROOT / "models"))
    plain.load_all()
    cases = {
        "no split": lambda: plain.routed(policy, None, None),
        "split, key": lambda: registry.routed(policy, None, "client-17"),
        "split, no key": lambda: registry.routed(policy, None, None),
    }
    return {k: min(timeit.repeat(f, number=n, repeat=5)) / n * 1e6 for k, f in cases.items()}


def pass_cost(policy: str, sizes: tuple[int, ...] = (1, 9, 32), n: int = 2000) -> dict[str, dict]:
    """µs of one forward pass of ``B`` one-observation act calls: ours (``MicroBatcher._forward``:
    join, the runtime's forward, split per caller) and the floor's (a tensor of the rows, the
    MLP, argmax, ``tolist``); ``timeit``, best of 7. What a batch costs apart from its requests:
    under wrk the batches are smaller than under 32 lock-step callers."""
    import timeit

    import torch

    from service.exploration import Exploration
    from service.process import configure_process
    from service.registry.registry import Registry
    from service.registry.store import ModelStore
    from service.runtime.batching import MicroBatcher
    from service.runtime.call import ActCall
    from service.runtime.policy import PolicyRuntime

    configure_process(torch_threads=1)  # as the server runs (and the children above)
    registry = Registry(ModelStore(ROOT / "models"), prepare=PolicyRuntime)
    registry.load_all()
    runtime = registry.resolve(policy).runtime
    head = runtime.fast.head

    def best(f) -> float:
        return round(min(timeit.repeat(f, number=n, repeat=7)) / n * 1e6, 1)

    out = {}
    for size in sizes:
        calls = [
            ActCall(runtime.codec.decode([OBS], None, True, policy)[0], Exploration.deterministic)
            for _ in range(size)
        ]
        key, items = calls[0].batch_key(runtime), [(call, None) for call in calls]
        rows = [OBS] * size

        def floor(rows=rows) -> list:
            with torch.inference_mode():
                return head(torch.tensor(rows)).argmax(-1).tolist()

        ours = best(lambda k=key, i=items: MicroBatcher._forward(k, i))
        out[str(size)] = {"ours": ours, "floor": best(floor)}
    return out


async def measure(
    requests: int,
    rounds: int,
    policy: str,
    session: bool,
    concurrency: int = 1,
    store: str = "memory",
    routing: bool = False,
    floor: bool = False,
    access_log: bool = False,
) -> list[float]:
    if floor:
        return await drive_floor(requests, rounds, policy, concurrency)
    from service.config import Settings
    from service.main import create_app

    settings = Settings(
        model_dir=split_models(policy) if routing else Path("models"),
        data_dir=Path(tempfile.mkdtemp()),
        registry_poll_s=0,
        embedded_worker=False,
        session_store=store,
    )
    app = create_app(settings)
    if access_log:  # its lines to /dev/null; the child's stderr stays for its errors
        app.access_log.stream = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    last: list[bytes] = []
    body = b""

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            last[:] = [message["body"]]

    async with app.router.lifespan_context(app):
        if session:  # one session per client
            paths = []
            for _ in range(concurrency):
                body = json.dumps({"policy": policy}).encode()
                await app(http_scope("/v1/sessions", body), receive, send)
                paths.append(f"/v1/sessions/{json.loads(last[0])['session_id']}/act")
            dim = app.state.registry.resolve(policy).runtime.spec.observation.shape[0]
            body = json.dumps({"observation": OBS[:dim]}).encode()  # CartPoleNoVel: 2 numbers
        else:
            paths = [f"/v1/policies/{policy}/act"] * concurrency
            body = json.dumps({"observation": OBS}).encode()
        keys = [f"client-{i}".encode() if routing else None for i in range(len(paths))]
        scopes = [http_scope(path, body, key) for path, key in zip(paths, keys, strict=True)]
        return await drive(app, scopes, receive, send, last, requests, rounds)


async def drive(app, scopes: list[dict], receive, send, last: list[bytes], requests: int, rounds: int):
    """µs per request of each round: one client per scope, each calling ``app`` in turn."""
    for _ in range(2000):  # warm-up
        await app(dict(scopes[0]), receive, send)
    assert b'"action"' in last[0], last[0]
    out = []
    per_task = requests // len(scopes)

    async def client(scope: dict) -> None:
        for _ in range(per_task):
            await app(dict(scope), receive, send)

    for _ in range(rounds):
        t = time.perf_counter()
        await asyncio.gather(*(client(scope) for scope in scopes))
        out.append((time.perf_counter() - t) / (per_task * len(scopes)) * 1e6)
    return out


async def drive_floor(requests: int, rounds: int, policy: str, concurrency: int) -> list[float]:
    """``drive`` over the floor server's app (one CartPole observation a request)."""
    from benchmarks.baselines import make_app

    app = make_app("floor", str(Path("models").resolve()), policy)
    body = json.dumps({"observation": OBS}).encode()
    last: list[bytes] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            last[:] = [message["body"]]

    scopes = [http_scope(f"/v1/policies/{policy}/act", body)] * concurrency
    return await drive(app, scopes, receive, send, last, requests, rounds)


def run_in(checkout: Path, args: argparse.Namespace, routing: bool = False, floor: bool = False) -> float:
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
        "--concurrency",
        str(args.concurrency),
        "--store",
        args.store,
        *(["--session"] if args.session else []),
        *(["--routing"] if routing else []),
        *(["--floor"] if floor else []),
        *(["--access-log"] if args.access_log and not floor else []),
    ]
    out = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, check=True).stdout
    return min(json.loads(out.strip().splitlines()[-1])["us_per_request"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per checkout")
    ap.add_argument("--policy", help="default: cartpole-dqn, or cartpole-lstm-dqn with --session")
    ap.add_argument("--session", action="store_true", help="LSTM session steps instead of act calls")
    ap.add_argument("--concurrency", type=int, default=1, help="requests in flight (batches form from 2)")
    ap.add_argument("--store", default="memory", help="the session store: memory or redis://…")
    ap.add_argument("--against", type=Path, help="another checkout to measure in alternation")
    ap.add_argument("--routing", action="store_true", help="also this checkout with a 50/50 split")
    ap.add_argument("--floor", action="store_true", help="also the floor server's app, same driver")
    ap.add_argument("--access-log", action="store_true", help="ours with the access log on (to /dev/null)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor and args.session:
        ap.error("--floor measures act calls: the floor server has no sessions")
    args.policy = args.policy or ("cartpole-lstm-dqn" if args.session else "cartpole-dqn")
    if args.child:
        sys.path.insert(0, str(Path.cwd()))  # the checkout under test, ahead of the installed one
        import uvloop

        if (Path.cwd() / "service" / "process.py").exists():  # older checkouts configure themselves
            from service.process import configure_process

            configure_process(torch_threads=1)
        if args.access_log:  # as serve configures it; the lines go to /dev/null
            from service.observability import configure_json_logging

            configure_json_logging("info")
        rounds = uvloop.run(
            measure(
                args.requests,
                args.rounds,
                args.policy,
                args.session,
                args.concurrency,
                args.store,
                args.routing,
                args.floor,
                args.access_log,
            )
        )
        print(json.dumps({"us_per_request": [round(r, 1) for r in rounds]}))
        return
    checkouts = {"this": (ROOT, False, False)}
    if args.routing:
        checkouts["routed"] = (ROOT, True, False)
    if args.floor:
        checkouts["floor"] = (ROOT, False, True)
    if args.against:
        checkouts["against"] = (args.against.resolve(), False, False)
    best: dict[str, list[float]] = {k: [] for k in checkouts}
    for _ in range(args.runs):
        for name, (path, routing, floor) in checkouts.items():
            best[name].append(run_in(path, args, routing, floor))
            print(f"{name:8} {path}: best round {best[name][-1]:.1f} µs/request", flush=True)
    summary = {k: min(v) for k, v in best.items()}
    print(json.dumps({"best_us_per_request": summary}))
    if args.against:
        print(f"this / against (µs per request, lower is faster): {summary['this'] / summary['against']:.3f}")
    if args.floor:
        cost = summary["this"] - summary["floor"]
        ratio = summary["floor"] / summary["this"]
        print(f"floor / this: {ratio:.3f} (ours costs {cost:+.1f} µs more a request)")
        print(json.dumps({"pass_us_by_batch": pass_cost(args.policy)}))
    if args.routing:
        picks = {k: round(v, 3) for k, v in choose_cost(args.policy).items()}
        print(json.dumps({"registry_routed_us": picks}))
        cost = summary["routed"] - summary["this"]
        print(f"routed / this: {summary['routed'] / summary['this']:.3f} ({cost:+.1f} µs per request)")


if __name__ == "__main__":
    main()
