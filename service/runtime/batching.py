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
import itertools
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch

from service.runtime.policy import (
    ActResult,
    Exploration,
    Observations,
    PolicyRuntime,
    State,
    stack_observations,
)

T = TypeVar("T")


class InferenceExecutor:
    """Runs callables on one dedicated thread; ``await run(fn, ...)`` from the event loop."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class BatchKey(NamedTuple):
    """Calls with equal keys may share a forward pass: same policy version, same exploration.

    ``ticket`` is 0 for every unseeded call and unique for each seeded one: a seeded call's
    random draws must not depend on who else is in the batch, so it always goes alone.
    """

    runtime: PolicyRuntime
    exploration: Exploration
    epsilon: float | None
    noise_std: float | None
    seed: int | None
    ticket: int = 0


@dataclass
class _Item:
    obs: Observations
    state: State | None
    is_init: torch.Tensor | None
    return_info: bool
    mask: torch.Tensor | None
    future: asyncio.Future = field(repr=False)


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
        self._tickets = itertools.count(1)
        self._busy = False
        self._scheduled = False
        self._loop = loop
        self.on_batch: Callable[[int], None] | None = None

    def act_blocking(self, runtime: PolicyRuntime, obs: torch.Tensor, **kwargs: Any) -> ActResult:
        """From a worker thread (rollouts): the same serialised path as HTTP calls."""
        if self._loop is None:
            raise RuntimeError("the micro-batcher was built without an event loop")
        return asyncio.run_coroutine_threadsafe(self.act(runtime, obs, **kwargs), self._loop).result()

    async def act(
        self,
        runtime: PolicyRuntime,
        obs: Observations,
        *,
        exploration: Exploration,
        epsilon: float | None = None,
        noise_std: float | None = None,
        seed: int | None = None,
        return_info: bool = False,
        state: State | None = None,
        is_init: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> ActResult:
        self._loop = loop = self._loop or asyncio.get_running_loop()
        future = loop.create_future()
        key = BatchKey(
            runtime,
            runtime.resolve(exploration),
            epsilon,
            noise_std,
            seed,
            next(self._tickets) if seed is not None else 0,
        )
        if runtime.stateful and state is None:
            state = runtime.zero_state(len(obs))
            is_init = torch.ones(len(obs), dtype=torch.bool)
        self._groups.setdefault(key, []).append(_Item(obs, state, is_init, return_info, mask, future))
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
        while items and (not taken or rows + len(items[0].obs) <= self.max_batch):
            item = items.pop(0)
            taken.append(item)
            rows += len(item.obs)
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
        obs = stack_observations([i.obs for i in items])
        state = is_init = None
        if runtime.stateful:
            state = tuple(torch.cat(parts) for parts in zip(*(i.state for i in items), strict=True))
            is_init = torch.cat(
                [
                    i.is_init if i.is_init is not None else torch.zeros(len(i.obs), dtype=torch.bool)
                    for i in items
                ]
            )
        mask = None
        if any(i.mask is not None for i in items):  # callers without one allow every action
            mask = torch.cat(
                [
                    i.mask
                    if i.mask is not None
                    else torch.ones(len(i.obs), runtime.n_actions, dtype=torch.bool)
                    for i in items
                ]
            )
        result = runtime.act(
            obs,
            exploration=key.exploration,
            epsilon=key.epsilon,
            noise_std=key.noise_std,
            seed=key.seed,
            return_info=any(i.return_info for i in items),
            state=state,
            is_init=is_init,
            mask=mask,
        )
        if len(items) == 1:
            return [result]
        out, start = [], 0
        actions = result.action.tolist()  # once for the batch: each caller's payload slices it
        for item in items:
            stop = start + len(item.obs)
            out.append(result.rows(start, stop, item.return_info, actions))
            start = stop
        return out

    def _done(self, fut: asyncio.Future, items: list[_Item]) -> None:
        exc = fut.exception()
        results: list[Any] = [exc] * len(items) if exc else fut.result()
        if self.on_batch is not None and not exc:
            self.on_batch(sum(len(i.obs) for i in items))
        for item, res in zip(items, results, strict=True):
            if item.future.done():
                continue  # the caller went away
            if isinstance(res, BaseException):
                item.future.set_exception(res)
            else:
                item.future.set_result(res)
        self._busy = False
        self._schedule()
