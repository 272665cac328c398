"""Fuzzing the frontend codec and a ClientConnection in-process with random and mutated byte streams.

The generators start from *valid* streams -- startup packets, SASL/md5 password messages, Query and
Parse/Bind/Describe/Execute/Close/Sync pipelines, COPY and FunctionCall messages, all built with the
encoders of :mod:`proxy.protocol` -- and then mutate them: drop, duplicate, swap or insert messages,
corrupt length fields with boundary values, flip, set, insert, delete, duplicate and truncate bytes.

Each ``check_*`` oracle raises AssertionError (or :class:`Hang`) on a violation:

* :func:`read_startup`, :func:`scan_messages`, every decoder and ``ServerAuth.feed`` return or raise
  ProxyError, nothing else, within a time bound; what they return is consistent with the input (offsets,
  re-encoding round trips) and every ProxyError encodes as an ErrorResponse;
* ``ServerAuth`` never authenticates a wrong password, an unknown user or an unusable secret, whatever
  the mutations;
* a :class:`ClientConnection` fed the stream in chunks (fake transport, a real ProxyApp whose upstream
  is unreachable) lets no exception escape, logs no internal error, leaves no failed task, writes only
  well-formed backend messages, closes after every FATAL, never gets stuck paused and, with SCRAM
  configured, never logs a client in.

The generators take a ``random.Random``: here it is Hypothesis's (``st.randoms``), in the long run
(``python -m bench.fuzz``, which loads this file by path) a seeded one. Both call :func:`fuzz_one`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import itertools
import logging
import random
import signal
import struct
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import scramp
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import Config, load_config
from proxy.errors import INVALID_PASSWORD, PROTOCOL_VIOLATION, ProxyError
from proxy.frontend.client import AUTH, CLOSED, MAX_AUTH_MESSAGE, STARTUP, ClientConnection
from proxy.protocol import messages as m
from proxy.protocol.auth import SCRAM_SHA_256, ServerAuth, make_scram_verifier, md5_password
from proxy.protocol.framing import (
    MAX_STARTUP_LENGTH,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    cancel_request,
    gssenc_request,
    read_startup,
    scan_messages,
    ssl_request,
    startup_message,
)
from proxy.server import ProxyApp

# Every kind of case fuzz_one() generates; the long run cycles through them.
KINDS = ("startup", "frames", "decoders", "auth", "client_preauth", "client_session")

# A single call (or a whole in-process client case) taking longer than this is reported as a hang.
CALL_LIMIT = 5.0
CLIENT_LIMIT = 20.0

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")

# Length values around every limit the codec and the client enforce, and the extremes of an Int32.
INTERESTING_INT32 = (
    *(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 17, 255, 256),
    *(MAX_AUTH_MESSAGE - 1, MAX_AUTH_MESSAGE, MAX_AUTH_MESSAGE + 1),
    *(MAX_STARTUP_LENGTH - 1, MAX_STARTUP_LENGTH, MAX_STARTUP_LENGTH + 1),
    *(65_535, 65_536, 262_144, 262_145, 2**24, 2**28, 2**28 + 1, 2**31 - 1),
    *(-1, -4, -(2**31)),
)

USER = "u"
PASSWORD = "p"
# Names the generators use: plain, empty, long, non-ASCII, not valid UTF-8 (surrogate-escaped).
NAMES = ("", "", "s1", "q1", "P_0", "portal", "é", "\udcff\udcfe", "x" * 63, "y" * 300)
USERS = (USER, USER, "app", "nobody", "", "é", "\ufffd", "x" * 200)  # as read_startup decodes them
# Statements only: the live socket test sends these to a real PostgreSQL through the proxy.
SQL = (
    "SELECT 1",
    "select $1::int + $2::int",
    "",
    " ",
    ";",
    "BEGIN",
    "BEGIN READ ONLY",
    "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT s1",
    "ROLLBACK TO SAVEPOINT s1",
    "RELEASE SAVEPOINT s1",
    "SET application_name = 'fuzz'",
    "SET LOCAL work_mem = '4MB'",
    "RESET ALL",
    "DISCARD ALL",
    "DEALLOCATE ALL",
    "DEALLOCATE q1",
    "PREPARE q1 AS SELECT 1",
    "EXECUTE q1",
    "SELECT 1; SELECT 2",
    "/* route: main */ SELECT 1",
    "/* route: nowhere */ SELECT 1",
    "/* unterminated",
    "SELECT 'it''s' AS \"a\"\"b\"",
    "SELECT 'é', '\udcff'",
    "SHOW server_version",
    "LISTEN fuzz",
    "COPY (SELECT 1) TO STDOUT",
    "COPY fuzz_missing FROM STDIN",
    "SELECT * FROM users WHERE id = $1",
)
STARTUP_EXTRAS = (
    ("application_name", "fuzz"),
    ("options", "-c search_path=public"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("replication", "database"),
    ("replication", "false"),
    ("database", "parafort"),
    ("search_path", "a,b"),
    ("é", "\udcff"),
)
# What an in-process client is told the upstream's parameters are (there is no upstream).
SERVER_PARAMETERS = {"server_version": "15.0", "client_encoding": "UTF8", "integer_datetimes": "on"}


class Hang(BaseException):
    """A call did not return within its time bound (a BaseException: ``except Exception`` misses it)."""


def show(data: bytes | Sequence[bytes], limit: int = 600) -> str:
    """A short printable form of an input for failure messages (the repr, cut in the middle)."""
    text = repr(data if isinstance(data, bytes) else list(data))
    return (
        text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 2 :]} ({len(text)} chars)"
    )


@contextlib.contextmanager
def time_bound(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`Hang` if the body runs longer than ``seconds`` (SIGALRM; main thread only).

    Any alarm already set (pytest-timeout's) is suspended and restored with what remains of it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"{what}: no return within {seconds:g}s")

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_delay:
            left = max(old_delay - (time.monotonic() - started), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)


# --- valid streams ------------------------------------------------------------------------------------


def randbytes(rng: random.Random, n: int) -> bytes:
    return rng.getrandbits(8 * n).to_bytes(n, "big") if n > 0 else b""


def _cstr(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape") + b"\0"


def _msg(type_byte: bytes, body: bytes) -> bytes:
    return type_byte + _I32.pack(len(body) + 4) + body


def _int16s(values: Sequence[int]) -> bytes:
    return _I16.pack(len(values)) + b"".join(_I16.pack(v) for v in values)


def _values(rng: random.Random) -> bytes:
    """A parameter (or argument) list: Int16 count, then Int32 length + bytes each (-1 for NULL)."""
    count = rng.choice((0, 0, 1, 2, 3))
    out = [_I16.pack(count)]
    for _ in range(count):
        value = rng.choice((None, b"1", b"42", b"\x00\x00\x00\x01", b"", b"\xff" * 9, b"x" * 100))
        out.append(b"\xff\xff\xff\xff" if value is None else _I32.pack(len(value)) + value)
    return b"".join(out)


def _formats(rng: random.Random) -> list[int]:
    return [rng.choice((0, 1)) for _ in range(rng.choice((0, 0, 1, 2)))]


def bind_message(rng: random.Random, portal: str, statement: str) -> bytes:
    rest = _int16s(_formats(rng)) + _values(rng) + _int16s(_formats(rng))
    return m.bind_raw(portal, statement, rest)


def execute_message(portal: str, max_rows: int = 0) -> bytes:
    return _msg(b"E", _cstr(portal) + _I32.pack(max_rows))


def function_call_message(rng: random.Random) -> bytes:
    oid = rng.choice((0, 1598, 2**32 - 1))  # 1598: md5(text)
    return _msg(b"F", _U32.pack(oid) + _int16s(_formats(rng)) + _values(rng) + _I16.pack(rng.choice((0, 1))))


def frontend_unit(rng: random.Random) -> list[bytes]:
    """One unit of frontend messages, as a client sends it (mostly ending in Sync or Query)."""
    sql = rng.choice(SQL)
    name = rng.choice(NAMES)
    portal = rng.choice(NAMES)
    oids = tuple(rng.choice((0, 23, 25, 2**32 - 1)) for _ in range(rng.choice((0, 0, 1, 2))))
    kind = rng.randrange(13)
    if kind <= 2:
        return [m.query(sql)]
    if kind == 3:  # the unnamed statement, as psycopg and asyncpg do it
        return [
            m.parse("", sql, oids),
            bind_message(rng, "", ""),
            m.describe(b"P", ""),
            execute_message("", rng.choice((0, 1, -1))),
            m.sync(),
        ]
    if kind == 4:  # prepare a named statement, then use it
        return [
            m.parse(name, sql, oids),
            m.describe(b"S", name),
            m.sync(),
            bind_message(rng, portal, name),
            execute_message(portal),
            m.sync(),
        ]
    if kind == 5:  # a pipeline
        out: list[bytes] = []
        for _ in range(rng.randint(1, 3)):
            stmt = rng.choice(NAMES)
            out += [m.parse(stmt, rng.choice(SQL)), bind_message(rng, "", stmt), execute_message("")]
        return [*out, m.sync()]
    if kind == 6:
        return [m.close(rng.choice((b"S", b"P")), name), m.sync()]
    if kind == 7:
        return [m.describe(rng.choice((b"S", b"P")), name), m.flush()]
    if kind == 8:  # COPY data in and out of place
        return [m.query("COPY fuzz_missing FROM STDIN"), _msg(b"d", b"1\t2\n"), _msg(b"c", b"")] + [
            _msg(b"f", _cstr("client gave up"))
        ] * rng.choice((0, 1))
    if kind == 9:
        return [function_call_message(rng)]
    if kind == 10:
        return [rng.choice((m.sync(), m.flush()))]
    if kind == 11:  # a password message after login
        return [m.password_message(b"p")]
    return [m.terminate()]


# Short messages, malformed or not, that may end a batch the client cuts at its size limit.
SHORT_TAILS = (
    _msg(b"B", b""),
    _msg(b"B", b"\0"),
    m.bind_raw("", "", b"\0\0\0\0\0\0"),
    _msg(b"D", b""),
    _msg(b"D", b"S"),
    m.describe(b"S", "s1"),
    _msg(b"E", b""),
    _msg(b"C", b""),
    _msg(b"P", b"abc"),
    _msg(b"P", b"\0abc"),
    m.sync(),
)


def big_unit(rng: random.Random) -> list[bytes]:
    """Messages around the size at which the client cuts a batch (MAX_BATCH_BYTES = 256 KiB).

    A Parse of 262,140..262,144 bytes is under the limit; the short message after it crosses it, so the
    batch is dispatched with that message last in the buffer. Or one big message without any NUL.
    """
    if rng.random() < 0.25:
        return [_msg(rng.choice(b"PQBDE").to_bytes(1, "big"), b"x" * rng.choice((262_140, 300_000)))]
    size = rng.choice((262_139, 262_140, 262_142, 262_144, 262_150))
    return [m.parse("", "x" * (size - 9)), rng.choice(SHORT_TAILS)]


def frontend_messages(rng: random.Random, max_units: int = 4, big: float = 0.05) -> list[bytes]:
    """A few units; sometimes ending in a :func:`big_unit` (last, so its tail ends the buffer)."""
    out: list[bytes] = []
    for _ in range(rng.randint(1, max_units)):
        out += frontend_unit(rng)
    if rng.random() < big:
        out += big_unit(rng)
    return out


def startup_packet(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.75:
        params = {"user": rng.choice(USERS), "database": rng.choice(("db", "app", "u", ""))}
        if rng.random() < 0.1:
            del params["user"]
        for key, value in rng.sample(STARTUP_EXTRAS, rng.choice((0, 0, 1, 2))):
            params[key] = value
        return startup_message(params)
    if r < 0.82:
        return ssl_request()
    if r < 0.86:
        return gssenc_request()
    if r < 0.9:
        return cancel_request(rng.getrandbits(32), rng.getrandbits(32))
    major = rng.choice((0, 1, 2, 3, 4, 1234))
    minor = rng.choice((0, 1, 5678, 5679, 5680, 65535))
    body = rng.choice((b"\0", b"user\0u\0\0", randbytes(rng, rng.randint(0, 16))))
    return struct.pack("!ii", 8 + len(body), (major << 16) | minor) + body


def password_messages(rng: random.Random) -> list[bytes]:
    """What a client answers an authentication request with: SCRAM (well-formed or not) or md5."""
    if rng.random() < 0.2:
        return [m.password_message(("md5" + hashlib.md5(randbytes(rng, 8)).hexdigest()).encode())]
    nonce = base64.b64encode(randbytes(rng, 18)).decode()
    gs2 = rng.choice(("n,,", "n,,", "y,,", "p=tls-server-end-point,,", "n,a=u,", "x,,", ""))
    user = rng.choice(("n=", "n=u", "n=*", "n==2C", "", "n=\udcff"))
    first = f"{gs2}{user},r={nonce}" + rng.choice(("", "", ",e=1", ",m=x", ",r=again"))
    mechanism = rng.choice((SCRAM_SHA_256, SCRAM_SHA_256, "SCRAM-SHA-256-PLUS", "PLAIN", ""))
    out = [m.sasl_initial_response(mechanism, first.encode("utf-8", "surrogateescape"))]
    if rng.random() < 0.1:
        out[0] = _msg(b"p", _cstr(mechanism) + b"\xff\xff\xff\xff")  # no initial response (length -1)
    proof = base64.b64encode(randbytes(rng, 32)).decode()
    final = rng.choice(
        (
            f"c=biws,r={nonce}0123456789abcdef01234567,p={proof}",
            f"c=biws,r={nonce},p={proof}",
            f"c=eSws,r={nonce}x,p=!!!",
            f"c=biws,r={nonce}x",
            "c=biws,r=,p=",
            f"c=biws,r={nonce}x,x=1,p={proof}",
        )
    )
    out.append(m.sasl_response(final.encode()))
    return out


def startup_messages(rng: random.Random) -> list[bytes]:
    """A whole client stream from the first byte: startup packet(s), password exchange, statements."""
    out = [ssl_request()] if rng.random() < 0.2 else []
    out.append(startup_packet(rng))
    r = rng.random()
    if r < 0.8:
        out += password_messages(rng)
    if r < 0.5:
        out += frontend_messages(rng, 2, big=0)
    return out


# --- mutations ----------------------------------------------------------------------------------------


def random_message(rng: random.Random) -> bytes:
    type_byte = bytes([rng.choice((rng.randrange(256), *b"QPBDECSHXFdcfpv?\0"))])
    return _msg(type_byte, randbytes(rng, rng.choice((0, 1, 2, 5, 17, 64))))


def corrupt_length(rng: random.Random, msg: bytes) -> bytes:
    """Overwrite the Int32 at offset 1 (typed message) or 0 (startup packet) with a boundary value."""
    offset = rng.choice((0, 1, 1))
    if len(msg) < offset + 4:
        return msg
    value = rng.choice((*INTERESTING_INT32, len(msg) - 1, len(msg), len(msg) + 1, len(msg) - 2))
    return msg[:offset] + _I32.pack(value) + msg[offset + 4 :]


def mutate_messages(rng: random.Random, msgs: list[bytes]) -> list[bytes]:
    """Structural mutations: drop, duplicate, swap, insert random messages, corrupt lengths."""
    msgs = list(msgs)
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        op = rng.randrange(6)
        i = rng.randrange(len(msgs)) if msgs else 0
        if op == 0 and msgs:
            del msgs[i]
        elif op == 1 and msgs:
            msgs.insert(i, msgs[i])
        elif op == 2 and len(msgs) > 1:
            j = rng.randrange(len(msgs))
            msgs[i], msgs[j] = msgs[j], msgs[i]
        elif op == 3:
            msgs.insert(i, random_message(rng))
        elif msgs:
            msgs[i] = corrupt_length(rng, msgs[i])
    return msgs


def mutate_bytes(rng: random.Random, data: bytes, max_ops: int = 4) -> bytes:
    """Byte-level mutations anywhere in ``data``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, max_ops)):
        n = len(buf)
        op = rng.randrange(8)
        pos = rng.randrange(n + 1)
        if op == 0 and n:  # flip a bit
            buf[pos % n] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # set a byte to a boundary value
            buf[pos % n] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:  # insert random bytes
            buf[pos:pos] = randbytes(rng, rng.randint(1, 16))
        elif op == 3 and n:  # delete a range
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 4 and n:  # duplicate a range
            buf[pos:pos] = buf[pos : pos + rng.randint(1, 32)]
        elif op == 5:  # write a boundary Int32 (a length field, probably not)
            buf[pos : pos + 4] = _I32.pack(rng.choice(INTERESTING_INT32))
        elif op == 6:  # truncate
            del buf[pos:]
        else:  # a random type byte + length in the middle
            buf[pos:pos] = random_message(rng)[:5]
    return bytes(buf)


