"""Failed logins (issue 13, finding 7): logged with user, address and reason, never a secret; a flood is
counted in full but logged in a bounded number of lines, costs no PBKDF2 per attempt, and a bystander keeps
getting answers."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from proxy.dev.cluster import wait_until
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess
from proxy.protocol import sasl_initial_response, startup_message

StartProxy = Callable[..., ProxyProcess]

WRONG = "wr0ng-Pa55-xyzzy"  # must never appear in the log
FAILED = "parafort_proxy_login_failures_total"
DERIVATIONS = "parafort_proxy_scram_key_derivations_total"


def _wrong_password(proxy: ProxyProcess, user: str = APP_USER) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(user, WRONG), connect_timeout=30).close()


def _unknown_user(proxy: ProxyProcess, user: str) -> None:
    async def attempt() -> None:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(proxy.dsn(user, WRONG), timeout=30)

    asyncio.run(attempt())


def _raw_login(proxy: ProxyProcess, user: str) -> socket.socket:
    """A raw client that has sent its StartupMessage and read the AuthenticationSASL request."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    sock.sendall(startup_message({"user": user, "database": "app"}))
    head = _recv_exactly(sock, 5)
    assert head[:1] == b"R", head
    _recv_exactly(sock, struct.unpack("!I", head[1:])[0] - 4)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def _failure_lines(log: str, reason: str, user: str) -> list[str]:
    return [
        line
        for line in log.splitlines()
        if "event=login_failed" in line and f" reason={reason}" in line and f" user={user} " in line
    ]


def _one_line(proxy: ProxyProcess, reason: str, user: str) -> str:
    wait_until(lambda: _failure_lines(proxy.log(), reason, user), 30, f"a login_failed line for {reason}")
    lines = _failure_lines(proxy.log(), reason, user)
    assert len(lines) == 1, lines
    assert re.search(r" address=127\.0\.0\.1:\d+ ", lines[0]), lines[0]
    return lines[0]


def test_failed_logins_logged_with_user_address_reason(start_proxy: StartProxy) -> None:
    proxy = start_proxy(config={"limits": {"login_timeout": "2s"}})
    _wrong_password(proxy)
    _one_line(proxy, "wrong_password", APP_USER)
    _unknown_user(proxy, "no_such_user")
    _one_line(proxy, "unknown_user", "no_such_user")
    # The client goes away when asked for a password (libpq does this before prompting for one).
    _raw_login(proxy, "quitter").close()
    _one_line(proxy, "client_disconnected", "quitter")
    # A SASL mechanism the proxy does not offer, and a SCRAM message that is not one.
    with _raw_login(proxy, "plus_user") as sock:
        sock.sendall(sasl_initial_response("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc"))
        assert sock.recv(1) == b"E"
    _one_line(proxy, "unsupported_mechanism", "plus_user")
    with _raw_login(proxy, "garbler") as sock:
        sock.sendall(sasl_initial_response("SCRAM-SHA-256", b"n,,not-scram"))
        assert sock.recv(1) == b"E"
    _one_line(proxy, "malformed_auth_message", "garbler")
    # Asked for a password, sends nothing: limits.login_timeout.
    with _raw_login(proxy, "sleeper") as sock:
        assert sock.recv(1) == b"E"
    _one_line(proxy, "login_timeout", "sleeper")
    for reason in (
        "wrong_password",
        "unknown_user",
        "client_disconnected",
        "unsupported_mechanism",
        "malformed_auth_message",
        "login_timeout",
    ):
        assert proxy.metric(FAILED, reason=reason) == 1, reason
    log = proxy.log()
    assert WRONG not in log and APP_PASSWORD not in log
    assert "r=abc" not in log and "not-scram" not in log  # nor SCRAM message content
    # The right password still works, and a login is not a failure.
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), connect_timeout=30) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert proxy.metric(FAILED, reason="wrong_password") == 1


