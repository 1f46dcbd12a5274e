"""Redis commands on one connection of their own, written as they come and answered in order.

Each redis-py call costs the event loop ~50-100 µs of Python (connection pool, retry wrapper,
timeout context, command packing, reply parsing) besides the round trip, and a session step
makes two (lock and read, write and unlock): under load that was a third of the CPU a Redis step
costs over the memory store's. ``RedisPipe`` sends the session scripts on one connection:
commands made in the same loop turn go out in one write (RESP pipelining: Redis answers in
order), replies are parsed by hiredis as they arrive and handed to their callers in that order.
Steps that arrive together thus share a write and a read, as the micro-batcher shares a forward
pass, at a few µs per call.

This is the one place that works around redis-py: the connection is opened by redis-py (the URL,
TLS, AUTH, SELECT, timeouts: its handshake, unchanged) and then read and written directly through
its stream pair (``Connection._reader``/``_writer``, private attributes). Errors are redis-py's
(``ConnectionError``, ``TimeoutError``, ``ResponseError``), so ``redis_available`` maps an
outage the same way; the next call after one reconnects.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


class RedisPipe:
    """``await pipe.call("GET", key)``; ``await pipe.script(script, keys, args)``.

    Args:
        redis: a ``redis.asyncio`` client: its connection pool makes (but does not hold) this
            pipe's connection, and ``script`` takes scripts registered on it
            (``redis.register_script``).
        timeout_s: a call with no reply after this long fails the connection (``TimeoutError``)
            and every call waiting on it.
    """

    def __init__(self, redis: Any, timeout_s: float) -> None:
        self._redis = redis
        self._timeout_s = timeout_s
        self._conn: Any = None  # the redis-py connection that made the handshake
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._connecting: asyncio.Lock | None = None
        self._waiting: deque[tuple[asyncio.Future, float]] = deque()  # sent, in order
        self._out: list[bytes] = []  # packed in this loop turn, written at its end
        self._watchdog: asyncio.TimerHandle | None = None
        self._closing: asyncio.Future | None = None  # the dropped connection's disconnect
        self.writes = 0  # socket writes made (several commands each under load)

    async def script(self, script: Any, keys: list, args: list) -> Any:
        """``EVALSHA``, and ``EVAL`` when Redis does not know the script (first use, a restart,
        ``SCRIPT FLUSH``), which also loads it."""
        try:
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.call("EVAL", script.script, len(keys), *keys, *args)

    async def call(self, *args: Any) -> Any:
        if self._writer is None:
            await self._connect()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((future, loop.time()))
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(hiredis.pack_command(args))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout_s, self._check)
        return await future

    def _flush(self) -> None:
        if self._out and self._writer is not None:
            self._writer.write(b"".join(self._out))
            self.writes += 1
        self._out.clear()

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is not None:
                return
            conn = self._redis.connection_pool.make_connection()
            await conn.connect()  # redis-py's ConnectionError / TimeoutError when it cannot
            self._conn, self._writer = conn, conn._writer
            parser = hiredis.Reader(replyError=ResponseError)
            self._reader_task = asyncio.ensure_future(self._read(conn._reader, parser, conn._writer))

    async def _read(self, reader: asyncio.StreamReader, parser: Any, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future, _ = self._waiting.popleft()
                    if future.done():  # its caller went away; the command ran all the same
                        continue
                    if isinstance(reply, ResponseError):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._fail(writer, exc)
        except (OSError, hiredis.ProtocolError, IndexError) as exc:  # reset, garbage, a stray reply
            self._fail(writer, RedisConnectionError(f"Redis connection lost: {exc!r}"))

    def _check(self) -> None:
        """The oldest call waiting: failed with the connection once it has waited too long."""
        self._watchdog = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        waited = loop.time() - self._waiting[0][1]
        if waited >= self._timeout_s:
            self._fail(self._writer, RedisTimeoutError(f"no reply from Redis in {self._timeout_s:g} s"))
        else:
            self._watchdog = loop.call_later(self._timeout_s - waited, self._check)

    def _fail(self, writer: asyncio.StreamWriter | None, exc: Exception) -> None:
        """Drop the connection ``writer`` belongs to: its waiting calls get ``exc``."""
        if writer is None or writer is not self._writer:
            return  # already dropped
        self._writer = None
        conn, self._conn = self._conn, None
        self._closing = asyncio.ensure_future(conn.disconnect(nowait=True))  # (held: weak refs)
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
        self._reader_task = None
        self._out.clear()
        waiting, self._waiting = self._waiting, deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(exc)

    async def close(self) -> None:
        self._fail(self._writer, RedisConnectionError("the pipe was closed"))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._closing is not None:
            await self._closing
