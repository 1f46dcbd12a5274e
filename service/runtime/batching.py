"""The inference thread and the micro-batcher in front of it.

Every forward pass goes through the ``MicroBatcher``, one at a time, which makes per-request
exploration parameters and seeds safe. It gathers the act calls, session steps and rollout
steps that arrive while a forward pass runs and sends each group (same policy version, same
exploration parameters) as one pass: a lone request goes out at once, and under load batches
form by themselves, without a timer adding latency. Small passes run on the event loop (a
thread hop costs more than the pass); large ones on the inference thread. Per-request
state (observations, LSTM state, ``is_init``) is concatenated and split back by row ranges, so
requests batched together never share state.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from service.runtime.call import ActCall, ActResult, BatchKey, join, split
from service.runtime.policy import PolicyRuntime

T = TypeVar("T")

# a waiting call and the future its caller awaits
_Item = tuple[ActCall, asyncio.Future]


class InferenceExecutor:
    """Runs callables on one dedicated thread; ``await run(fn, ...)`` from the event loop."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class MicroBatcher:
    """Gathers concurrent forward passes of the same policy version into one.

    Args:
        executor: the inference thread.
        max_batch: most observations in one forward pass.
    """

    def __init__(
        self,
        executor: InferenceExecutor,
        max_batch: int = 1024,
        inline_rows: int = 64,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.executor = executor
        self.max_batch = max_batch
        self.inline_rows = inline_rows
        self._groups: OrderedDict[BatchKey, list[_Item]] = OrderedDict()
        self._busy = False
        self._scheduled = False
        self._loop = loop
        self.on_batch: Callable[[int], None] | None = None

    def submit_blocking(self, runtime: PolicyRuntime, call: ActCall) -> ActResult:
        """From a worker thread (rollouts): the same serialised path as HTTP calls."""
        if self._loop is None:
            raise RuntimeError("the micro-batcher was built without an event loop")
        return asyncio.run_coroutine_threadsafe(self.submit(runtime, call), self._loop).result()

    async def submit(self, runtime: PolicyRuntime, call: ActCall) -> ActResult:
        """``call``'s forward pass, shared with the calls of the same batch key waiting with it."""
        self._loop = loop = self._loop or asyncio.get_running_loop()
        future = loop.create_future()
        if runtime.stateful and call.state is None:  # every observation starts an episode
            call.state = runtime.zero_state(len(call.obs))
            call.is_init = torch.ones(len(call.obs), dtype=torch.bool)
        self._groups.setdefault(call.batch_key(runtime), []).append((call, future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        # call_soon, not a direct call: handlers already runnable enqueue first and join the batch.
        if not self._busy and not self._scheduled and self._groups:
            self._scheduled = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._busy or not self._groups:
            return
        self._busy = True
        key, items = next(iter(self._groups.items()))
        taken, rows = [], 0
        while items and (not taken or rows + len(items[0][0].obs) <= self.max_batch):
            item = items.pop(0)
            taken.append(item)
            rows += len(item[0].obs)
        if not items:
            del self._groups[key]
        if rows <= self.inline_rows and key.runtime.light:
            # Small forward passes run right here: cheaper than a thread hop, and short enough
            # (tens of microseconds) not to hold the loop back.
            fut = self._loop.create_future()
            try:
                fut.set_result(self._forward(key, taken))
            except Exception as exc:
                fut.set_exception(exc)
            self._done(fut, taken)
            return
        fut = asyncio.ensure_future(self.executor.run(self._forward, key, taken))
        fut.add_done_callback(lambda f: self._done(f, taken))

    @staticmethod
    def _forward(key: BatchKey, items: list[_Item]) -> list[ActResult]:
        runtime = key.runtime
        calls = [call for call, _ in items]
        return split(runtime.forward(join(calls, runtime.n_actions)), calls)

    def _done(self, fut: asyncio.Future, items: list[_Item]) -> None:
        exc = fut.exception()
        results: list[Any] = [exc] * len(items) if exc else fut.result()
        if self.on_batch is not None and not exc:
            self.on_batch(sum(len(call.obs) for call, _ in items))
        for (_, future), res in zip(items, results, strict=True):
            if future.done():
                continue  # the caller went away
            if isinstance(res, BaseException):
                future.set_exception(res)
            else:
                future.set_result(res)
        self._busy = False
        self._schedule()
