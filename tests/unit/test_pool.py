"""The pool's contract: size bound, FIFO waiters, 53300 after the timeout, lifetimes, broken connections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from proxy.errors import ProxyError
from proxy.pool import Pool


class Conn:
    """A stand-in upstream connection: the pool only needs these members."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.created_at = time.monotonic()
        self.idle_since = self.created_at
        self.broken = False
        self.closed = False
        self.cancels = 0
        self.cancels_done: Callable[[], None] | None = None

    def close(self) -> None:
        self.closed = True

    def when_cancels_end(self, callback: Callable[[], None]) -> None:
        self.cancels_done = callback


def make_pool(size: int = 2, timeout: float = 5.0, **kw: float) -> tuple[Pool[Conn], list[Conn]]:
    opened: list[Conn] = []

    async def connect() -> Conn:
        conn = Conn(len(opened))
        opened.append(conn)
        return conn

    return Pool("main", connect, size=size, acquire_timeout=timeout, **kw), opened


def test_reuses_idle_and_bounds_size() -> None:
    async def run() -> None:
        pool, opened = make_pool(size=2)
        a = await pool.acquire()
        b = await pool.acquire()
        assert pool.stats.total == 2 and pool.stats.active == 2
        pool.release(a)
        c = await pool.acquire()
        assert c is a and len(opened) == 2
        pool.release(b)
        pool.release(c)
        assert (pool.stats.idle, pool.stats.active, pool.stats.waiting) == (2, 0, 0)

    asyncio.run(run())


def test_waiters_are_served_first_come_first_served() -> None:
    async def run() -> None:
        pool, _ = make_pool(size=1)
        held = await pool.acquire()
        order: list[int] = []

        async def client(i: int) -> None:
            conn = await pool.acquire()
            order.append(i)
            await asyncio.sleep(0)
            pool.release(conn)

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(client(i)))
            await asyncio.sleep(0)  # queue them in a known order
        assert pool.stats.waiting == 5
        pool.release(held)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4]

    asyncio.run(run())


def test_acquire_timeout_is_53300_naming_the_pool() -> None:
    async def run() -> None:
        pool, _ = make_pool(size=1, timeout=0.05)
        held = await pool.acquire()
        with pytest.raises(ProxyError) as info:
            await pool.acquire()
        assert info.value.sqlstate == "53300"
        assert 'pool "main"' in info.value.message
        assert pool.stats.waiting == 0
        pool.release(held)
        assert await pool.acquire() is held

    asyncio.run(run())


def test_broken_connection_frees_its_slot_for_a_waiter() -> None:
    async def run() -> None:
        pool, opened = make_pool(size=1)
        held = await pool.acquire()
        waiter = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        held.broken = True
        pool.release(held)
        fresh = await asyncio.wait_for(waiter, 1)
        assert held.closed and fresh is opened[1] and pool.stats.total == 1

    asyncio.run(run())


def test_connection_with_a_cancel_in_flight_is_parked_until_it_lands() -> None:
    async def run() -> None:
        pool, opened = make_pool(size=1)
        held = await pool.acquire()
        waiter = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        held.cancels = 1
        assert not pool.linger(held, lambda: None)  # no lingering on it either
        pool.release(held)
        await asyncio.sleep(0.01)
        assert not waiter.done() and pool.stats.idle == 0 and pool.stats.total == 1
        held.cancels = 0
        assert held.cancels_done is not None
        held.cancels_done()  # the postmaster closed the cancel connection: the backend was signalled
        assert await asyncio.wait_for(waiter, 1) is held and len(opened) == 1

    asyncio.run(run())


def test_connection_whose_cancel_was_not_confirmed_is_discarded() -> None:
    async def run() -> None:
        pool, opened = make_pool(size=1)
        held = await pool.acquire()
        held.cancels = 1
        pool.release(held)
        held.cancels, held.broken = 0, True  # what ServerConnection.cancel_ended(landed=False) does
        assert held.cancels_done is not None
        held.cancels_done()
        assert held.closed and pool.stats.total == 0
        assert await pool.acquire() is opened[1]

    asyncio.run(run())


def test_failed_connect_frees_the_slot() -> None:
    async def run() -> None:
        calls = 0

        async def connect() -> Conn:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ProxyError("08001", "refused")
            return Conn(calls)

        pool: Pool[Conn] = Pool("analytics", connect, size=1, acquire_timeout=1)
        with pytest.raises(ProxyError):
            await pool.acquire()
        assert pool.stats.total == 0
        assert (await pool.acquire()).n == 2

    asyncio.run(run())