def mutated(rng: random.Random, msgs: list[bytes]) -> bytes:
    """The stream of ``msgs`` after structural and/or byte mutations (sometimes none at all)."""
    r = rng.random()
    if r < 0.45:
        msgs = mutate_messages(rng, msgs)
    data = b"".join(msgs)
    if r > 0.3:
        data = mutate_bytes(rng, data)
    return data


def chunked(rng: random.Random, data: bytes, max_chunks: int = 6) -> list[bytes]:
    """``data`` cut at random points (sometimes into 1-byte chunks at the start)."""
    if not data:
        return [data]
    if rng.random() < 0.1:
        head = min(len(data), 12)
        return [data[i : i + 1] for i in range(head)] + ([data[head:]] if data[head:] else [])
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(max_chunks)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a] or [data]


def random_stream(rng: random.Random) -> bytes:
    """Pure noise, sometimes starting with a plausible header."""
    data = randbytes(rng, rng.choice((0, 1, 4, 5, 8, 9, 16, 64, 300)))
    if rng.random() < 0.3:
        data = rng.choice((_I32.pack(rng.choice(INTERESTING_INT32)), bytes([rng.randrange(256)]))) + data
    return data


# --- oracles: codec -----------------------------------------------------------------------------------


def check_proxy_error(exc: ProxyError, what: str, data: bytes | Sequence[bytes]) -> None:
    """A ProxyError must be a well-formed client error that encodes as an ErrorResponse."""
    where = f"{what} on input {show(data)}"
    assert isinstance(exc.sqlstate, str) and len(exc.sqlstate) == 5 and exc.sqlstate.isalnum(), where
    assert exc.severity in ("ERROR", "FATAL"), f"{where}: severity {exc.severity!r}"
    assert isinstance(exc.message, str) and exc.message, where
    try:
        encoded = m.error_from(exc)
    except Exception as err:
        raise AssertionError(f"{where}: {exc!r} does not encode as an ErrorResponse: {err!r}") from err
    fields = m.parse_fields(encoded[5:])
    assert fields["C"] == exc.sqlstate, where