class Bystander(threading.Thread):
    """A logged-in client running ``SELECT 1`` in a loop; ``answered_since(t)`` once it answers after t."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.answers: list[float] = []  # monotonic time of each answer
        self.errors: list[BaseException] = []
        self.latencies: list[float] = []

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=30) as conn:
                self.ready.set()
                while not self.stop.is_set():
                    t0 = time.monotonic()
                    assert conn.execute("SELECT 1").fetchone() == (1,)
                    self.answers.append(time.monotonic())
                    self.latencies.append(self.answers[-1] - t0)
        except BaseException as exc:
            self.errors.append(exc)
            self.ready.set()

    def answered_since(self, t: float) -> bool:
        return bool(self.answers) and self.answers[-1] > t


def test_login_flood_counted_logged_once_no_pbkdf2_per_attempt(start_proxy: StartProxy) -> None:
    # A window longer than the test: everything after the first failure of a key is suppressed, so the
    # number of lines is fixed by the mechanism, whatever the machine's speed.
    proxy = start_proxy(config={"log": {"login_failure_interval": "1h"}})
    bystander = Bystander(proxy.dsn(APP_USER, APP_PASSWORD))
    bystander.start()
    assert bystander.ready.wait(30) and not bystander.errors, bystander.errors
    flood_start = time.monotonic()
    attempts = 0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def flood(share: int) -> None:
        nonlocal attempts
        try:
            done = 0
            # At least ``share`` attempts, and on until the bystander has had an answer during the flood.
            deadline = time.monotonic() + 90
            while done < share or not bystander.answered_since(flood_start):
                assert time.monotonic() < deadline, "the bystander got no answer during the login flood"
                _wrong_password(proxy)
                done += 1
                with lock:
                    attempts += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=flood, args=(75,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors
    assert attempts >= 300
    assert bystander.answered_since(flood_start)
    # Unknown users, from another client library: counted, and no key derivation for them.
    for i in range(30):
        _unknown_user(proxy, f"ghost{i % 3}")
    bystander.stop.set()
    bystander.join(30)
    assert not bystander.errors, bystander.errors

    assert proxy.metric(FAILED, reason="wrong_password") == attempts
    assert proxy.metric(FAILED, reason="unknown_user") == 30
    # PBKDF2 for app's plain-text password once (the bystander's login and every failed one share it).
    assert proxy.metric(DERIVATIONS) == 1
    assert proxy.stop() == 0  # SIGTERM: the open window is closed and summarized before the process exits
    log = proxy.log_path.read_text()
    assert WRONG not in log and APP_PASSWORD not in log
    assert len(_failure_lines(log, "wrong_password", APP_USER)) == 1
    for i in range(3):
        assert len(_failure_lines(log, "unknown_user", f"ghost{i}")) == 1
    summaries = [line for line in log.splitlines() if "event=login_failures_suppressed" in line]
    assert len(summaries) == 2, summaries
    assert "reason=unknown_user suppressed=27 " in summaries[0], summaries
    assert f"reason=wrong_password suppressed={attempts - 1} " in summaries[1], summaries
    # Nothing else is written per failed login: no line names one of the flood's connections.
    per_connection = [line for line in log.splitlines() if "event=client_" in line]
    assert len(per_connection) <= 2, per_connection  # the bystander's client_login and client_close


def test_users_file_reload_derives_scram_keys_again(start_proxy: StartProxy) -> None:
    """The derived keys live as long as the users-file load: a SIGHUP with a new password drops them."""
    proxy = start_proxy()
    for _ in range(5):
        _wrong_password(proxy)
    assert proxy.metric(DERIVATIONS) == 1
    (proxy.dir / "userlist.txt").write_text(f'"{APP_USER}" "changed-{APP_PASSWORD}"\n')
    proxy.signal(signal.SIGHUP)
    wait_until(lambda: proxy.metric("parafort_proxy_config_reloads_total") == 1, 30, "the reload")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), connect_timeout=30).close()
    assert proxy.metric(DERIVATIONS) == 2
    for _ in range(3):
        with psycopg.connect(proxy.dsn(APP_USER, f"changed-{APP_PASSWORD}"), connect_timeout=30) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert proxy.metric(DERIVATIONS) == 2
    assert proxy.metric(FAILED, reason="wrong_password") == 6
