"""``policy-server serve | worker | train``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys

from service.training.algorithms import ALGORITHMS

# ``serve --workers N`` (and any granian ``serve``): each worker process imports ``worker_app``
# afresh; these tell it the log level and how many workers share the ports (internal: not settings)
WORKERS_LOG_LEVEL = "_POLICY_SERVER_WORKERS_LOG_LEVEL"
WORKERS = "_POLICY_SERVER_WORKERS"
GRACEFUL_S = 30  # in-flight requests and the lifespan's shutdown get this long after SIGTERM


def worker_app():
    """The app of one worker process of ``serve``, logging as a single-process ``serve`` does
    (JSON lines, the access log at ``--log-level info``)."""
    from service.main import create_app
    from service.observability import configure_json_logging

    configure_json_logging(os.environ.get(WORKERS_LOG_LEVEL, "info"))
    return create_app(shared_ports=int(os.environ.get(WORKERS, "2")) > 1)


def _granian_logging(level: str) -> dict:
    """granian's own loggers as JSON lines on stderr, like the app's (its access log stays off:
    the app writes its own)."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "formatters": {"json": {"()": "service.observability.JsonFormatter"}},
        "handlers": {"console": handler, "access": handler},
        "loggers": {
            "_granian": {"handlers": ["console"], "level": level.upper(), "propagate": False},
            "granian.access": {"handlers": ["access"], "level": "WARNING", "propagate": False},
        },
    }


def _serve(args: argparse.Namespace) -> int:
    from service.config import Settings

    if (args.http or Settings().http_server) == "granian":
        return _serve_granian(args)
    import uvicorn

    from service.config import Settings
    from service.main import create_app
    from service.observability import configure_json_logging
    from service.process import configure_process

    settings = Settings()
    configure_process(settings.torch_threads)
    configure_json_logging(args.log_level)
    common = dict(
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        # session stream messages are a few hundred bytes of JSON: deflating each one costs
        # more CPU (~5% of a step) than the bytes it saves on a LAN
        ws_per_message_deflate=False,
        log_level=args.log_level,
        timeout_graceful_shutdown=GRACEFUL_S,
        log_config=None,
        access_log=False,
    )
    if args.workers > 1:
        if settings.session_store == "memory" or settings.embedded_worker:
            logging.getLogger(__name__).warning(
                "several workers: set POLICY_SERVER_SESSION_STORE=redis://… (sessions are per "
                "process otherwise) and POLICY_SERVER_EMBEDDED_WORKER=false with a Redis queue"
            )
        os.environ[WORKERS_LOG_LEVEL] = args.log_level
        uvicorn.run("service.cli:worker_app", factory=True, workers=args.workers, **common)
    else:
        uvicorn.run(create_app(settings), **common)
    return 0


def _serve_granian(args: argparse.Namespace) -> int:
    """The same app on granian (Rust HTTP/1.1 and WebSockets, the ASGI interface with its
    lifespan): ``args.workers`` worker processes, each building ``worker_app``."""
    from granian.constants import HTTPModes, Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    from service.config import Settings

    settings = Settings()
    if args.workers > 1 and (settings.session_store == "memory" or settings.embedded_worker):
        logging.getLogger(__name__).warning(
            "several workers: set POLICY_SERVER_SESSION_STORE=redis://… (sessions are per "
            "process otherwise) and POLICY_SERVER_EMBEDDED_WORKER=false with a Redis queue"
        )
    os.environ[WORKERS_LOG_LEVEL] = args.log_level
    os.environ[WORKERS] = str(args.workers)
    Server(
        "service.cli:worker_app",
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,
        factory=True,
        workers=args.workers,
        http=HTTPModes.http1,
        websockets=True,
        log_level=LogLevels(args.log_level.lower()),
        log_dictconfig=_granian_logging(args.log_level),
        workers_kill_timeout=GRACEFUL_S,
    ).serve()
    return 0


def _publisher(settings):
    from service.registry.registry import Registry
    from service.registry.store import open_store

    return Registry(open_store(settings.model_dir, settings.s3_endpoint_url)).publish


def _worker(args: argparse.Namespace) -> int:
    """Consume training jobs (SQLite queue in the data dir, or Redis with QUEUE_URL)."""
    from service.config import Settings
    from service.process import configure_process
    from service.training.job_system import build_jobs

    settings = Settings()
    configure_process()
    _, worker = build_jobs(settings, _publisher(settings))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.ctx.stopping.set())
    logging.getLogger(__name__).info("worker consuming %s", settings.queue_url or "SQLite queue")
    worker.run_forever()
    return 0


