"""Issue 13, findings 1 and 5: no statement can crash the proxy or stall other clients, and memory comes back.

Statements too deep for pglast (a 30,000-term ``1+1+...``, 20,000 ``UNION ALL``) get PostgreSQL's own answer;
statements above INLINE_BYTES are classified in a child process while everyone else is served; a killed
child is started again; large statements leave no memory behind; a 64 MB message is buffered linearly.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest

from proxy.dev.cluster import DevClusters
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess, wait_until

PLUS_30000 = "SELECT 1" + "+1" * 29_999
UNION_20000 = " UNION ALL ".join(f"SELECT {n}" for n in range(20_000))
# pglast needs seconds for this (0.6 MB, 100,000 list items); PostgreSQL rejects it at once (42883).
SLOW_TO_CLASSIFY = "SELECT h1_no_such_function() WHERE 1 IN (" + ",".join(map(str, range(100_000))) + ")"


def _outcome(dsn: str, sql: str) -> tuple[str, object]:
    """('error', SQLSTATE) or ('rows', the first row) of ``sql`` on a fresh connection."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        try:
            rows = conn.execute(sql).fetchall()
        except psycopg.Error as exc:
            return "error", exc.sqlstate
        return "rows", (len(rows), rows[0] if rows else None)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """(tx_queue, rx_queue) of the loopback TCP socket local_port -> remote_port, from /proc/net/tcp."""
    want = (f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}")
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if (parts[1], parts[2]) == want:
                tx, rx = parts[4].split(":")
                return int(tx, 16), int(rx, 16)
    return None