def test_reap_closes_idle_and_old_connections() -> None:
    async def run() -> None:
        pool, _ = make_pool(size=3, idle_timeout=10, max_lifetime=100)
        conns = [await pool.acquire() for _ in range(3)]
        for conn in conns:
            pool.release(conn)
        now = time.monotonic()
        conns[0].idle_since = now - 11  # idle too long
        conns[1].created_at = now - 101  # too old
        assert pool.reap() == 2
        assert conns[0].closed and conns[1].closed and not conns[2].closed
        assert pool.stats.total == 1

    asyncio.run(run())


def test_release_of_expired_connection_closes_it() -> None:
    async def run() -> None:
        pool, _ = make_pool(size=1, max_lifetime=5)
        conn = await pool.acquire()
        conn.created_at -= 6
        pool.release(conn)
        assert conn.closed and pool.stats.total == 0

    asyncio.run(run())


def test_lingering_connection_is_kept_until_someone_needs_it() -> None:
    async def run() -> None:
        pool, opened = make_pool(size=1)
        a = await pool.acquire()
        reclaimed: list[Conn] = []
        assert pool.linger(a, lambda: reclaimed.append(a))
        assert pool.stats.idle == 1 and pool.stats.active == 0
        pool.unlinger(a)  # the same client starts its next transaction: no hand-over at all
        assert pool.stats.active == 1
        assert pool.linger(a, lambda: reclaimed.append(a))
        b = pool.try_acquire()  # another client: the lingering connection is taken back
        assert b is a and reclaimed == [a] and len(opened) == 1
        # Nobody lingers while others wait.
        waiter = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0)
        assert pool.stats.waiting == 1
        assert not pool.linger(b, lambda: None)
        pool.release(b)
        assert await waiter is a

    asyncio.run(run())


def test_close_and_reap_take_lingering_connections_back() -> None:
    async def run() -> None:
        pool, _ = make_pool(size=2, idle_timeout=0.01)
        a = await pool.acquire()
        b = await pool.acquire()
        gone: list[str] = []
        pool.linger(a, lambda: gone.append("a"))
        pool.linger(b, lambda: gone.append("b"))
        await asyncio.sleep(0.02)
        assert pool.reap() == 2 and gone == ["a", "b"] and a.closed and b.closed
        c = await pool.acquire()
        pool.linger(c, lambda: gone.append("c"))
        pool.close()
        assert gone[-1] == "c" and c.closed

    asyncio.run(run())


def _recorder(
    results: list[tuple[Conn | None, ProxyError | None]],
) -> Callable[[Conn | None, ProxyError | None], bool]:
    """A callback waiter that notes what it is given (and takes it)."""

    def handed(conn: Conn | None, err: ProxyError | None) -> bool:
        results.append((conn, err))
        return True

    return handed


def test_callback_waiters_share_the_fifo_with_acquire() -> None:
    """``wait`` queues a callback (no task) behind and before ``acquire`` callers, in arrival order."""

    async def run() -> None:
        pool, _ = make_pool(size=1)
        assert not pool.wait(_recorder([]))  # a slot is free: open one with acquire instead
        held = await pool.acquire()
        order: list[str] = []
        got: list[Conn | None] = []

        def give(name: str) -> object:
            def handed(conn: Conn | None, err: ProxyError | None) -> bool:
                assert err is None
                order.append(name)
                got.append(conn)
                if conn is not None:
                    pool.release(conn)
                return True

            return handed

        assert pool.wait(give("cb1"))  # type: ignore[arg-type]
        task = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        assert pool.wait(give("cb2"))  # type: ignore[arg-type]
        assert pool.stats.waiting == 3
        pool.release(held)
        conn = await task
        order.append("task")
        pool.release(conn)
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == ["cb1", "task", "cb2"]
        assert got == [held, held]
        assert pool.stats.waiting == 0 and pool.stats.idle == 1
        buckets = sum(pool.wait_counts)
        assert buckets == 4  # every lease is in the wait histogram (the first acquire too)

    asyncio.run(run())


