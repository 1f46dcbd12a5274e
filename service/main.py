"""``create_app(settings)``: the FastAPI application. Its lifespan is the composition root: it
builds the registry, stores, queue and services on ``app.state``; routers reach them through
``service.api.deps``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api import dashboard, datasets, envs, health, jobs, oip, policies, rllib, sessions
from service.api.edge import ServiceApp
from service.api.errors import install_error_handlers
from service.api.oip_grpc import GrpcServer
from service.config import Settings, resolve_device
from service.datasets.store import DatasetStore
from service.observability import Metrics
from service.process import configure_process, freeze_loaded_objects
from service.registry.registry import Registry
from service.registry.store import open_store
from service.runtime.batching import InferenceExecutor, MicroBatcher
from service.runtime.program import serving_runtime
from service.runtime.sessions import make_session_store
from service.serving.acting import ActService
from service.serving.datasets import DatasetService
from service.serving.evaluation import EvaluationService
from service.serving.feeds import JobFeeds
from service.serving.inference import InferService
from service.serving.jobs import JobService
from service.serving.policies import PolicyService
from service.serving.recording import Recorder
from service.serving.rllib import RLlibService
from service.serving.rollouts import RolloutService
from service.serving.sessions import SessionService
from service.serving.stats import PolicyStats
from service.training.job_system import build_jobs

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, shared_ports: bool = False) -> ServiceApp:
    """Build the application; nothing is loaded until the lifespan starts. ``shared_ports``: one
    of ``serve --workers N``'s processes (they all bind the gRPC port)."""
    settings = settings or Settings()
    configure_process(settings.torch_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = open_store(settings.model_dir, settings.s3_endpoint_url)
        await asyncio.to_thread(store.sweep)  # what a crashed publisher left
        registry = Registry(store, resolve_device(settings.device), prepare=serving_runtime)
        state.registry = registry
        state.executor = InferenceExecutor()
        state.batcher = MicroBatcher(
            state.executor, settings.max_forward_batch, loop=asyncio.get_running_loop()
        )
        state.batcher.on_batch = state.metrics.batch_size.observe
        state.metrics.known_policy = registry.has
        state.session_store = make_session_store(settings.session_store)
        await asyncio.to_thread(registry.load_all)
        queue, worker = build_jobs(settings, registry.publish)
        stats = PolicyStats()
        state.metrics.registry.register(stats)
        state.act_service = ActService(registry, state.batcher, settings, stats)
        state.job_feeds = JobFeeds(
            settings.data_dir / "experience", queue.store, resolve_device(settings.device)
        )
        state.dataset_store = DatasetStore(settings.data_dir / "datasets", settings.max_dataset_bytes)
        recorder = Recorder(state.dataset_store, settings.max_session_ttl_s, settings.max_datasets)
        state.session_service = SessionService(
            state.session_store, registry, state.batcher, settings, state.job_feeds, stats, recorder
        )
        state.rollout_service = RolloutService(registry, state.batcher, settings)
        state.infer_service = InferService(registry, state.act_service, state.session_service, settings)
        state.rllib_service = RLlibService(state.session_service, registry)
        state.policy_service = PolicyService(registry, state.session_service, stats)
        state.dataset_service = DatasetService(
            state.dataset_store, queue.store, settings.data_dir / "experience", state.job_feeds.flush_all
        )
        state.evaluation_service = EvaluationService(registry, state.dataset_store)
        state.job_service = JobService(queue.store, queue, settings, state.dataset_store)
        state.job_worker = worker
        if settings.embedded_worker:
            worker.start()
        grpc_server = None
        if settings.grpc_port:
            grpc_server = GrpcServer(state.infer_service, settings, state.metrics, shared_ports)
            await grpc_server.start()
        freeze_loaded_objects()
        tasks = []
        if settings.job_sweep_s > 0:
            tasks.append(asyncio.create_task(_sweep_jobs(state.job_service, settings.job_sweep_s)))
        if settings.registry_poll_s > 0:
            tasks.append(asyncio.create_task(_poll_registry(registry, settings.registry_poll_s)))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            if grpc_server is not None:
                await grpc_server.stop()
            await state.act_service.shadows.close()
            if settings.embedded_worker:
                await asyncio.to_thread(worker.stop)
            state.executor.shutdown()
            state.job_feeds.close()  # reported transitions not yet written
            app.access_log.flush()
            await state.session_store.close()

    app = ServiceApp(
        title="policy-server",
        version="0.1.0",
        description="Serve and train TorchRL policies over HTTP.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.configure_edge(settings, app.state.metrics)
    install_error_handlers(app)
    for router in (health, policies, envs, sessions, jobs, datasets, oip, rllib, dashboard):
        app.include_router(router.router)
    return app


async def _poll_registry(registry: Registry, every_s: float) -> None:
    """Pick up versions that other processes (training workers) wrote to the repository."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(registry.load_all)
        except Exception:  # keep polling; a broken scan must not stop serving
            log.exception("registry refresh failed")


async def _sweep_jobs(jobs: JobService, every_s: float) -> None:
    """Fail the running jobs whose lease expired (also when no worker runs in this process)."""
    while True:
        try:
            await asyncio.to_thread(jobs.store.expire_leases)
        except Exception:  # a store outage: try again at the next round
            log.warning("sweep of orphaned jobs failed", exc_info=True)
        await asyncio.sleep(every_s)