class Bystander:
    """A client that runs ``SELECT 1`` in a loop on its own thread and counts its answers."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.done = 0
        self.longest_wait = 0.0  # the longest time one SELECT 1 took (reported, not asserted)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                while not self._stop.is_set():
                    started = time.monotonic()
                    assert conn.execute("SELECT 1").fetchone() == (1,)
                    self.longest_wait = max(self.longest_wait, time.monotonic() - started)
                    self.done += 1
        except BaseException as exc:
            self.errors.append(exc)

    @contextmanager
    def running(self) -> Iterator[Bystander]:
        self._thread.start()
        wait_until(lambda: self.done > 0 or bool(self.errors), 30, "the bystander's first answer")
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(30)
        assert not self.errors, self.errors


@pytest.fixture
def main_only(start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    return start_proxy(roles=("main",))


def test_too_deep_statements_get_postgresqls_answer_and_the_proxy_serves_on(
    pg: DevClusters, main_only: ProxyProcess
) -> None:
    dsn = main_only.dsn(APP_USER, APP_PASSWORD)
    direct = pg["main"].dsn
    with Bystander(dsn).running() as bystander:
        for sql in (PLUS_30000, UNION_20000):
            expected = _outcome(direct, sql)
            assert _outcome(dsn, sql) == expected, f"{sql[:40]}...: PostgreSQL answers {expected}"
            assert main_only.proc.poll() is None, main_only.log()
        before = bystander.done
        wait_until(lambda: bystander.done > before, 30, "the bystander's next answer")
    # The classifier child died on the 30,000-term statement (logged) and a new one serves the next.
    assert "event=classifier_exited" in main_only.log()
    in_list = "SELECT 1 WHERE 2 IN (" + ",".join(map(str, range(3000))) + ")"
    assert _outcome(dsn, in_list) == ("rows", (1, (1,)))
    assert main_only.proc.poll() is None
    assert "event=internal_error" not in main_only.log()


def test_a_bystander_is_served_while_a_huge_statement_is_classified(main_only: ProxyProcess) -> None:
    """The ordering fact: after the proxy has read the whole huge statement from its socket and before it
    has routed it, the bystander's queries are answered (today the event loop classifies it, and answers
    nothing else until it has routed it)."""
    dsn = main_only.dsn(APP_USER, APP_PASSWORD)
    routed = "parafort_proxy_routed_statements_total"
    with Bystander(dsn).running() as bystander, psycopg.connect(dsn, autocommit=True) as conn:
        writes_before = main_only.metric(routed, role="main", kind="write")
        pgconn = conn.pgconn
        sock = socket.socket(fileno=os.dup(pgconn.socket))
        local, proxy_port = sock.getsockname()[1], sock.getpeername()[1]
        sock.close()
        sent = time.monotonic()
        pgconn.send_query(SLOW_TO_CLASSIFY.encode())  # blocking mode: returns once all of it is sent

        def read_by_proxy() -> bool:
            mine, theirs = _queues(local, proxy_port), _queues(proxy_port, local)
            return mine is not None and theirs is not None and mine[0] == 0 and theirs[1] == 0

        wait_until(read_by_proxy, 60, "the proxy to read the whole statement")
        seen = bystander.done
        wait_until(lambda: bystander.done >= seen + 5, 60, "the bystander's answers")
        # Not yet routed: the bystander's five answers came while the statement was being classified.
        assert main_only.metric(routed, role="main", kind="write") == writes_before
        while pgconn.is_busy():  # wait in select (libpq's blocking read would hold the GIL: the bystander
            select.select([pgconn.socket], [], [], 1.0)  # thread is in this process)
            pgconn.consume_input()
        results = []
        while (result := pgconn.get_result()) is not None:
            results.append(result)
        assert results[0].error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42883"
        print(
            f"bystander: {bystander.done - seen} answers between the proxy reading the statement and its "
            f"reply "
            f"({time.monotonic() - sent:.1f} s); the longest took {bystander.longest_wait:.3f} s"
        )
    assert main_only.metric(routed, role="main", kind="write") == writes_before + 1
    assert main_only.metric("parafort_proxy_classifier_worker_events_total", event="classified") >= 1


def test_a_killed_classifier_child_is_started_again(main_only: ProxyProcess) -> None:
    dsn = main_only.dsn(APP_USER, APP_PASSWORD)
    big = "SELECT count(*) FROM (VALUES " + ",".join(f"({n})" for n in range(2000)) + ") v"
    assert len(big) > 8192
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(big).fetchone() == (2000,)
        (child,) = _children(main_only.proc.pid)
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: child not in _children(main_only.proc.pid), 30, "the child to be reaped")
        # A different statement (a remembered one would not need the child).
        again = big.replace("count(*)", "count(*) + 1")
        assert conn.execute(again).fetchone() == (2001,)
        (second,) = _children(main_only.proc.pid)
        assert second != child
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert len(re.findall(f"event=classifier_exited pid={child} ", main_only.log())) == 1
    # Stopping the proxy stops its child (no orphan).
    assert main_only.stop() == 0
    wait_until(lambda: not os.path.exists(f"/proc/{second}"), 30, "the child to exit")


def test_memory_comes_back_after_large_statements(main_only: ProxyProcess) -> None:
    """40 distinct 8 MB statements used to add ~384 MB that stayed (cached by their bytes)."""
    dsn = main_only.dsn(APP_USER, APP_PASSWORD)
    pid = main_only.proc.pid
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    baseline = _rss_kb(pid)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in range(40):
            body = f"{n:08d}" * (1024 * 1024)  # 8 MB, a different text each time
            assert conn.execute(f"SELECT length('{body}')").fetchone() == (len(body),)
    with psycopg.connect(dsn, autocommit=True) as conn:  # a client later: the proxy has settled
        assert conn.execute("SELECT 1").fetchone() == (1,)
    after = _rss_kb(pid)
    print(f"proxy RSS {baseline} kB before 40 distinct 8 MB statements, {after} kB after")
    assert after < baseline + 100 * 1024, f"RSS {baseline} kB before, {after} kB after"


def test_a_64_mb_message_is_buffered_linearly(main_only: ProxyProcess) -> None:
    """Correctness, and it completes within the test's timeout (concatenating each read onto the buffer
    cost ~10 s of CPU for this message; the figure is in the issue's closing note, not asserted here)."""
    dsn = main_only.dsn(APP_USER, APP_PASSWORD)
    body = "x" * (64 * 1024 * 1024 - 64)
    with psycopg.connect(dsn, autocommit=True) as conn:
        cpu = _cpu_seconds(main_only.proc.pid)
        assert conn.execute(f"SELECT length('{body}')").fetchone() == (len(body),)
        print(f"proxy CPU for one 64 MB message: {_cpu_seconds(main_only.proc.pid) - cpu:.2f} s")
        # And one 64 MB row back from the server (the upstream side buffers the same way).
        cpu = _cpu_seconds(main_only.proc.pid)
        (row,) = conn.execute("SELECT repeat('y', 64 * 1024 * 1024 - 64)").fetchone()
        assert len(row) == len(body) and row == "y" * len(body)
        print(f"proxy CPU for one 64 MB row: {_cpu_seconds(main_only.proc.pid) - cpu:.2f} s")
        assert conn.execute("SELECT 1").fetchone() == (1,)