def test_callback_waiter_times_out_with_53300_and_on_close() -> None:
    async def run() -> None:
        pool, _ = make_pool(size=1, timeout=0.05)
        held = await pool.acquire()
        results: list[tuple[Conn | None, ProxyError | None]] = []
        assert pool.wait(_recorder(results))
        await asyncio.sleep(0.2)
        assert len(results) == 1 and results[0][0] is None
        err = results[0][1]
        assert err is not None and err.sqlstate == "53300" and 'pool "main"' in err.message
        assert pool.timeouts == 1 and pool.stats.waiting == 0
        assert pool.wait(_recorder(results))
        pool.close()
        await asyncio.sleep(0)
        assert results[1][0] is None and results[1][1] is not None and "closed" in results[1][1].message
        pool.release(held)

    asyncio.run(run())


def test_callback_waiter_is_told_a_slot_is_free() -> None:
    """A discarded connection frees a slot: the waiter gets None and opens one itself."""

    async def run() -> None:
        pool, _ = make_pool(size=1)
        held = await pool.acquire()
        results: list[tuple[Conn | None, ProxyError | None]] = []
        assert pool.wait(_recorder(results))
        pool.release(held, reusable=False)
        await asyncio.sleep(0)
        assert results == [(None, None)]
        assert pool.stats.total == 0

    asyncio.run(run())


def test_open_idle_adds_one_idle_connection_only_while_there_is_room() -> None:
    async def run() -> None:
        pool, opened = make_pool(size=2)
        held = await pool.acquire()
        assert await pool.open_idle() is True
        assert (pool.stats.total, pool.stats.idle, len(opened)) == (2, 1, 2)
        assert await pool.open_idle() is False  # full: no connect attempted
        assert len(opened) == 2
        assert await pool.acquire() is opened[1]  # the idle one is leased next
        pool.release(held)

    asyncio.run(run())


def test_callback_waiters_share_one_timer_and_each_keeps_its_own_deadline() -> None:
    """One timer for all callback waiters (none armed and cancelled per hand-over): a waiter served in time
    is not timed out, and a later one times out no earlier than its own deadline, not the first one's."""

    async def run() -> None:
        timeout = 0.2
        pool, _ = make_pool(size=1, timeout=timeout)
        held = await pool.acquire()
        got: dict[str, tuple[float, Conn | None, ProxyError | None]] = {}
        second_done = asyncio.Event()

        def give(name: str) -> Callable[[Conn | None, ProxyError | None], bool]:
            def handed(conn: Conn | None, err: ProxyError | None) -> bool:
                got[name] = (time.monotonic(), conn, err)
                if name == "second":
                    second_done.set()
                return True

            return handed

        assert pool.wait(give("first"))
        timer = pool._waiter_timer
        assert timer is not None
        await asyncio.sleep(timeout / 2)
        second_started = time.monotonic()
        assert pool.wait(give("second"))
        assert pool._waiter_timer is timer  # the second waiter armed nothing
        pool.release(held)  # the first is served
        await asyncio.wait_for(second_done.wait(), 10)
        assert got["first"][1] is held and got["first"][2] is None
        at, conn, err = got["second"]
        assert conn is None and err is not None and err.sqlstate == "53300"
        assert at - second_started >= timeout - 0.002
        assert pool.timeouts == 1 and pool.stats.waiting == 0 and pool._waiter_timer is None

    asyncio.run(run())


def test_callback_waiter_whose_client_has_gone_passes_on_the_connection_or_the_slot() -> None:
    """A waiter whose client has gone by the time it is served (its callback answers False) hands what it
    was given to the next waiter: the connection, and a free slot alike (that slot was lost before)."""

    async def run() -> None:
        pool, _ = make_pool(size=1)
        held = await pool.acquire()
        served: list[tuple[Conn | None, ProxyError | None]] = []
        gone: list[tuple[Conn | None, ProxyError | None]] = []

        def left(conn: Conn | None, err: ProxyError | None) -> bool:
            gone.append((conn, err))
            return False

        assert pool.wait(left)
        assert pool.wait(_recorder(served))
        pool.release(held)
        assert gone == [] and served == []  # served on the event loop's next turn, not in release
        for _ in range(3):
            await asyncio.sleep(0)
        assert gone == [(held, None)] and served == [(held, None)]
        assert pool.stats.waiting == 0 and pool.stats.idle == 0
        assert pool.wait(left)
        assert pool.wait(_recorder(served))
        pool.release(held, reusable=False)  # closed: its slot is free
        for _ in range(3):
            await asyncio.sleep(0)
        assert gone[-1] == (None, None) and served[-1] == (None, None)
        assert pool.stats.total == 0 and pool.stats.waiting == 0

    asyncio.run(run())
