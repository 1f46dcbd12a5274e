"""Session stores: each client's recurrent state, kept by the server between calls.

``MemorySessionStore`` (one process) and ``RedisSessionStore`` (several API replicas) hold the
same ``Session`` record. State travels as raw bytes with its shape and dtype, never pickle.
Calls on one session are applied in order through ``lock(session_id)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
import struct
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import orjson
import torch

from service.errors import Busy
from service.exploration import Exploration, ExplorationParams
from service.redis_outage import COMMAND_TIMEOUT_S, CONNECT_TIMEOUT_S, redis_available
from service.runtime.redis_calls import RedisPipe

STORE = "the session store"
STATE_DTYPES = {"float32": np.float32, "uint8": np.uint8, "int64": np.int64, "bool": np.bool_}


@dataclass
class Session:
    """One client's session: pinned policy version, per-env recurrent state and counters."""

    policy: str
    version: int
    num_envs: int
    ttl_s: float
    exploration: Exploration | None = None
    epsilon: float | None = None
    noise_std: float | None = None
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    steps: int = 0
    expires_at: float = 0.0
    needs_init: torch.Tensor | None = None  # [num_envs] bool: next step starts an episode
    # the policy's per-env state (PolicyRuntime.zero_state): LSTM (h, c) and/or stacked frames
    state: tuple[torch.Tensor, ...] | None = None
    state_bytes: int = 0  # what that state takes once stepped: counted against the budget
    job: str | None = None  # bound to a source-sessions job: acts with its learner's policy
    # (job sessions) per env: the previous observation and action, whether there is one, and
    # the running episode return; a reported reward turns them into a transition
    pending: tuple[torch.Tensor, ...] | None = None
    # (job sessions) reward reported ahead of the next step (``SessionService.report``: RLlib's
    # LOG_RETURNS), the previous action's until a step with ``reported`` takes it
    reward_due: float = 0.0
    # (policy sessions) per env: the running return of the episode clients report rewards for
    returns: list[float] | None = None
    record: str | None = None  # (policy sessions) the dataset its episodes are recorded into
    indexed_until: float = 0.0  # (Redis) the expiry its index entries hold

    def __post_init__(self) -> None:
        if self.needs_init is None:
            self.needs_init = torch.ones(self.num_envs, dtype=torch.bool)
        if not self.expires_at:
            self.touch()

    @property
    def explore(self) -> ExplorationParams:
        """The exploration the session was created with: its steps' defaults."""
        return ExplorationParams(self.exploration, self.epsilon, self.noise_std)

    def touch(self, now: float | None = None) -> None:
        self.expires_at = (time.time() if now is None else now) + self.ttl_s

    def reset(self) -> None:
        self.needs_init = torch.ones(self.num_envs, dtype=torch.bool)
        self.state = None
        self.pending = None
        self.reward_due = 0.0
        self.returns = None

    def public(self) -> dict:
        return {
            "session_id": self.session_id,
            "policy": self.policy,
            "version": self.version,
            "num_envs": self.num_envs,
            "steps": self.steps,
            "job": self.job,
            "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires_at)),
        }

    # -- raw serialisation (Redis) ----------------------------------------------------------
    def meta_json(self) -> bytes:
        return orjson.dumps(
            {
                "policy": self.policy,
                "version": self.version,
                "num_envs": self.num_envs,
                "ttl_s": self.ttl_s,
                "exploration": self.exploration.value if self.exploration else None,
                "epsilon": self.epsilon,
                "noise_std": self.noise_std,
                "session_id": self.session_id,
                "steps": self.steps,
                "expires_at": self.expires_at,
                "state_bytes": self.state_bytes,
                "state": None if self.state is None else [_layout(t) for t in self.state],
                "pending": None if self.pending is None else [_layout(t) for t in self.pending],
                "job": self.job,
                "reward_due": self.reward_due,
                "returns": self.returns,
                "record": self.record,
                "indexed_until": self.indexed_until,
            }
        )

    def to_bytes(self) -> bytes:
        """The whole session as one value: the metadata's length (4 bytes, little-endian), the
        metadata as JSON, then the raw bytes of ``needs_init``, the state and ``pending`` in
        the layout the metadata lists."""
        meta = self.meta_json()
        tensors = (self.needs_init, *(self.state or ()), *(self.pending or ()))
        return b"".join([_HEADER.pack(len(meta)), meta, *(_raw(t) for t in tensors)])

    @classmethod
    def from_bytes(cls, blob: bytes) -> Session:
        (size,) = _HEADER.unpack_from(blob)
        meta = orjson.loads(memoryview(blob)[_HEADER.size : _HEADER.size + size])
        offset = _HEADER.size + size

        def take(dtype: type, shape: list[int]) -> torch.Tensor:
            nonlocal offset
            count = math.prod(shape)
            array = np.frombuffer(blob, dtype, count=count, offset=offset)
            offset += array.nbytes
            return torch.from_numpy(array.reshape(shape).copy())  # writable, its own memory

        layout, pending = meta.pop("state"), meta.pop("pending", None)
        expl = meta.pop("exploration")
        needs_init = take(np.bool_, [meta["num_envs"]])
        s = cls(**meta, exploration=Exploration(expl) if expl else None, needs_init=needs_init)
        if layout is not None:
            s.state = tuple(take(STATE_DTYPES[t["dtype"]], t["shape"]) for t in layout)
        if pending is not None:
            s.pending = tuple(take(STATE_DTYPES[t["dtype"]], t["shape"]) for t in pending)
        return s