def _train(args: argparse.Namespace) -> int:
    """Train without the server and publish into the model repository."""
    from service.config import Settings, resolve_device
    from service.process import configure_process
    from service.training.algorithms import build_config, trainer_for
    from service.training.job import EnvJob

    settings = Settings()
    configure_process()
    hp = {}
    for item in args.hp:
        key, _, value = item.partition("=")
        hp[key] = json.loads(value)
    command = "policy-server " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    request = EnvJob(
        algorithm=args.algorithm,
        policy_name=args.name,
        env_id=args.env,
        recurrent=args.recurrent,
        total_frames=args.frames,
        seed=args.seed,
        hyperparameters=hp,
    )
    config = build_config(
        request,
        device=resolve_device(args.device),
        command=command,
    )
    train = trainer_for(args.algorithm)
    bar = _progress_bar(args.frames) if sys.stderr.isatty() and not args.verbose else None

    def progress(p: dict) -> None:
        if args.verbose:  # every point, as JSON lines
            print(
                json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in p.items()}), flush=True
            )
        elif bar is not None:
            bar.n = p["frames"]
            shown = {"fps": p.get("fps"), "return": p.get("mean_return"), "eps": p.get("epsilon")}
            if p.get("eval_mean_return") is not None:
                progress.last_eval = p["eval_mean_return"]
            shown["eval"] = progress.last_eval
            bar.set_postfix({k: round(v, 2) for k, v in shown.items() if v is not None}, refresh=True)
        elif p.get("eval_mean_return") is not None:  # not a terminal: one line per evaluation
            print(
                f"frames {p['frames']}: evaluation {p['eval_mean_return']:.2f}, "
                f"training return {p.get('mean_return')}, {p.get('fps', 0):.0f} frames/s",
                flush=True,
            )

    progress.last_eval = None
    try:
        trained = train(config, progress)
    finally:
        if bar is not None:
            bar.close()
    version = _publisher(settings)(args.name, trained.spec, trained.weights)
    print(
        json.dumps(
            {
                "policy": args.name,
                "version": version,
                "eval_mean_return": trained.eval_mean_return,
                "frames": trained.frames,
                "wall_time_s": round(trained.wall_time_s, 1),
                "device": trained.device,
            }
        )
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    """The serving benchmark of ``benchmarks/`` (run from a checkout; ``make bench`` does)."""
    sys.path.insert(0, os.getcwd())  # benchmarks/ lives in the checkout, not in the package
    try:
        from benchmarks import run
    except ImportError:
        print("benchmarks/ is not importable: run from the repository root (make bench)")
        return 2
    sys.argv = ["benchmarks.run", "--seconds", str(args.seconds), "--connections", str(args.connections)]
    run.main()
    return 0


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="frame", dynamic_ncols=True)


def _upload(args: argparse.Namespace) -> int:
    """Publish a directory ``export_policy`` wrote (policy.json + weights, or its PT2 archives)."""
    from service.sdk.client import PolicyClient, PolicyServerError

    api_key = args.api_key or os.environ.get("POLICY_SERVER_API_KEY")
    try:
        with PolicyClient(args.url, api_key=api_key) as client:
            version = client.upload(args.name, args.dir)
    except (PolicyServerError, FileNotFoundError) as exc:
        print(f"upload failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"policy": args.name, "version": version}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="policy-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    serve = sub.add_parser("serve", help="serve the model repository (and consume jobs)", formatter_class=fmt)
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--log-level", default="info", help="log level (warning: no access log)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (share sessions and jobs through Redis)",
    )
    serve.add_argument(
        "--http",
        choices=("uvicorn", "granian"),
        default=None,
        help="HTTP server running the app (default: the http_server setting; docs/performance.md "
        "compares them)",
    )
    serve.set_defaults(func=_serve)
    worker = sub.add_parser("worker", help="consume training jobs", formatter_class=fmt)
    worker.set_defaults(func=_worker)
    tr = sub.add_parser("train", help="train a policy into the model repository", formatter_class=fmt)
    tr.add_argument("--algorithm", choices=ALGORITHMS, default="dqn", help="training algorithm")
    tr.add_argument("--env", required=True, help="an allow-listed environment id (GET /v1/envs)")
    tr.add_argument("--name", required=True, help="policy name to publish the trained version under")
    tr.add_argument("--recurrent", action="store_true", help="an LSTM policy (dqn)")
    tr.add_argument("--frames", type=int, default=50_000, help="environment frames to train on")
    tr.add_argument("--seed", type=int, default=0, help="random seed")
    tr.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present)")
    tr.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="hyperparameter override, e.g. --hp lr=0.001",
    )
    tr.add_argument(
        "--verbose",
        action="store_true",
        help="print every progress point as a JSON line (else a progress bar)",
    )
    tr.set_defaults(func=_train)
    up = sub.add_parser(
        "upload", help="publish an exported policy directory as a new version", formatter_class=fmt
    )
    up.add_argument("dir", help="the directory export_policy wrote")
    up.add_argument("--name", required=True, help="policy name")
    up.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    up.add_argument("--api-key", default=None, help="default: $POLICY_SERVER_API_KEY")
    up.set_defaults(func=_upload)
    bench = sub.add_parser(
        "bench", help="serving benchmark against baselines (make bench)", formatter_class=fmt
    )
    bench.add_argument("--seconds", type=int, default=10, help="load duration per server")
    bench.add_argument("--connections", type=int, default=32, help="concurrent connections")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
