"""A bounded pool of upstream connections with FIFO waiters, an acquire timeout and lifetimes."""

from __future__ import annotations

import asyncio
import functools
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from proxy.errors import TOO_MANY_CONNECTIONS, ProxyError


class Poolable(Protocol):
    """What the pool needs of a connection."""

    created_at: float
    idle_since: float
    cancels: int  # cancel requests for it still on their way to its server

    @property
    def broken(self) -> bool: ...

    def close(self) -> None: ...

    def when_cancels_end(self, callback: Callable[[], None], /) -> None: ...


C = TypeVar("C", bound=Poolable)
T_contra = TypeVar("T_contra", contravariant=True)


class _Waiter(Protocol[T_contra]):
    """A queued acquire: an asyncio future (``acquire``) or a callback (``wait``)."""

    def done(self) -> bool: ...

    def set_result(self, result: T_contra, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


# What a callback waiter is given: a connection, None ("a slot is free: open one"), or the error. It
# answers whether it took what it was given: False when its client has gone (then it goes on).
Handoff = Callable[[C | None, ProxyError | None], bool]


class _CallbackWaiter(Generic[C]):
    """A waiter without a task: its callback runs from the event loop when it is served or times out. Served
    on the loop's next turn, not in the frame that released the connection: the waiting units of one poll
    batch go upstream together after its replies have gone to their clients (handing over in the
    releasing frame was measured: pgbench then spent 3-4 µs more per transaction, its replies trickling
    out between the sends, and the proxy no less). A waiter whose client has gone by then answers False
    and what it was given goes to the next one. No timer of its own either: the pool keeps one for the
    earliest deadline of all (``Pool._expire_waiters``), so a hand-over costs no timer to arm and
    cancel."""

    __slots__ = ("_done", "deadline", "give", "loop", "pool", "started")

    def __init__(self, pool: Pool[C], loop: asyncio.AbstractEventLoop, give: Handoff[C]) -> None:
        self.pool = pool
        self.loop = loop  # the pool's (Pool.loop)
        self.give = give
        self.started = time.monotonic()
        self.deadline = self.started + pool.acquire_timeout
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: C | None, /) -> None:
        self._finish()
        self.loop.call_soon(self._give, result)

    def _give(self, result: C | None) -> None:
        if not self.give(result, None):  # its client has gone: the connection, or the slot, goes on
            if result is None:
                self.pool._wake_one()
            else:
                self.pool.release(result)

    def set_exception(self, exception: BaseException, /) -> None:
        assert isinstance(exception, ProxyError)
        self._finish()
        self.loop.call_soon(self.give, None, exception)

    def _finish(self) -> None:
        self._done = True
        self.pool._observe_wait(time.monotonic() - self.started)


@dataclass(frozen=True)
class PoolStats:
    """A snapshot for health output and metrics."""

    total: int
    idle: int
    active: int
    waiting: int
    max: int


WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Pool(Generic[C]):
    """At most ``size`` connections; waiters served first come, first served.

    ``acquire`` returns an idle connection, opens a new one while under ``size``, or waits up to
    ``acquire_timeout`` and then raises ProxyError 53300. ``release`` hands the connection to the oldest
    waiter, or keeps it idle; a broken or expired connection is closed instead, freeing its slot. A
    connection with a cancel request in flight is parked until the cancel has reached its server.

    *Lingering*: a client between transactions may keep its connection (``linger``) while nobody else
    needs it, so a client that is alone on a connection pays no hand-over per transaction. The pool takes a
    lingering connection back (``reclaim`` tells its client) the moment another client asks and nothing is
    idle; a client never lingers while others wait. For sizing and health, lingering counts as idle.
    """

    def __init__(
        self,
        name: str,
        connect: Callable[[], Awaitable[C]],
        *,
        size: int,
        acquire_timeout: float,
        idle_timeout: float = 0.0,
        max_lifetime: float = 0.0,
    ) -> None:
        self.name = name
        self._connect = connect
        self.size = size
        self.acquire_timeout = acquire_timeout
        self.idle_timeout = idle_timeout
        self.max_lifetime = max_lifetime
        self._idle: list[C] = []  # LIFO: the warmest connection is reused first
        # Idle connections still attached to their last client, oldest first, with its reclaim callback.
        self._lingering: dict[C, Callable[[], None]] = {}
        self._total = 0  # open connections plus connects in progress
        # A waiter's future gets a connection, or None: "a slot is free, open one yourself".
        self._waiters: deque[_Waiter[C | None]] = deque()
        self._waiter_timer: asyncio.TimerHandle | None = None  # the callback waiters' earliest deadline
        # The event loop the callback waiters are handed over on, taken when the first one waits:
        # asyncio.get_running_loop() costs a getpid() system call (CPython 3.11), once per hand-over.
        self.loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.timeouts = 0  # acquire timeouts since start (a metric)
        # Acquire waits as a histogram (plain ints on the hot path; the metrics collector reads them).
        self.wait_counts = [0] * (len(WAIT_BUCKETS) + 1)  # per bucket, not cumulative; last is +Inf
        self.wait_sum = 0.0

    @property
    def stats(self) -> PoolStats:
        idle = len(self._idle) + len(self._lingering)
        return PoolStats(self._total, idle, self._total - idle, len(self._waiters), self.size)

    def try_acquire(self) -> C | None:
        """An idle connection at once, or None (then use ``acquire``). Never jumps the waiters' queue."""
        if self._closed or self._waiters:
            return None
        conn = self._take_idle() or self._steal()
        if conn is not None:
            self.wait_counts[0] += 1
        return conn

    def wait(self, give: Handoff[C]) -> bool:
        """Queue ``give`` for the next connection released (first come, first served) when the pool is
        full; False when a connection may be opened instead (use ``acquire``). No task per wait: this is
        the hand-over path of every transaction when clients outnumber connections."""
        if self._closed or (self._total < self.size and not self._waiters):
            return False
        if self.loop is None or self.loop.is_closed():
            self.loop = asyncio.get_running_loop()
        waiter = _CallbackWaiter(self, self.loop, give)
        self._waiters.append(waiter)
        if self._waiter_timer is None:
            self._arm(waiter.deadline)
        return True

    def _arm(self, deadline: float) -> None:
        delay = max(deadline - time.monotonic(), 0.0)
        loop = self.loop
        assert loop is not None  # armed only once a callback waiter has waited (``wait``)
        self._waiter_timer = loop.call_later(delay, self._expire_waiters)

    def _expire_waiters(self) -> None:
        """The timer of the earliest callback waiter's deadline: those whose time is up get 53300 (within
        the loop's millisecond); the timer is armed again for the earliest left."""
        self._waiter_timer = None
        now = time.monotonic() + 0.001
        earliest: float | None = None
        for waiter in list(self._waiters):
            if not isinstance(waiter, _CallbackWaiter) or waiter.done():
                continue
            if waiter.deadline <= now:
                self._waiters.remove(waiter)
                self.timeouts += 1
                waiter.set_exception(self._timeout_error(time.monotonic() - waiter.started))
            elif earliest is None or waiter.deadline < earliest:
                earliest = waiter.deadline
        if earliest is not None:
            self._arm(earliest)

    def _timeout_error(self, waited: float) -> ProxyError:
        return ProxyError(
            TOO_MANY_CONNECTIONS,
            f'no connection free in pool "{self.name}" after waiting '
            f"{waited:.1f}s (pool_size {self.size}, acquire_timeout {self.acquire_timeout:g}s)",
            hint="raise the pool size or shorten the transactions holding connections",
        )

    async def acquire(self) -> C:
        """Lease a connection; raises ProxyError 53300 after the acquire timeout, or the connect error."""
        started = time.monotonic()
        try:
            return await self._acquire()
        finally:
            self._observe_wait(time.monotonic() - started)

    def _observe_wait(self, seconds: float) -> None:
        self.wait_sum += seconds
        self.wait_counts[bisect_left(WAIT_BUCKETS, seconds)] += 1  # the first bound >= seconds, else +Inf

    async def _acquire(self) -> C:
        if self._closed:
            raise ProxyError(TOO_MANY_CONNECTIONS, f'pool "{self.name}" is closed')
        conn = self._take_idle()
        if conn is not None:
            return conn
        if self._total < self.size and not self._waiters:
            return await self._open()
        if not self._waiters:
            conn = self._steal()
            if conn is not None:
                return conn
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.acquire_timeout
        retry = False
        while True:
            fut: asyncio.Future[C | None] = loop.create_future()
            # A waiter woken to open a connection that lost the slot keeps its place at the front.
            (self._waiters.appendleft if retry else self._waiters.append)(fut)
            try:
                got = await asyncio.wait_for(fut, max(deadline - loop.time(), 0))
            except TimeoutError:
                self.timeouts += 1
                raise self._timeout_error(loop.time() - started) from None
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
            if got is not None:
                return got
            if self._total < self.size:
                return await self._open()
            retry = True

    async def open_idle(self) -> bool:
        """Open one connection now and keep it idle (or hand it to the oldest waiter); False, without
        trying, when the pool is full or closed. Raises the connect error."""
        broken = [conn for conn in self._idle if conn.broken]  # e.g. the upstream restarted: free their slots
        for conn in broken:
            self._idle.remove(conn)
            self._discard(conn)
        if self._closed or self._total >= self.size:
            return False
        self.release(await self._open())
        return True

    def idle_connections(self) -> list[C]:
        """Connections in the pool, not leased (lingering ones are their client's)."""
        return list(self._idle)

    def resize(self, size: int) -> None:
        """A reload changed the pool size: more room wakes waiters; less closes idle ones beyond it."""
        grow = size - self.size
        self.size = size
        for _ in range(max(grow, 0)):
            self._wake_one()
        while self._total > self.size and self._idle:
            self._discard(self._idle.pop(0))

    def linger(self, conn: C, reclaim: Callable[[], None]) -> bool:
        """Let the client keep ``conn`` between transactions; False means release it now instead."""
        if self._waiters or self._closed or conn.broken or conn.cancels:
            return False
        now = time.monotonic()
        if self._expired(conn, now):
            return False
        conn.idle_since = now
        self._lingering[conn] = reclaim
        return True

    def unlinger(self, conn: C) -> None:
        """The lingering client starts a transaction on its connection again."""
        del self._lingering[conn]

    def release(self, conn: C, *, reusable: bool = True) -> None:
        """Give a leased connection back. ``reusable=False`` closes it (dirty, broken, or unknown state)."""
        self._lingering.pop(conn, None)
        now = time.monotonic()
        if not reusable or conn.broken or self._closed or self._expired(conn, now):
            self._discard(conn)
            return
        if conn.cancels:
            # A cancel of its last client's statement may not have reached the server yet; landing later it
            # would cancel the next client's. Parked (still counted, not idle) until the postmaster has
            # signalled the backend: then released again, or discarded if that was not confirmed.
            conn.when_cancels_end(functools.partial(self.release, conn))
            return
        if self._serve_next(conn):
            return
        conn.idle_since = now
        self._idle.append(conn)

    def reap(self) -> int:
        """Close idle connections past idle_timeout or max_lifetime; returns how many were closed."""
        now = time.monotonic()
        for conn in [c for c in self._lingering if self._idle_too_long(c, now) or self._expired(c, now)]:
            self._lingering.pop(conn)()
            self._idle.append(conn)
        keep: list[C] = []
        drop: list[C] = []
        for conn in self._idle:
            stale = conn.broken or self._expired(conn, now) or self._idle_too_long(conn, now)
            (drop if stale else keep).append(conn)
        self._idle = keep
        for conn in drop:
            self._discard(conn)
        return len(drop)

    def close(self) -> None:
        """Close idle connections now; leased ones are closed when released."""
        self._closed = True
        while self._lingering:
            conn, reclaim = self._lingering.popitem()
            reclaim()
            self._idle.append(conn)
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)
        if self._waiter_timer is not None:
            self._waiter_timer.cancel()
            self._waiter_timer = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ProxyError(TOO_MANY_CONNECTIONS, f'pool "{self.name}" is closed'))

    def _take_idle(self) -> C | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.broken or self._expired(conn, now):
                self._discard(conn)
                continue
            return conn
        return None

    def _steal(self) -> C | None:
        """Take back the longest-lingering connection from its client."""
        now = time.monotonic()
        while self._lingering:
            conn = next(iter(self._lingering))
            self._lingering.pop(conn)()
            if conn.broken or self._expired(conn, now):
                self._discard(conn)
                continue
            return conn
        return None

    async def _open(self) -> C:
        self._total += 1
        try:
            conn = await self._connect()
        except BaseException:
            self._total -= 1
            self._wake_one()
            raise
        conn.idle_since = time.monotonic()
        return conn

    def _discard(self, conn: C) -> None:
        conn.close()
        self._total -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        self._serve_next(None)

    def _serve_next(self, result: C | None) -> bool:
        """Give ``result`` (a connection, or None: a free slot) to the oldest waiter still waiting (one
        that timed out is done already); False when none is."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(result)
                return True
        return False

    def _expired(self, conn: C, now: float) -> bool:
        return self.max_lifetime > 0 and now - conn.created_at > self.max_lifetime

    def _idle_too_long(self, conn: C, now: float) -> bool:
        return self.idle_timeout > 0 and now - conn.idle_since > self.idle_timeout
