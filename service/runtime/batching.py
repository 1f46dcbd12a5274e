"""The inference thread: every forward pass runs here, off the event loop, one at a time.

One thread (torch's intra-op threads do the parallel work) makes per-request exploration
parameters and seeds safe, and is where micro-batching gathers concurrent calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class InferenceExecutor:
    """Runs callables on one dedicated thread; ``await run(fn, ...)`` from the event loop."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Blocking variant for worker threads (rollouts)."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
