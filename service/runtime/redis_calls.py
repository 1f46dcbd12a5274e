"""Redis script calls that arrive together, sent together: one pipeline, one round trip.

Each redis-py call costs the event loop ~100 µs of Python (its connection pool, retry wrapper,
timeout, command packing and reply parsing) besides the round trip; a session step makes two
(lock and read, write and unlock). ``ScriptCalls`` queues the calls made while a pipeline is in
flight, or in the same loop turn, and sends them as the next pipeline (not a transaction: each
script is atomic by itself, and they touch different sessions or run in their caller's order),
so that under load many steps share that cost, as the micro-batcher shares a forward pass.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import NoScriptError


class ScriptCalls:
    """``await calls.run(script, keys, args)``: ``script(keys=keys, args=args)``, pipelined.

    Args:
        redis: a ``redis.asyncio`` client; ``run`` takes scripts registered on it
            (``redis.register_script``). A script the server does not know (first use, a
            restart, ``SCRIPT FLUSH``) is loaded and run alone, then found in later pipelines.
    """

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._queue: list[tuple[Any, list, list, asyncio.Future]] = []
        self._busy = False
        self._task: asyncio.Task | None = None  # the pipeline in flight (held: the loop keeps weak refs)

    async def run(self, script: Any, keys: list, args: list) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((script, keys, args, future))
        if not self._busy:
            self._busy = True
            # call_soon: the handlers already runnable in this loop turn queue their calls first
            asyncio.get_running_loop().call_soon(self._send)
        return await future

    def _send(self) -> None:
        batch, self._queue = self._queue, []
        self._task = asyncio.ensure_future(self._execute(batch))
        self._task.add_done_callback(self._sent)

    def _sent(self, _task: asyncio.Task) -> None:
        self._task = None
        if self._queue:
            self._send()  # what queued meanwhile: the next pipeline
        else:
            self._busy = False
        self._task: asyncio.Task | None = None  # the pipeline in flight (held: the loop keeps weak refs)

    async def _execute(self, batch: list[tuple[Any, list, list, asyncio.Future]]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for script, keys, args, _ in batch:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection: no call of the batch has an answer
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            for *_, future in batch:
                future.cancel()
            raise
        for (script, keys, args, future), result in zip(batch, results, strict=True):
            if isinstance(result, NoScriptError):  # not run: load it and run it, alone
                try:
                    result = await script(keys=keys, args=args)
                except Exception as exc:
                    result = exc
            if future.done():
                continue  # the caller went away (its call ran all the same)
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