def call(fn: Callable[..., Any], *args: Any, data: bytes | Sequence[bytes] = b"") -> Any:
    """``fn(*args)``; anything but a return or a ProxyError (or a hang) becomes an AssertionError."""
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        with time_bound(CALL_LIMIT, name):
            return fn(*args)
    except ProxyError as exc:
        check_proxy_error(exc, name, data)
        raise
    except Exception as exc:
        raise AssertionError(
            f"{name} raised {type(exc).__name__}: {exc} on input {show(data)}\n{traceback.format_exc()}"
        ) from exc


def check_read_startup(data: bytes) -> None:
    """Read packets from ``data`` as the client does: ProxyError or progress, and consistent results."""
    buf = data
    while True:
        try:
            packet, used = call(read_startup, buf, data=data)
        except ProxyError as exc:
            assert exc.sqlstate == PROTOCOL_VIOLATION and exc.fatal, f"{exc!r} on {show(data)}"
            return
        if packet is None:
            assert used == 0, f"incomplete packet but {used} bytes used, input {show(data)}"
            assert len(buf) < MAX_STARTUP_LENGTH, f"{len(buf)} bytes buffered without a packet: {show(data)}"
            return
        assert 8 <= used <= min(len(buf), MAX_STARTUP_LENGTH), f"used {used} of {len(buf)}: {show(data)}"
        assert isinstance(packet, SSLRequest | GSSENCRequest | CancelRequest | StartupMessage), packet
        if isinstance(packet, StartupMessage):
            assert all(isinstance(k, str) and k and isinstance(v, str) for k, v in packet.params.items())
            assert packet.major == 3 or not packet.params  # only 3.x bodies are parsed
        for prefix in {4, used // 2, used - 1}:  # every proper prefix of a packet is "incomplete"
            assert call(read_startup, buf[:prefix], data=data) == (None, 0), f"prefix {prefix}: {show(data)}"
        buf = buf[used:]


def check_frames(data: bytes, max_length: int) -> None:
    """scan_messages over ``data`` (whole, from a midpoint and in two pieces), then every decoder."""
    try:
        msgs, pos = call(scan_messages, data, 0, max_length, data=data)
    except ProxyError as exc:
        assert exc.sqlstate == PROTOCOL_VIOLATION and exc.fatal, f"{exc!r} on {show(data)}"
        msgs, pos = None, -1
    if msgs is None:
        # The error is on some header: then a bytearray and any cut after that header see it too.
        try:
            call(scan_messages, bytearray(data), 0, max_length, data=data)
        except ProxyError:
            return
        raise AssertionError(f"scan_messages accepted a bytearray it refused as bytes: {show(data)}")
    expected = 0
    for type_byte, start, end in msgs:
        assert start == expected and type_byte == data[start], f"{msgs} on {show(data)}"
        length = _I32.unpack_from(data, start + 1)[0]
        assert 4 <= length <= max_length and end == start + 1 + length <= len(data), show(data)
        expected = end
    assert pos == expected, f"offset {pos}, messages end at {expected}: {show(data)}"
    rest = len(data) - pos
    if rest >= 5:
        length = _I32.unpack_from(data, pos + 1)[0]
        assert 4 <= length <= max_length and pos + 1 + length > len(data), show(data)
    assert call(scan_messages, bytearray(data), 0, max_length, data=data) == (msgs, pos)
    if msgs:
        middle = msgs[len(msgs) // 2][1]
        got = call(scan_messages, data, middle, max_length, data=data)
        assert got == ([t for t in msgs if t[1] >= middle], pos), f"from offset {middle}: {show(data)}"
        cut = msgs[len(msgs) // 2][2] - 1  # inside a message: it and the ones after it are incomplete
        got = call(scan_messages, data[:cut], 0, max_length, data=data)
        assert got == ([t for t in msgs if t[2] <= cut], msgs[len(msgs) // 2][1]), f"cut {cut}: {show(data)}"
    view = memoryview(data)
    for _, start, end in msgs:
        check_decoders(view[start + 5 : end])


def _decode(fn: Callable[..., Any], payload: Any, data: bytes) -> Any:
    try:
        return call(fn, payload, data=data)
    except ProxyError as exc:
        assert exc.sqlstate == PROTOCOL_VIOLATION, f"{fn.__name__}: {exc!r} on {show(data)}"
        return None


def check_decoders(payload: bytes | bytearray | memoryview) -> None:
    """Every decoder on ``payload`` (as bytes, bytearray and memoryview); what decodes re-encodes."""
    data = bytes(payload)
    for variant in (data, bytearray(data), memoryview(data)):
        _decode(m.parse_fields, variant, data)
        _decode(m.decode_auth, variant, data)
        _decode(m.decode_ready_for_query, variant, data)
        _decode(m.decode_backend_key_data, variant, data)
        _decode(m.decode_command_complete, variant, data)
        _decode(m.decode_sasl_mechanisms, variant, data)
    got = _decode(m.decode_parse, payload, data)
    if got is not None:
        assert m.parse(*got)[5:] == data, f"decode_parse round trip: {show(data)}"
    got = _decode(m.decode_bind_names, payload, data)
    if got is not None:
        portal, statement, pos = got
        assert m.bind_raw(portal, statement, data[pos:])[5:] == data, f"Bind names: {show(data)}"
        rewritten = call(m.rewrite_bind, payload, "S_1", data=data)
        assert rewritten == m.bind_raw(portal, "S_1", data[pos:]), f"rewrite_bind: {show(data)}"
    elif data.count(0) >= 2:
        raise AssertionError(f"decode_bind_names refused two NUL-terminated names: {show(data)}")
    got = _decode(m.decode_describe_close, payload, data)
    if got is not None:
        assert m.describe(*got)[5:] == data, f"Describe round trip: {show(data)}"
    got = _decode(m.decode_query, payload, data)
    if got is not None:
        assert m.query(got)[5:] == data, f"Query round trip: {show(data)}"
    got = _decode(m.decode_parameter_status, payload, data)
    if got is not None:
        assert m.parameter_status(*got)[5:] == data, f"ParameterStatus round trip: {show(data)}"
    got = _decode(m.decode_password, payload, data)
    if got is not None:
        assert m.password_message(got)[5:] == data, f"PasswordMessage round trip: {show(data)}"
    got = _decode(m.decode_sasl_initial_response, payload, data)
    if got is not None and got[1] is not None:
        assert m.sasl_initial_response(*got)[5:] == data, f"SASLInitialResponse round trip: {show(data)}"


# --- oracles: server-side authentication --------------------------------------------------------------


_B64_KEY = base64.b64encode(bytes(range(32))).decode()


@cache
def scram_secret() -> str:
    return make_scram_verifier(PASSWORD)


def _secret(kind: str, user: str) -> str | None:
    return {
        "plain": PASSWORD,
        "md5": "md5" + hashlib.md5((PASSWORD + user).encode("utf-8", "surrogateescape")).hexdigest(),
        "scram": scram_secret(),
        "none": None,
        "empty": "",
        "bad_scram": "SCRAM-SHA-256$1:AAAA$x:y",
        # Well-formed, but a 3-byte salt that scramp cannot use: the exchange must fail.
        "weak_scram": f"SCRAM-SHA-256$4096:c2FsdA==${_B64_KEY}:{_B64_KEY}",
    }[kind]


def _client_reply(out: bytes, user: str, password: str, client: list[scramp.ScramClient]) -> bytes | None:
    """A well-behaved client's answer to the last Authentication message in ``out`` (None: nothing)."""
    msgs, _ = scan_messages(out, 0, 1 << 20)
    if not msgs:
        return None
    _, start, end = msgs[-1]
    code, data = m.decode_auth(out[start + 5 : end])
    if code == m.AuthCode.MD5_PASSWORD:
        return m.password_message(md5_password(user, password, data).encode())
    if code == m.AuthCode.SASL:
        try:
            scram = scramp.ScramClient([SCRAM_SHA_256], user or "*", password)
        except scramp.ScramException:
            scram = scramp.ScramClient([SCRAM_SHA_256], "*", password)
        client[:] = [scram]
        return m.sasl_initial_response(SCRAM_SHA_256, str(scram.get_client_first()).encode())
    if code == m.AuthCode.SASL_CONTINUE:
        try:
            client[0].set_server_first(data.decode())
            return m.sasl_response(str(client[0].get_client_final()).encode())
        except scramp.ScramException:  # our first message was mutated: the nonce no longer matches
            return m.sasl_response(b"c=biws,r=x,p=" + base64.b64encode(bytes(32)))
    return None


def _still_refuses(auth: ServerAuth, payload: bytes, sent: list[bytes], when: str) -> None:
    try:
        call(auth.feed, m.F.PASSWORD, payload, data=sent)
    except ProxyError:
        return
    raise AssertionError(f"ServerAuth accepted a message after {when}: {show(sent)}")


def check_server_auth(rng: random.Random) -> None:
    """A real client exchange against ServerAuth, each message possibly mutated; never a false login."""
    user = rng.choice(USERS)
    secret_kind = rng.choice(("plain", "md5", "scram", "none", "empty", "bad_scram", "weak_scram"))
    method = rng.choice(("scram-sha-256", "scram-sha-256", "md5", "md5", "trust"))
    right = rng.random() < 0.6
    password = PASSWORD if right else rng.choice(("wrong", PASSWORD + " ", "P"))
    usable = secret_kind in ("plain", "scram") or (secret_kind == "md5" and method == "md5")
    legit = method == "trust" or (right and usable)
    auth = ServerAuth(method, user, _secret(secret_kind, user))
    out = auth.start()
    sent: list[bytes] = []
    mutated_any = False
    client: list[scramp.ScramClient] = []
    for _ in range(4):
        if auth.done:
            break
        reply = _client_reply(out, user, password, client)
        if reply is None:
            break
        if rng.random() < 0.35:
            changed = mutate_bytes(rng, reply, 3) if rng.random() < 0.8 else random_message(rng)
            mutated_any |= changed != reply
            reply = changed
        sent.append(reply)
        mtype = reply[0] if reply else 0
        try:
            out, done = call(auth.feed, mtype, reply[5:], data=sent)
        except ProxyError as exc:
            assert exc.fatal and exc.sqlstate in (PROTOCOL_VIOLATION, INVALID_PASSWORD), (exc, show(sent))
            assert not auth.done, f"failed but done: {show(sent)}"
            _still_refuses(auth, reply[5:], sent, "failing")  # a failed exchange stays failed
            break
        assert done == auth.done, show(sent)
    if auth.done:
        assert legit, (
            f"ServerAuth authenticated method={method} secret={secret_kind} right_password={right} "
            f"user={user!r}: {show(sent)}"
        )
        _still_refuses(auth, b"x\0", sent, "success")
    elif legit and not mutated_any:
        raise AssertionError(f"a correct exchange failed: method={method} secret={secret_kind}: {show(sent)}")


# --- oracles: a ClientConnection in-process -----------------------------------------------------------


class FakeTransport:
    """Just enough of an asyncio transport for ClientConnection; remembers what happened."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.paused = False
        self.writes_after_close = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            self.writes_after_close += 1
            return
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class _ErrorLog(logging.Handler):
    """Collects the proxy's ERROR records (log.exception: internal_error, acquire_error...)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@cache
def client_config(method: str) -> Config:
    """The proxy's config: main only, unreachable (port 1); the users file is main's DSN user "u"."""
    with tempfile.TemporaryDirectory(prefix="parafort-fuzz-") as tmp:
        path = Path(tmp) / "proxy.yaml"
        path.write_text(f"auth:\n  method: {method}\n")
        return load_config(path, {"DATABASE_URL": f"postgresql://{USER}:{PASSWORD}@127.0.0.1:1/db"})


@dataclass
class ClientRun:
    writes: list[bytes] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def _settle(limit: float) -> bool:
    """Let the client's tasks (greeting, acquire attempts) run out; False if they do not in time."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    end = loop.time() + limit
    while True:
        for _ in range(3):
            await asyncio.sleep(0)
        if not any(t is not me and not t.done() for t in asyncio.all_tasks()):
            return True
        if loop.time() > end:
            return False
        await asyncio.sleep(0.0005)


def _check_output(writes: list[bytes], problems: list[str]) -> tuple[list[tuple[int, bytes]], bool]:
    """Each write is b"N" (an SSL/GSS answer) or whole backend messages; returns them and whether the
    client was told FATAL."""
    out: list[tuple[int, bytes]] = []
    fatal_at = -1
    for w in writes:
        if w == b"N":
            continue
        try:
            msgs, pos = scan_messages(w, 0, 1 << 30)
        except ProxyError as exc:
            problems.append(f"write is not backend messages ({exc!r}): {show(w)}")
            continue
        if pos != len(w):
            problems.append(f"write ends in an incomplete message: {show(w)}")
        for type_byte, start, end in msgs:
            payload = w[start + 5 : end]
            out.append((type_byte, payload))
            if type_byte in (m.B.ERROR, m.B.NOTICE):
                try:
                    fields = m.parse_fields(payload)
                except ProxyError:
                    problems.append(f"malformed ErrorResponse/NoticeResponse: {show(payload)}")
                    continue
                if not {"S", "C", "M"} <= fields.keys() or len(fields["C"]) != 5:
                    problems.append(f"ErrorResponse without S, C, M: {fields}")
                if type_byte == m.B.ERROR and fields.get("S") == "FATAL" and fatal_at < 0:
                    fatal_at = len(out)
    if 0 <= fatal_at < len(out):
        problems.append(f"messages written after a FATAL error: {[chr(t) for t, _ in out[fatal_at:]]}")
    return out, fatal_at >= 0


def _check_final_state(
    client: ClientConnection, transport: FakeTransport, method: str, problems: list[str]
) -> None:
    if transport.closed != (client.phase == CLOSED):
        problems.append(f"transport closed={transport.closed} but phase={client.phase}")
    if not transport.closed:
        if client.phase == STARTUP and len(client.buf) >= MAX_STARTUP_LENGTH:
            problems.append(f"{len(client.buf)} bytes buffered in the startup phase")
        if client.phase == AUTH and len(client.buf) > MAX_AUTH_MESSAGE:
            problems.append(f"{len(client.buf)} bytes buffered in the authentication phase")
    if transport.writes_after_close:
        problems.append(f"{transport.writes_after_close} writes after close")
    msgs, fatal = _check_output(transport.writes, problems)
    if fatal and not transport.closed:
        problems.append("FATAL error sent but the connection stays open")
    if method != "trust":
        logins = [p for t, p in msgs if t == m.B.AUTH and p[:4] == b"\0\0\0\0"]
        if logins or client.phase not in (STARTUP, AUTH, CLOSED):
            problems.append(f"AUTHENTICATED a client with random input (phase {client.phase})")


async def _drive(chunks: Sequence[bytes], method: str) -> ClientRun:
    run = ClientRun()
    problems = run.problems
    # A task that fails with nobody awaiting it ("exception was never retrieved") and any other error the
    # event loop reports lands here.
    asyncio.get_running_loop().set_exception_handler(
        lambda _loop, ctx: problems.append(f"event loop error: {ctx}")
    )
    app = ProxyApp(client_config(method))
    if method == "trust":
        app._parameters = dict(SERVER_PARAMETERS)  # what a first upstream connection would have told
    client = ClientConnection(app)
    transport = FakeTransport()
    run.writes = transport.writes
    client.connection_made(transport)
    for chunk in chunks:
        if transport.closed:
            break  # a closed transport delivers nothing more
        try:
            client.data_received(chunk)
        except Exception as exc:
            problems.append(f"data_received raised {exc!r}\n{traceback.format_exc()}")
        if not await _settle(5.0):
            problems.append(f"hang: tasks still running 5s after a chunk: {asyncio.all_tasks()}")
            break
        if not transport.closed:
            if client.phase == CLOSED:
                problems.append("phase CLOSED but the transport is open")
            if client.waiting is not None or transport.paused:
                problems.append(f"stuck: waiting={client.waiting!r} paused={transport.paused}")
    _check_final_state(client, transport, method, problems)
    try:
        client.connection_lost(None)
    except Exception as exc:
        problems.append(f"connection_lost raised {exc!r}\n{traceback.format_exc()}")
    if not await _settle(5.0):
        problems.append("hang: tasks still running 5s after connection_lost")
    if app.clients or app.cancel_keys:
        problems.append(f"client still registered after close: {app.clients} {app.cancel_keys}")
    for label, pool in app.pools.items():
        if pool.stats.active:
            problems.append(f"pool {label}: {pool.stats.active} connections still leased after close")
        pool.close()
    del client, app
    gc.collect(0)  # finished tasks are freed: one whose exception nobody retrieved has been reported
    return run


def check_client(chunks: Sequence[bytes], method: str) -> ClientRun:
    """Feed ``chunks`` to a fresh ClientConnection (auth ``method``) and check everything it did."""
    handler = _ErrorLog()
    logger = logging.getLogger("parafort")
    logger.addHandler(handler)
    try:
        with time_bound(CLIENT_LIMIT, "ClientConnection"):
            run = asyncio.run(_drive(chunks, method))
    finally:
        logger.removeHandler(handler)
    run.problems += [f"proxy logged: {line}" for line in handler.lines]
    assert not run.problems, "\n".join(run.problems) + f"\ninput chunks: {show(chunks, 1200)}"
    return run


# --- one case of each kind ----------------------------------------------------------------------------


def fuzz_one(rng: random.Random, kind: str) -> None:
    """Generate one case of ``kind`` from ``rng`` and check it (AssertionError or Hang on failure)."""
    if kind == "startup":
        r = rng.random()
        data = random_stream(rng) if r < 0.2 else mutated(rng, startup_messages(rng))
        check_read_startup(data)
    elif kind == "frames":
        r = rng.random()
        if r < 0.2:
            data = random_stream(rng)
        else:
            msgs = password_messages(rng) if r < 0.35 else frontend_messages(rng)
            data = mutated(rng, msgs)
        check_frames(data, rng.choice((MAX_AUTH_MESSAGE, 256 * 1024 * 1024, 2**31 - 1, 100)))
    elif kind == "decoders":
        msgs = rng.choice((frontend_messages(rng, 2, big=0), password_messages(rng), [random_message(rng)]))
        payload = rng.choice(msgs)[5:]
        check_decoders(mutate_bytes(rng, payload, 3) if rng.random() < 0.8 else payload)
    elif kind == "auth":
        check_server_auth(rng)
    elif kind == "client_preauth":
        data = random_stream(rng) if rng.random() < 0.15 else mutated(rng, startup_messages(rng))
        check_client(chunked(rng, data), "scram-sha-256")
    elif kind == "client_session":
        login = startup_message({"user": rng.choice(USERS[:4]) or USER, "database": "db"})
        data = mutated(rng, frontend_messages(rng, big=0.15))
        check_client([login, *chunked(rng, data)], "trust")
    else:
        raise ValueError(f"unknown kind {kind!r}")


# --- the CI-sized property tests ----------------------------------------------------------------------

RANDOMS = st.randoms(use_true_random=False)


@settings(max_examples=300, deadline=None)
@given(RANDOMS)
def test_fuzz_read_startup(rng: random.Random) -> None:
    fuzz_one(rng, "startup")


@settings(max_examples=300, deadline=None)
@given(RANDOMS)
def test_fuzz_scan_messages(rng: random.Random) -> None:
    fuzz_one(rng, "frames")


@settings(max_examples=300, deadline=None)
@given(RANDOMS)
def test_fuzz_decoders(rng: random.Random) -> None:
    fuzz_one(rng, "decoders")


@settings(max_examples=150, deadline=None)
@given(RANDOMS)
def test_fuzz_server_auth(rng: random.Random) -> None:
    fuzz_one(rng, "auth")


@settings(max_examples=200, deadline=None)
@given(RANDOMS)
def test_fuzz_client_before_login(rng: random.Random) -> None:
    fuzz_one(rng, "client_preauth")


@settings(max_examples=200, deadline=None)
@given(RANDOMS)
def test_fuzz_client_after_login(rng: random.Random) -> None:
    fuzz_one(rng, "client_session")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(4, 2**31 - 1))
def test_fuzz_codec_random_bytes(data: bytes, max_length: int) -> None:
    check_read_startup(data)
    check_frames(data, max_length)
    check_decoders(data)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=5))
def test_fuzz_client_random_chunks(chunks: list[bytes]) -> None:
    check_client(chunks, "scram-sha-256")
    check_client([startup_message({"user": USER, "database": "db"}), *chunks], "trust")


def test_client_harness_sees_a_login_and_an_error() -> None:
    """The in-process harness works: a trust login, a statement, an upstream error, then garbage."""
    login = startup_message({"user": USER, "database": "db"})
    run = check_client([login, m.query("SELECT 1"), b"?\0\0\0\4"], "trust")
    msgs, _ = _check_output(run.writes, [])
    types = bytes(t for t, _ in msgs)
    assert types.startswith(b"R") and b"K" in types and b"Z" in types
    errors = [m.parse_fields(p) for t, p in msgs if t == m.B.ERROR]
    assert errors[-1]["C"] == PROTOCOL_VIOLATION and errors[-1]["S"] == "FATAL"


@pytest.mark.parametrize(
    "tail",
    [_msg(b"B", b""), _msg(b"B", b"\0"), _msg(b"P", b"abc"), _msg(b"P", b"x" * 300_000)],
    ids=["bind-empty", "bind-one-nul", "parse-without-nul", "big-parse-without-nul"],
)
def test_client_malformed_message_ending_a_cut_batch(tail: bytes) -> None:
    """A batch cut at MAX_BATCH_BYTES whose last message is malformed: 08P01 and a close, no internal
    error (found by this fuzzer: ``ClientConnection._unit_info`` indexed past the buffer)."""
    login = startup_message({"user": USER, "database": "db"})
    parse = m.parse("", "x" * (262_142 - 9))
    data = tail if len(tail) > 262_144 else parse + tail
    run = check_client([login, data], "trust")
    msgs, fatal = _check_output(run.writes, [])
    errors = [m.parse_fields(p) for t, p in msgs if t == m.B.ERROR]
    assert fatal and errors[-1]["C"] == PROTOCOL_VIOLATION, errors


def test_client_extended_rollback_to_in_a_failed_transaction() -> None:
    """BEGIN (answered by the proxy), a statement that fails (the upstream is unreachable), then ROLLBACK
    TO SAVEPOINT by Parse/Bind/Execute/Sync with a named statement: no internal error (found by this
    fuzzer: ``ClientConnection._is_rollback_to`` reads the Parse payload as if it were a Query's SQL)."""
    login = startup_message({"user": USER, "database": "db"})
    rollback_to = [
        m.parse("s", "ROLLBACK TO SAVEPOINT s1"),
        m.bind_raw("", "s", b"\0\0\0\0\0\0"),
        execute_message(""),
        m.sync(),
    ]
    check_client([login, m.query("BEGIN"), m.query("SELECT 1"), b"".join(rollback_to)], "trust")


def test_time_bound_reports_a_hang() -> None:
    try:
        with time_bound(0.05, "sleep"):
            time.sleep(1)
    except Hang as exc:
        assert "sleep" in str(exc)
    else:
        raise AssertionError("no Hang")
