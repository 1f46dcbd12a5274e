"""``create_app(settings)``: the FastAPI application; its lifespan builds the stores on app.state."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api import envs, health, jobs, policies, sessions
from service.api.fastpath import FastActMiddleware
from service.api.responses import FastJSONResponse
from service.config import Settings, resolve_device
from service.errors import ServiceError
from service.observability import Metrics, RequestContextMiddleware
from service.registry.registry import Registry
from service.registry.store import ModelStore
from service.runtime.batching import InferenceExecutor, MicroBatcher
from service.runtime.rollout import RolloutSlots
from service.runtime.sessions import make_session_store
from service.training.jobs import Jobs, JobWorker

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for bodies over the limit, by Content-Length or while streaming; uploads get their own."""

    def __init__(self, app, max_body: int, max_upload: int) -> None:
        self.app, self.max_body, self.max_upload = app, max_body, max_upload

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["method"] == "POST" and scope["path"].endswith("/versions")
        limit = self.max_upload if is_upload else self.max_body
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                await self._too_large(send, limit)
                return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._too_large(send, limit)

    @staticmethod
    async def _too_large(send, limit: int) -> None:
        body = FastJSONResponse(
            {"detail": f"request body is larger than the limit of {limit} bytes"}, 413
        ).body
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application; nothing is loaded until the lifespan starts."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.torch_threads)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        registry = Registry(ModelStore(settings.model_dir), resolve_device(settings.device))
        app.state.settings = settings
        app.state.registry = registry
        app.state.executor = InferenceExecutor()
        app.state.batcher = MicroBatcher(
            app.state.executor, settings.max_forward_batch, loop=asyncio.get_running_loop()
        )
        app.state.batcher.on_batch = app.state.metrics.batch_size.observe
        app.state.rollout_slots = RolloutSlots(settings.max_concurrent_rollouts)
        app.state.sessions = make_session_store(settings.session_store)
        await run_in_threadpool(registry.load_all)
        app.state.jobs = Jobs(settings, publish=registry.publish)
        worker = None
        if settings.embedded_worker:
            if not settings.queue_url:
                # This process was the only worker: a job still 'running' lost its worker.
                app.state.jobs.store.fail_stale(
                    0, "interrupted: the server stopped while the job was running"
                )
            worker = JobWorker(app.state.jobs)
            worker.start()
        # Everything loaded so far lives as long as the process: keep it out of the cyclic GC's
        # full collections, which otherwise show up as tens-of-milliseconds tail latencies.
        gc.collect()
        gc.freeze()
        tasks = []
        if settings.registry_poll_s > 0:
            tasks.append(asyncio.create_task(_poll_registry(registry, settings.registry_poll_s)))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            if worker is not None:
                await run_in_threadpool(worker.stop)
            app.state.executor.shutdown()
            await app.state.sessions.close()

    app = FastAPI(
        title="policy-server",
        version="0.1.0",
        description="Serve and train TorchRL policies over HTTP.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.add_middleware(FastActMiddleware, fastapi_app=app)
    app.add_middleware(
        RequestContextMiddleware, metrics=app.state.metrics, timeout_s=settings.request_timeout_s
    )
    app.add_middleware(
        BodyLimitMiddleware, max_body=settings.max_body_bytes, max_upload=settings.max_upload_bytes
    )
    _install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(policies.router)
    app.include_router(envs.router)
    app.include_router(sessions.router)
    app.include_router(jobs.router)
    return app


async def _poll_registry(registry: Registry, every_s: float) -> None:
    """Pick up versions that other processes (training workers) wrote to the repository."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await run_in_threadpool(registry.refresh)
        except Exception:  # keep polling; a broken scan must not stop serving
            log.exception("registry refresh failed")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> FastJSONResponse:
        return FastJSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> FastJSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return FastJSONResponse({"detail": errors}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> FastJSONResponse:
        return FastJSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> FastJSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return FastJSONResponse({"detail": f"internal error: {type(exc).__name__}"}, 500)