_HEADER = struct.Struct("<I")


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes (C order, this machine's byte order; bool: one byte each)."""
    if t.device.type != "cpu":
        t = t.cpu()
    return t.detach().contiguous().numpy().tobytes()


def _layout(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def _limit_error(max_sessions: int, soonest_expiry: float | None, now: float) -> Busy:
    wait = 1 if soonest_expiry is None else max(1, int(soonest_expiry - now) + 1)
    return Busy(
        f"the server holds its limit of {max_sessions} live sessions; delete idle sessions or retry later",
        retry_after_s=wait,
    )


class SessionStore(ABC):
    """Where sessions live. Every method is safe to call from the event loop."""

    @abstractmethod
    async def create(self, session: Session, max_sessions: int, max_state_bytes: int | None = None) -> None:
        """Store a new session, or raise ``Busy`` (429) when ``max_sessions`` are live or (stores
        that hold state in this process) their state would pass ``max_state_bytes``."""

    @abstractmethod
    async def get(self, session_id: str) -> Session | None: ...

    @abstractmethod
    async def save(self, session: Session) -> None: ...

    @abstractmethod
    async def delete(self, session_id: str) -> bool: ...

    @abstractmethod
    async def count(self) -> int: ...

    @abstractmethod
    async def close_version(self, policy: str, version: int) -> int: ...

    @abstractmethod
    def lock(self, session_id: str, speculative: bool = False) -> AbstractAsyncContextManager[object]:
        """Held around every call on one session: calls apply one at a time, in order.

        ``speculative``: the caller can run its call again from the start — ``save`` may then
        raise ``StaleSession`` (the Redis store: another process wrote the session meanwhile)
        and nothing of the call was kept. Stores that never speculate ignore it."""

    def reserved_state_bytes(self) -> int:
        """Per-env state the live sessions of this process reserve (``MAX_SESSION_STATE_BYTES``);
        0 where the store's own memory bounds it (Redis: ``maxmemory``)."""
        return 0

    async def close(self) -> None:
        return None


class _KeyedLock:
    """``async with`` one session's lock within this process (both stores): the lock exists
    only while a call holds or waits for it, so calls on ids that name no session leave nothing
    behind."""

    __slots__ = ("locks", "key", "entry")

    def __init__(self, locks: dict[str, list], key: str) -> None:
        self.locks, self.key = locks, key

    async def __aenter__(self) -> None:
        entry = self.locks.get(self.key)
        if entry is None:
            entry = self.locks[self.key] = [asyncio.Lock(), 0]  # the lock, its holders + waiters
        entry[1] += 1
        self.entry = entry
        try:
            await entry[0].acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.entry[0].release()
        self._leave()

    def _leave(self) -> None:
        entry = self.entry
        entry[1] -= 1
        if entry[1] == 0 and self.locks.get(self.key) is entry:
            del self.locks[self.key]


class MemorySessionStore(SessionStore):
    """Sessions in this process's memory (the default).

    Args:
        clock: seconds since the epoch (``time.time``); tests pass their own to move time.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._locks: dict[str, list] = {}  # only the sessions a call holds or waits for
        self.state_bytes = 0  # reserved by the live sessions (Session.state_bytes summed)

    def _purge(self) -> None:
        now = self.clock()
        for sid in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            self._drop(sid)

    def _drop(self, session_id: str) -> bool:
        gone = self._sessions.pop(session_id, None)
        if gone is not None:
            self.state_bytes -= gone.state_bytes
        return gone is not None

    async def create(self, session: Session, max_sessions: int, max_state_bytes: int | None = None) -> None:
        self._purge()
        soonest = min((s.expires_at for s in self._sessions.values()), default=None)
        if len(self._sessions) >= max_sessions:
            raise _limit_error(max_sessions, soonest, self.clock())
        if max_state_bytes is not None and self.state_bytes + session.state_bytes > max_state_bytes:
            wait = 1 if soonest is None else max(1, int(soonest - self.clock()) + 1)
            raise Busy(
                f"live sessions hold {self.state_bytes} bytes of state; this one needs "
                f"{session.state_bytes} more and the budget is {max_state_bytes} "
                "(MAX_SESSION_STATE_BYTES): delete idle sessions, use fewer num_envs, or retry later",
                retry_after_s=wait,
            )
        session.touch(self.clock())
        self._sessions[session.session_id] = session
        self.state_bytes += session.state_bytes

    async def get(self, session_id: str) -> Session | None:
        s = self._sessions.get(session_id)
        if s is not None and s.expires_at <= self.clock():
            await self.delete(session_id)
            return None
        return s

    async def save(self, session: Session) -> None:
        if session.session_id in self._sessions:
            session.touch(self.clock())
            self._sessions[session.session_id] = session

    async def delete(self, session_id: str) -> bool:
        return self._drop(session_id)

    async def count(self) -> int:
        self._purge()
        return len(self._sessions)

    async def close_version(self, policy: str, version: int) -> int:
        gone = [k for k, s in self._sessions.items() if (s.policy, s.version) == (policy, version)]
        for sid in gone:
            await self.delete(sid)
        return len(gone)

    def lock(self, session_id: str, speculative: bool = False) -> _KeyedLock:
        return _KeyedLock(self._locks, session_id)

    def reserved_state_bytes(self) -> int:
        return self.state_bytes


class StaleSession(Exception):
    """(Redis) A speculative call's session was written by another process since this one wrote
    it: nothing was saved; run the call again under the lock."""


LOCK_TTL_MS = 30_000  # a crashed holder frees the session after this
LOCK_WAIT_S = 30.0  # then 429
CACHE_BYTES = 64 << 20  # (Redis) sessions this process wrote last, kept parsed: at most this much
CONTENDED_MAX = 65_536  # (Redis) sessions remembered as written by other processes too

# KEYS: lock, session; ARGV: token, ttl ms -> {1, session or false} when taken, {0} when held
_ACQUIRE_AND_READ = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('get', KEYS[2])}
end
return {0}
"""
# KEYS: session, index, lock, version index; ARGV: token ('' = no lock to release), ttl ms, id,
# index expiry ('' = leave the index entries as they are), 'XX' = only if the session still
# exists (a save: deleted or expired meanwhile stays gone) or 'NX' (a create), the session
_WRITE_AND_RELEASE = """
if redis.call('set', KEYS[1], ARGV[6], ARGV[5], 'PX', ARGV[2]) and ARGV[4] ~= '' then
  redis.call('zadd', KEYS[2], ARGV[4], ARGV[3])
  redis.call('zadd', KEYS[4], ARGV[4], ARGV[3])
end
if ARGV[1] ~= '' and redis.call('get', KEYS[3]) == ARGV[1] then
  redis.call('del', KEYS[3])
end
return 1
"""
# KEYS: session, index, lock, version index; ARGV: SHA-1 of the bytes this process wrote last,
# ttl ms, id, index expiry ('' = leave the index entries), the session -> 1 written, 0 refused:
# another call holds the lock, or the session is gone or no longer those bytes
_COMMIT = """
if redis.call('exists', KEYS[3]) == 1 then
  return 0
end
local current = redis.call('get', KEYS[1])
if not current or redis.sha1hex(current) ~= ARGV[1] then
  return 0
end
redis.call('set', KEYS[1], ARGV[5], 'PX', ARGV[2])
if ARGV[4] ~= '' then
  redis.call('zadd', KEYS[2], ARGV[4], ARGV[3])
  redis.call('zadd', KEYS[4], ARGV[4], ARGV[3])
end
return 1
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class WrittenCache:
    """(Redis) The sessions this process wrote last, parsed, with the bytes it wrote: LRU,
    bounded by ``max_bytes`` (counted twice per entry: the bytes and the parsed tensors).

    A step reads the session's bytes with its lock; when they are the bytes this process wrote,
    no one wrote since, and the session is taken from here instead of parsed again (with sticky
    routing, every step after the first). An entry is taken out for the step and put back by its
    save: a step that fails midway leaves none behind.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, tuple[bytes, Session]] = OrderedDict()

    def take(self, session_id: str, blob: bytes) -> Session | None:
        entry = self._entries.pop(session_id, None)
        if entry is None:
            return None
        self.nbytes -= 2 * len(entry[0])
        return entry[1] if entry[0] == blob else None

    def peek(self, session_id: str) -> bytes | None:
        """The bytes this process wrote last for the session, if kept."""
        entry = self._entries.get(session_id)
        return None if entry is None else entry[0]

    def put(self, session_id: str, blob: bytes, session: Session) -> None:
        self.drop(session_id)
        if 2 * len(blob) > self.max_bytes:
            return
        self._entries[session_id] = (blob, session)
        self.nbytes += 2 * len(blob)
        while self.nbytes > self.max_bytes:
            _, (old, _) = self._entries.popitem(last=False)
            self.nbytes -= 2 * len(old)

    def drop(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self.nbytes -= 2 * len(entry[0])


@dataclass
class _Held:
    token: str
    blob: bytes | None  # the session as read with the lock (None: there is none)
    taken: bool = False  # get took it: later reads go to Redis
    released: bool = False
    speculative: bool = False  # no lock taken: save commits only over ``blob`` (else StaleSession)


class RedisSessionStore(SessionStore):
    """Sessions in Redis, shared by every API process: one value per session
    (``Session.to_bytes``) with a TTL.

    ``ps:sessions`` (sorted set, score = expiry) counts live sessions for the limit;
    ``ps:version:<policy>:<version>`` (the same, per pinned version) lists the sessions
    ``close_version`` closes without reading every session; ``ps:lock:<id>`` serialises calls
    on one session across processes. While Redis is down every call raises ``Unavailable`` and
    changes nothing.
    """

    PREFIX = "ps:s:"  # (ps:session: held hashes, before one value per session)
    LOCK_PREFIX = "ps:lock:"
    INDEX = "ps:sessions"
    VERSION_PREFIX = "ps:version:"

    def __init__(self, url: str, cache_bytes: int = CACHE_BYTES) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=COMMAND_TIMEOUT_S
        )
        self._acquire_script = self._redis.register_script(_ACQUIRE_AND_READ)
        self._write_script = self._redis.register_script(_WRITE_AND_RELEASE)
        self._release_script = self._redis.register_script(_RELEASE)
        self._commit_script = self._redis.register_script(_COMMIT)
        self._pipe = RedisPipe(self._redis, COMMAND_TIMEOUT_S)  # the scripts of steps, pipelined
        # sessions this process holds the lock of: their token, the session read with it
        self._held: dict[str, _Held] = {}
        # lock tokens: unique across processes (a random prefix), cheap within one (a counter)
        self._token_prefix, self._tokens = uuid.uuid4().hex[:16], itertools.count()
        self._cache = WrittenCache(cache_bytes)
        # this process's calls on one session, one at a time in arrival order (then Redis's lock
        # or a speculative commit orders them against other processes')
        self._locks: dict[str, list] = {}
        # sessions a speculative call found written by another process: stepped under the lock
        # until a locked call finds this process's bytes again (bounded: least recent dropped)
        self._contended: OrderedDict[str, None] = OrderedDict()

    def _key(self, sid: str) -> str:
        return self.PREFIX + sid

    async def create(self, session: Session, max_sessions: int, max_state_bytes: int | None = None) -> None:
        # the state lives in Redis, not in this process: Redis's own maxmemory bounds it
        r = self._redis
        with redis_available(STORE):
            now = time.time()
            await r.zremrangebyscore(self._version_key(session.policy, session.version), "-inf", now)
            await r.zremrangebyscore(self.INDEX, "-inf", now)
            if await r.zcard(self.INDEX) >= max_sessions:
                first = await r.zrange(self.INDEX, 0, 0, withscores=True)
                raise _limit_error(max_sessions, first[0][1] if first else None, time.time())
            self._cache.put(session.session_id, await self._write(session), session)

    def _index_update(self, session: Session) -> float | str:
        """The index entries' new expiry, or '' to leave them (see ``_write``)."""
        if session.expires_at > session.indexed_until:
            session.indexed_until = session.expires_at + session.ttl_s / 16
            return session.indexed_until
        return ""

    def _keys(self, session: Session) -> list[str]:
        sid = session.session_id
        return [
            self._key(sid),
            self.INDEX,
            self._lock_key(sid),
            self._version_key(session.policy, session.version),
        ]

    async def _write(self, session: Session, token: str = "", only_if_exists: bool = False) -> bytes:
        """One round trip: the session, its TTL and index entries (and its lock released).

        The index entries (score: an expiry) are rewritten only when the session would outlive
        them, and then set ``ttl_s / 16`` past its expiry: a session stepped without pause
        rewrites them once per sixteenth of its TTL, not at every step (two ``ZADD`` of the
        five commands a step costs Redis). So they may outlast it by that much: it counts
        towards ``MAX_SESSIONS`` up to ``ttl_s / 16`` after it expired (``close_version``
        then finds it gone).
        """
        index = self._index_update(session)
        blob = session.to_bytes()
        mode = "XX" if only_if_exists else "NX"
        args = [token, int(session.ttl_s * 1000), session.session_id, index, mode, blob]
        await self._pipe.script(self._write_script, self._keys(session), args)
        return blob

    async def _commit(self, session: Session, over: bytes) -> bytes | None:
        """One round trip: the session written only if Redis still holds ``over`` and no call
        holds its lock; its bytes, or None when refused."""
        index = self._index_update(session)
        blob = session.to_bytes()
        expected = hashlib.sha1(over, usedforsecurity=False).hexdigest()
        args = [expected, int(session.ttl_s * 1000), session.session_id, index, blob]
        written = await self._pipe.script(self._commit_script, self._keys(session), args)
        return blob if written else None

    async def get(self, session_id: str) -> Session | None:
        held = self._held.get(session_id)
        if held is not None and not held.taken:  # read with the lock: no round trip
            blob, held.taken = held.blob, True
            if blob is not None and (written := self._cache.take(session_id, blob)) is not None:
                self._contended.pop(session_id, None)  # no one else wrote since: speculate again
                return written  # the bytes this process wrote last: parsed already
        else:
            with redis_available(STORE):
                blob = await self._redis.get(self._key(session_id))
        if blob is None:
            self._cache.drop(session_id)
            with redis_available(STORE):
                await self._redis.zrem(self.INDEX, session_id)
            return None
        return Session.from_bytes(blob)

    async def save(self, session: Session) -> None:
        """Write the session if it still exists; under ``lock``, also release it: one round trip."""
        session.touch()
        held = self._held.get(session.session_id)
        if held is not None and held.speculative:
            with redis_available(STORE):
                blob = await self._commit(session, held.blob)
            if blob is None:
                self._contended[session.session_id] = None
                while len(self._contended) > CONTENDED_MAX:
                    self._contended.popitem(last=False)
                raise StaleSession(session.session_id)
            self._cache.put(session.session_id, blob, session)
            return
        with redis_available(STORE):
            blob = await self._write(session, held.token if held else "", only_if_exists=True)
        if held is not None:
            held.released = True
        self._cache.put(session.session_id, blob, session)

    async def delete(self, session_id: str) -> bool:
        self._cache.drop(session_id)
        with redis_available(STORE):
            async with self._redis.pipeline(transaction=True) as p:
                p.delete(self._key(session_id))
                p.zrem(self.INDEX, session_id)
                deleted, _ = await p.execute()
        return bool(deleted)

    async def count(self) -> int:
        with redis_available(STORE):
            await self._redis.zremrangebyscore(self.INDEX, "-inf", time.time())
            return int(await self._redis.zcard(self.INDEX))

    async def close_version(self, policy: str, version: int) -> int:
        """Delete the sessions pinned to ``policy`` ``version``: those its index lists (it may
        also list sessions deleted or expired since; they are gone already)."""
        key = self._version_key(policy, version)
        with redis_available(STORE):
            ids = await self._redis.zrange(key, 0, -1)
            await self._redis.delete(key)
        closed = 0
        for sid in ids:
            closed += await self.delete(sid.decode())
        return closed

    def _lock_key(self, sid: str) -> str:
        return self.LOCK_PREFIX + sid

    def _version_key(self, policy: str, version: int) -> str:
        return f"{self.VERSION_PREFIX}{policy}:{version}"

    @asynccontextmanager
    async def lock(self, session_id: str, speculative: bool = False) -> AsyncIterator[None]:
        """Hold the session across processes (a token under ``ps:lock:<id>``, 30 s TTL).

        Acquiring also reads the session (``get`` then costs nothing) and ``save`` releases
        it: a call is two round trips. Waits up to 30 s for another holder, then 429.

        ``speculative``, when this process wrote the session last (its bytes are cached) and
        no speculation on it failed since: no lock is taken; the call runs on the cached
        session and ``save`` commits it only if Redis still holds those bytes and no other
        call holds the lock — one round trip a call (with sticky routing, nearly every step).
        Otherwise ``save`` raises ``StaleSession``, having changed nothing.
        """
        async with _KeyedLock(self._locks, session_id):
            cached = self._cache.peek(session_id) if speculative else None
            if cached is not None and session_id not in self._contended:
                held = _Held("", cached, released=True, speculative=True)
                self._held[session_id] = held
                try:
                    yield
                finally:
                    if self._held.get(session_id) is held:
                        del self._held[session_id]
                return
            async with self._locked(session_id):
                yield

    @asynccontextmanager
    async def _locked(self, session_id: str) -> AsyncIterator[None]:
        token = f"{self._token_prefix}{next(self._tokens)}"
        key, lock_key = self._key(session_id), self._lock_key(session_id)
        wait, deadline = 0.001, time.monotonic() + LOCK_WAIT_S
        while True:
            with redis_available(STORE):
                reply = await self._pipe.script(self._acquire_script, [lock_key, key], [token, LOCK_TTL_MS])
            if reply[0]:
                break
            if time.monotonic() >= deadline:
                raise Busy(f"session {session_id[:64]!r} is held by another call; retry", retry_after_s=1)
            await asyncio.sleep(wait)
            wait = min(wait * 2, 0.05)
        held = _Held(token, reply[1])
        self._held[session_id] = held
        try:
            yield
        finally:
            if self._held.get(session_id) is held:  # (save released it: another may hold it now)
                del self._held[session_id]
            if not held.released:
                with contextlib.suppress(Exception):  # expired or Redis gone: the TTL frees it
                    await self._pipe.script(self._release_script, [lock_key], [token])

    async def close(self) -> None:
        await self._pipe.close()
        await self._redis.aclose()


def make_session_store(url: str) -> SessionStore:
    if url == "memory":
        return MemorySessionStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisSessionStore(url)
    raise ValueError(f"POLICY_SERVER_SESSION_STORE={url!r}: expected 'memory' or redis://…")
