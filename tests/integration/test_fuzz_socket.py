"""Fuzzing a live proxy socket while a well-behaved client keeps working.

Many raw TCP connections send random and mutated byte streams (before login, and after a real SCRAM login)
built by the generators of ``tests/unit/test_fuzz_codec.py``; meanwhile a psycopg client runs ``SELECT 1``
in a loop. The proxy must stay up, log no traceback or internal error, answer only well-formed backend
messages (closing the connection after every FATAL), and the good client must see no error and keep
making progress. Then hand-written hostile inputs, each of which must get an ErrorResponse with the right
SQLSTATE and a close of that connection only.
"""

from __future__ import annotations

import importlib.util
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
import scramp
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess
from proxy.errors import FEATURE_NOT_SUPPORTED, PROTOCOL_VIOLATION
from proxy.protocol import messages as m
from proxy.protocol.framing import PROTOCOL_V3, ssl_request, startup_message

CONNECT_TIMEOUT = 5.0
QUIET = 0.25  # a connection that sends nothing for this long is done answering
EXCHANGE_LIMIT = 5.0  # the most one fuzz connection is read for
MAX_GAP = 5.0  # the longest the good client may go without a result


def _load_generators() -> ModuleType:
    """tests/unit/test_fuzz_codec.py (``tests/`` is not a package: imported by path)."""
    name = "parafort_fuzz_codec"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "unit" / "test_fuzz_codec.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fz = _load_generators()
execute_message = fz.execute_message


# --- the well-behaved client --------------------------------------------------------------------------


class GoodClient(threading.Thread):
    """psycopg, autocommit, ``SELECT 1`` in a loop until stopped; counts results, errors, the longest gap."""

    def __init__(self, dsn: str) -> None:
        super().__init__(name="good-client", daemon=True)
        self.dsn = dsn
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.results = 0
        self.errors: list[str] = []
        self.max_gap = 0.0

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                self.ready.set()
                last = time.monotonic()
                while not self.stopping.is_set():
                    row = conn.execute("SELECT 1").fetchone()
                    if row != (1,):
                        self.errors.append(f"SELECT 1 returned {row!r}")
                    now = time.monotonic()
                    self.max_gap = max(self.max_gap, now - last)
                    last = now
                    self.results += 1
                    time.sleep(0.003)
        except Exception as exc:
            self.errors.append(repr(exc))
        finally:
            self.ready.set()


@contextmanager
def good_client(proxy: ProxyProcess) -> Iterator[GoodClient]:
    client = GoodClient(proxy.dsn(APP_USER, APP_PASSWORD))
    client.start()
    assert client.ready.wait(20), "the good client did not connect"
    try:
        yield client
    finally:
        client.stopping.set()
        client.join(15)
    assert not client.is_alive(), "the good client is stuck in a statement"


def assert_still_serving(proxy: ProxyProcess, client: GoodClient, results_before: int) -> None:
    """The proxy is up, its log clean, and the good client saw no error and keeps getting results."""
    assert proxy.proc.poll() is None, f"the proxy exited with {proxy.proc.returncode}:\n{proxy.log()[-5000:]}"
    deadline = time.monotonic() + MAX_GAP
    while client.results < results_before + 10 and not client.errors and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.errors, client.errors
    assert client.results >= results_before + 10, f"the good client is stuck ({client.results} results)"
    assert client.max_gap < MAX_GAP, f"the good client waited {client.max_gap:.1f}s for a result"
    assert_clean_log(proxy)


def assert_clean_log(proxy: ProxyProcess) -> None:
    log = proxy.log()
    bad = [line for line in log.splitlines() if "Traceback" in line or "internal_error" in line]
    if bad:
        start = max(log.find("Traceback") - 2000, 0)
        raise AssertionError(f"the proxy logged {len(bad)} error line(s):\n{log[start : start + 6000]}")


# --- raw connections ----------------------------------------------------------------------------------


def connect(proxy: ProxyProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=CONNECT_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_close(
    sock: socket.socket, limit: float = EXCHANGE_LIMIT, quiet: float = QUIET
) -> tuple[bytes, bool]:
    """Everything the proxy sends until it closes (True) or goes quiet / the limit passes (False)."""
    out = bytearray()
    deadline = time.monotonic() + limit
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), False
        sock.settimeout(min(quiet, left))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return bytes(out), False
        except ConnectionResetError:
            return bytes(out), True
        if not data:
            return bytes(out), True
        out += data


def send_all(sock: socket.socket, chunks: list[bytes]) -> None:
    """Send ``chunks`` one by one; stop quietly when the proxy has already closed the connection."""
    sock.settimeout(CONNECT_TIMEOUT)
    for chunk in chunks:
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return


def backend_messages(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The backend messages in ``data`` (after any one-byte b"N" answers to SSL/GSS requests), and any
    incomplete tail; raises AssertionError on a malformed message."""
    while data[:1] == b"N" and (len(data) < 5 or not 4 <= struct.unpack_from("!i", data, 1)[0] < len(data)):
        data = data[1:]
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos + 5 <= len(data):
        (length,) = struct.unpack_from("!i", data, pos + 1)
        assert 4 <= length < 1 << 30, f"bad length {length} at {pos} in {fz.show(data)}"
        end = pos + 1 + length
        if end > len(data):
            break
        type_byte, payload = data[pos], data[pos + 5 : end]
        if type_byte in (m.B.ERROR, m.B.NOTICE):
            fields = m.parse_fields(payload)
            assert {"S", "C", "M"} <= fields.keys(), fields
        out.append((type_byte, payload))
        pos = end
    return out, data[pos:]


def errors_in(msgs: list[tuple[int, bytes]]) -> list[dict[str, str]]:
    return [m.parse_fields(p) for t, p in msgs if t == m.B.ERROR]


def check_reply(reply: bytes, closed: bool, sent: bytes | list[bytes]) -> None:
    msgs, _ = backend_messages(reply)
    errors = errors_in(msgs)
    fatal = [i for i, (t, p) in enumerate(msgs) if t == m.B.ERROR and m.parse_fields(p).get("S") == "FATAL"]
    if fatal:
        assert fatal[0] == len(msgs) - 1, (
            f"messages after a FATAL error: {msgs[fatal[0] :]}, sent {fz.show(sent)}"
        )
        assert closed, f"FATAL {errors[-1]} but the connection stayed open; sent {fz.show(sent)}"
    for error in errors:  # XX000 from PostgreSQL itself (e.g. "cache lookup failed") is not the proxy's
        internal = error["C"] == "XX000" and error["M"].startswith("internal proxy error")
        assert not internal, f"internal error {error}; sent {fz.show(sent)}"


class Session:
    """A raw connection logged in through the proxy with SCRAM-SHA-256 (scramp), as APP_USER."""

    def __init__(self, proxy: ProxyProcess, **params: str) -> None:
        self.sock = connect(proxy)
        self.buf = b""
        self.params = params
        try:
            self._login()
        except BaseException:
            self.sock.close()
            raise

    def _message(self) -> tuple[int, bytes]:
        self.sock.settimeout(CONNECT_TIMEOUT)
        while True:
            if len(self.buf) >= 5:
                (length,) = struct.unpack_from("!i", self.buf, 1)
                if len(self.buf) >= 1 + length:
                    type_byte, payload = self.buf[0], self.buf[5 : 1 + length]
                    self.buf = self.buf[1 + length :]
                    return type_byte, payload
            data = self.sock.recv(65536)
            assert data, "the proxy closed the connection during login"
            self.buf += data

    def _auth(self, expected: int) -> bytes:
        type_byte, payload = self._message()
        assert type_byte == m.B.AUTH, (chr(type_byte), payload)
        code, data = m.decode_auth(payload)
        assert code == expected, (code, data)
        return data

    def _login(self) -> None:
        self.sock.sendall(startup_message({"user": APP_USER, "database": "app", **self.params}))
        assert fz.SCRAM_SHA_256 in m.decode_sasl_mechanisms(self._auth(m.AuthCode.SASL))
        client = scramp.ScramClient([fz.SCRAM_SHA_256], APP_USER, APP_PASSWORD)
        self.sock.sendall(m.sasl_initial_response(fz.SCRAM_SHA_256, str(client.get_client_first()).encode()))
        client.set_server_first(self._auth(m.AuthCode.SASL_CONTINUE).decode())
        self.sock.sendall(m.sasl_response(str(client.get_client_final()).encode()))
        client.set_server_final(self._auth(m.AuthCode.SASL_FINAL).decode())
        self._auth(m.AuthCode.OK)
        while True:
            type_byte, payload = self._message()
            if type_byte == m.B.READY_FOR_QUERY:
                assert payload == b"I"
                return
            assert type_byte in (m.B.PARAMETER_STATUS, m.B.BACKEND_KEY_DATA), (chr(type_byte), payload)

    def exchange(self, chunks: list[bytes], limit: float = EXCHANGE_LIMIT) -> tuple[bytes, bool]:
        send_all(self.sock, chunks)
        reply, closed = read_until_close(self.sock, limit)
        return self.buf + reply, closed

    def close(self) -> None:
        self.sock.close()


@contextmanager
def session(proxy: ProxyProcess, **params: str) -> Iterator[Session]:
    s = Session(proxy, **params)
    try:
        yield s
    finally:
        s.close()


def raw_exchange(proxy: ProxyProcess, chunks: list[bytes], *, half_close: bool) -> tuple[bytes, bool]:
    with connect(proxy) as sock:
        send_all(sock, chunks)
        if half_close:  # EOF after the input: the proxy answers what it has, then closes
            with suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        return read_until_close(sock)


# --- random and mutated streams -----------------------------------------------------------------------

RANDOMS = st.randoms(use_true_random=False)
# No shrinking: the proxy and its pool carry state from one example to the next, so a "smaller" failing
# example is not the cause; the report names the example that failed.
LIVE = settings(max_examples=100, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])


def test_fuzz_socket_before_login(proxy: ProxyProcess) -> None:
    with good_client(proxy) as good:
        before = good.results

        @LIVE
        @given(RANDOMS)
        def attack(rng: random.Random) -> None:
            r = rng.random()
            data = fz.random_stream(rng) if r < 0.15 else fz.mutated(rng, fz.startup_messages(rng))
            chunks = fz.chunked(rng, data)
            reply, closed = raw_exchange(proxy, chunks, half_close=rng.random() < 0.7)
            check_reply(reply, closed, chunks)
            msgs, _ = backend_messages(reply)
            assert not [p for t, p in msgs if t == m.B.AUTH and p[:4] == b"\0\0\0\0"], "authenticated!"
            assert proxy.proc.poll() is None, f"the proxy died on {fz.show(chunks)}"

        attack()
        time.sleep(0.5)  # the good client keeps going after the storm
        assert_still_serving(proxy, good, before)


def test_fuzz_socket_after_login(proxy: ProxyProcess) -> None:
    with good_client(proxy) as good:
        before = good.results

        @LIVE
        @given(RANDOMS)
        def attack(rng: random.Random) -> None:
            data = fz.mutated(rng, fz.frontend_messages(rng, big=0.05))
            chunks = fz.chunked(rng, data)
            with session(proxy) as s:
                reply, closed = s.exchange(chunks)
            check_reply(reply, closed, chunks)
            assert proxy.proc.poll() is None, f"the proxy died on {fz.show(chunks)}"
            # The pool hands the warmest connection out first: a fresh client now most likely gets the
            # upstream connection this one just used, and must find it in order.
            problem = _statements_work(proxy)
            assert problem is None, f"the next client failed: {problem}; after {fz.show(chunks, 2000)}"

        attack()
        time.sleep(0.5)
        assert_still_serving(proxy, good, before)


# --- hand-written hostile inputs ----------------------------------------------------------------------


def _v2_startup() -> bytes:
    """A protocol 2.0 StartupPacket: fixed 296 bytes (database 64, user 32, options 64, unused 64, tty 64)."""
    body = b"app".ljust(64, b"\0") + APP_USER.encode().ljust(32, b"\0") + bytes(64 + 64 + 64)
    return struct.pack("!ii", 8 + len(body), 2 << 16) + body


_TLS_CLIENT_HELLO = (
    bytes.fromhex("16030100a5010000a10303") + bytes(range(32)) + b"\x00\x00\x02\x13\x01\x01\x00"
)

HOSTILE_BEFORE_LOGIN = {
    # name: (chunks, SQLSTATE expected in the FATAL ErrorResponse)
    "startup-length-0x7fffffff": ([struct.pack("!ii", 0x7FFFFFFF, PROTOCOL_V3)], PROTOCOL_VIOLATION),
    "startup-length-negative": ([struct.pack("!ii", -8, PROTOCOL_V3)], PROTOCOL_VIOLATION),
    "startup-over-10000-bytes": (
        [startup_message({"user": APP_USER, "database": "app", "options": "x" * 10_100})],
        PROTOCOL_VIOLATION,
    ),
    "protocol-2.0": ([_v2_startup()], FEATURE_NOT_SUPPORTED),
    "protocol-3.1234-garbage-body": (
        [struct.pack("!ii", 12, (3 << 16) | 1234) + b"zzzz"],
        PROTOCOL_VIOLATION,
    ),
    "password-length-0x7fffffff": (
        [startup_message({"user": APP_USER, "database": "app"}), b"p" + struct.pack("!i", 0x7FFFFFFF)],
        PROTOCOL_VIOLATION,
    ),
    "garbage-sasl-initial-response": (
        [startup_message({"user": APP_USER, "database": "app"}), m.sasl_initial_response("x", b"\xff\0")],
        PROTOCOL_VIOLATION,
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_BEFORE_LOGIN))
def test_hostile_before_login(proxy: ProxyProcess, case: str) -> None:
    chunks, sqlstate = HOSTILE_BEFORE_LOGIN[case]
    with good_client(proxy) as good:
        before = good.results
        reply, closed = raw_exchange(proxy, chunks, half_close=False)
        msgs, _ = backend_messages(reply)
        errors = errors_in(msgs)
        assert errors and errors[-1]["C"] == sqlstate and errors[-1]["S"] == "FATAL", (msgs, reply)
        assert closed, "the proxy left the connection open after a FATAL error"
        assert_still_serving(proxy, good, before)  # only that client was closed


def test_ssl_request_then_garbage(proxy: ProxyProcess) -> None:
    with good_client(proxy) as good, connect(proxy) as sock:
        before = good.results
        sock.sendall(ssl_request())
        sock.settimeout(CONNECT_TIMEOUT)
        assert sock.recv(1) == b"N"  # no TLS towards clients configured
        send_all(sock, [_TLS_CLIENT_HELLO])  # a client that starts TLS anyway
        reply, closed = read_until_close(sock)
        errors = errors_in(backend_messages(reply)[0])
        assert errors and errors[-1]["C"] == PROTOCOL_VIOLATION and errors[-1]["S"] == "FATAL", reply
        assert closed
        assert_still_serving(proxy, good, before)


HOSTILE_AFTER_LOGIN = {
    "bad-type-byte": [b"?\0\0\0\4", b"garbage \xff\xfe\0\1\2"],
    "bad-type-byte-inside-a-batch": [m.parse("", "SELECT 1") + b"?\0\0\0\4" + m.sync()],
    "nul-type-byte": [b"\0\0\0\0\4\0\0\0\0"],
    "length-0x7fffffff": [b"Q" + struct.pack("!i", 0x7FFFFFFF)],
    "length-3": [b"Q\0\0\0\3SELECT 1\0"],
    "malformed-describe-then-sync": [b"D\0\0\0\5S" + m.sync()],
    # A batch cut at 256 KiB (MAX_BATCH_BYTES) whose last message is malformed.
    "cut-batch-ending-in-empty-bind": [m.parse("", "x" * (262_142 - 9)) + b"B\0\0\0\4"],
    "cut-batch-ending-in-parse-without-nul": [m.parse("", "x" * (262_142 - 9)) + b"P\0\0\0\7abc"],
    "big-parse-without-nul": [b"P" + struct.pack("!i", 300_004) + b"x" * 300_000],
}


@pytest.mark.parametrize("case", list(HOSTILE_AFTER_LOGIN))
def test_hostile_after_login(proxy: ProxyProcess, case: str) -> None:
    with good_client(proxy) as good:
        before = good.results
        with session(proxy) as s:
            reply, closed = s.exchange(HOSTILE_AFTER_LOGIN[case])
        msgs, _ = backend_messages(reply)
        errors = errors_in(msgs)
        assert errors and errors[-1]["C"] == PROTOCOL_VIOLATION and errors[-1]["S"] == "FATAL", msgs
        assert closed, "the proxy left the connection open after a FATAL error"
        assert_still_serving(proxy, good, before)  # only that client was closed


# --- regressions found by the fuzz tests above --------------------------------------------------------


def _replies(s: Session, chunk: bytes) -> list[tuple[int, bytes]]:
    reply, closed = s.exchange([chunk])
    assert not closed, f"the proxy closed the connection: {reply!r}"
    return backend_messages(reply)[0]


def test_named_parse_in_latin1(proxy: ProxyProcess) -> None:
    """A LATIN1 client's named statement with a non-ASCII literal (its text is not valid UTF-8): PostgreSQL
    runs it; the proxy must not treat it as a protocol violation (it raised UnicodeEncodeError building the
    statement's upstream name, now reported as FATAL 08P01 "malformed message")."""
    with session(proxy, client_encoding="LATIN1") as s:
        unit = m.parse("s1", "SELECT 'caf\udce9'") + m.bind_raw("", "s1", b"\0\0\0\0\0\0")
        msgs = _replies(s, unit + execute_message("") + m.sync())
        assert not errors_in(msgs), errors_in(msgs)
        assert (m.B.DATA_ROW, b"\0\1\0\0\0\4caf\xe9") in msgs, msgs
        assert msgs[-1] == (m.B.READY_FOR_QUERY, b"I"), msgs
    assert_clean_log(proxy)


def _statements_work(proxy: ProxyProcess, seconds: float = 10.0) -> str | None:
    """None if a fresh psycopg client can run prepared and unprepared statements; else what went wrong."""
    result: list[str | None] = []

    def run() -> None:
        try:
            dsn = proxy.dsn(APP_USER, APP_PASSWORD)
            with psycopg.connect(dsn, autocommit=True, prepare_threshold=0, connect_timeout=5) as conn:
                conn.execute("SELECT 1", prepare=True).fetchone()
                conn.execute("SELECT %s::int", (2,)).fetchone()
            result.append(None)
        except Exception as exc:
            result.append(repr(exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return f"hang: no result after {seconds:g}s" if thread.is_alive() else result[0]


def test_error_in_a_flushed_batch_does_not_break_the_next_client(proxy: ProxyProcess) -> None:
    """Sync, Sync, Describe of a missing statement and Flush in one write, then a disconnect (found by the
    live fuzz test): the next client on that upstream connection got "connection to the main upstream was
    lost" and the proxy logged "ReadyForQuery out of turn from upstream"."""
    with session(proxy) as s:
        s.exchange([m.sync() + m.sync() + m.describe(b"S", "nope") + m.flush()])
    time.sleep(0.05)
    assert _statements_work(proxy) is None
    assert "out of turn" not in proxy.log()


def test_next_client_after_a_session_ending_in_a_failed_flush(proxy: ProxyProcess) -> None:
    """Input found by the live fuzz test (before connection.py's 13:48 change the next client hung): a named
    SET statement described, run with binary result formats, then Describe of a missing portal + Flush,
    then a disconnect. The next client must be served."""
    unit = (
        m.parse("P_0", "SET application_name = 'fuzz'")
        + m.describe(b"S", "P_0")
        + m.sync()
        + m.sync()
        + m.bind_raw("q1", "P_0", b"\0\0\0\0\0\x02\0\x01\0\x01")
        + execute_message("q1")
        + m.sync()
        + m.describe(b"P", "")
        + m.flush()
    )
    with session(proxy) as s:
        s.exchange([unit])
    time.sleep(0.05)
    assert _statements_work(proxy) is None
    assert_clean_log(proxy)


def test_pipeline_after_an_error_in_a_flushed_batch(proxy: ProxyProcess) -> None:
    """After an error answering a Flush-terminated batch PostgreSQL skips everything up to the next Sync:
    the client's next pipeline gets just ReadyForQuery, and the session goes on."""
    with session(proxy) as s:
        assert errors_in(_replies(s, m.describe(b"S", "nope") + m.flush()))
        unit = m.parse("q1", "SELECT 2") + m.bind_raw("", "q1", b"\0\0\0\0\0\0") + execute_message("")
        msgs = _replies(s, unit + m.sync())
        assert [t for t, _ in msgs] == [m.B.READY_FOR_QUERY], msgs
        assert _replies(s, m.query("SELECT 1"))[-1] == (m.B.READY_FOR_QUERY, b"I")
    assert "out of turn" not in proxy.log()
    assert_clean_log(proxy)


def test_parse_of_deallocate_all_does_not_forget_upstream_statements(proxy: ProxyProcess) -> None:
    """Parsing (never executing) ``DEALLOCATE ALL`` must not make the proxy forget the statements the
    upstream connection still holds: preparing the same query again must not fail with 42P05."""
    with session(proxy) as s:
        assert [t for t, _ in _replies(s, m.parse("a", "SELECT 1") + m.sync())] == [ord("1"), ord("Z")]
        _replies(s, m.parse("", "DEALLOCATE ALL") + m.sync())
        msgs = _replies(s, m.parse("b", "SELECT 1") + m.sync())
        assert not errors_in(msgs), errors_in(msgs)
        assert [t for t, _ in msgs] == [ord("1"), ord("Z")]
    assert_clean_log(proxy)


def test_unnamed_statement_of_another_client_is_never_used(start_proxy: Callable[..., ProxyProcess]) -> None:
    """A client that binds or describes the unnamed statement without parsing one gets PostgreSQL's error,
    never the unnamed statement another client left on the pooled connection (one connection: the same)."""
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 1}}})
    with session(proxy) as first:
        msgs = _replies(first, m.parse("", "SELECT 'secret-of-first'") + m.sync())
        assert [t for t, _ in msgs] == [ord("1"), ord("Z")]
    with session(proxy) as second:
        msgs = _replies(second, m.describe(b"S", "") + m.sync())
        assert [e.get("M") for e in errors_in(msgs)] == ["unnamed prepared statement does not exist"], msgs
        msgs = _replies(second, m.bind_raw("", "", b"\0\0\0\0\0\0") + execute_message("") + m.sync())
        assert [e.get("M") for e in errors_in(msgs)] == ["unnamed prepared statement does not exist"], msgs
        assert not any(b"secret-of-first" in payload for _, payload in msgs)
        assert _replies(second, m.query("SELECT 1"))[-1] == (m.B.READY_FOR_QUERY, b"I")
    assert_clean_log(proxy)
