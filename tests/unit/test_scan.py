"""The compiled scanners of the fast path (proxy/protocol/scan.pyx) against a plain reading of the same bytes:
well-formed units and replies, every kind of message around them, and random corruption of lengths and
bytes. A scanner that says yes to something the slow path would refuse (or treat specially) would let the fast
path forward it unread; one that says no too often only costs speed, but is caught here as well."""

from __future__ import annotations

import struct

import pglast
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.protocol import messages as m
from proxy.protocol.scan import begun_reply, captured_reply, extended_unit, literal_shape, whole_reply

PLAIN = b"123TDCnstIVNAHdc"


def _msg(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!I", len(body) + 4) + body


def _messages(buf: bytes) -> list[tuple[int, int, int]] | None:
    """(kind, start, end) of each message exactly filling ``buf``; None when a length is under 4 or runs
    past the end."""
    out = []
    pos = 0
    while pos < len(buf):
        if pos + 5 > len(buf):
            return None
        (length,) = struct.unpack_from("!I", buf, pos + 1)
        if length < 4 or pos + 1 + length > len(buf):
            return None
        out.append((buf[pos], pos, pos + 1 + length))
        pos += 1 + length
    return out


def _whole_reply_oracle(buf: bytes) -> bool:
    msgs = _messages(buf)
    if not msgs or msgs[-1][0] != ord("Z") or msgs[-1][2] - msgs[-1][1] != 6:
        return False
    return all(kind in PLAIN for kind, _, _ in msgs[:-1])


def _begun_reply_oracle(buf: bytes) -> int:
    msgs = _messages(buf)
    if msgs is None or len(msgs) < 3 or msgs[0][0] != ord("C") or msgs[1][0] != ord("Z"):
        return -1
    if msgs[1][2] - msgs[1][1] != 6:
        return -1
    start = msgs[1][2]
    return start if _whole_reply_oracle(buf[start:]) else -1


def _captured_reply_oracle(buf: bytes) -> tuple[int, bytes] | None:
    msgs = _messages(buf)
    kinds = bytes(kind for kind, _, _ in msgs or [])
    ready = kinds.find(b"Z")
    if msgs is None or ready < 0 or not _whole_reply_oracle(buf[: msgs[ready][2]]):
        return None
    if kinds[ready + 1 :] != b"TDCZ" or msgs[-1][2] - msgs[-1][1] != 6:
        return None
    _, row, row_end = msgs[ready + 2]
    return msgs[ready][1], buf[row + 5 : row_end]


def _extended_unit_oracle(data: bytes) -> int:
    msgs = _messages(data)
    if msgs is None:
        return -1
    kinds = bytes(kind for kind, _, _ in msgs)
    if kinds not in (b"PBDES", b"PBES", b"BDES", b"BES"):
        return -1
    first = 1 if kinds[0] == ord("P") else 0
    if first and data[5] != 0:
        return -1
    _, bind, bind_end = msgs[first]
    if bind_end - bind < 7 or data[bind + 5] != 0 or data[bind + 6] != 0:
        return -1
    if kinds[first + 1] == ord("D"):
        _, start, end = msgs[first + 1]
        if end - start < 6 or data[start + 5] != ord("P"):
            return -1
    _, sync, sync_end = msgs[-1]
    return bind if sync_end - sync == 5 else -1


bodies = st.binary(max_size=24)
any_kind = st.sampled_from(PLAIN + b"ESGZKRvW\x00\xff")


@st.composite
def replies(draw: st.DrawFn) -> bytes:
    parts = [_msg(draw(any_kind), draw(bodies)) for _ in range(draw(st.integers(0, 6)))]
    if draw(st.booleans()):
        parts.append(m.ready_for_query(draw(st.sampled_from([b"I", b"T", b"E"]))))
    return b"".join(parts)


@st.composite
def units(draw: st.DrawFn) -> bytes:
    parts = []
    if draw(st.booleans()):
        parts.append(m.parse(draw(st.sampled_from(["", "s1"])), "SELECT $1", ()))
    portal, statement = draw(st.sampled_from([("", ""), ("p", ""), ("", "s1")]))
    parts.append(_msg(ord("B"), f"{portal}\0{statement}\0".encode() + draw(bodies)))
    if draw(st.booleans()):
        parts.append(_msg(ord("D"), draw(st.sampled_from([b"P\0", b"S\0", b"Pp\0"]))))
    if draw(st.booleans()):
        parts.append(_msg(ord("E"), b"\0" + struct.pack("!I", 0)))
    parts.append(draw(st.sampled_from([m.sync(), m.flush(), _msg(ord("S"), b"x"), b""])))
    return b"".join(parts)


def _corrupt(buf: bytes, where: int, value: int) -> bytes:
    if not buf:
        return buf
    where %= len(buf)
    return buf[:where] + bytes([value]) + buf[where + 1 :]


def _variants(buf: bytes, where: int, value: int, cut: int) -> tuple[bytes, ...]:
    """``buf``, one byte of it changed, its last ``cut`` bytes cut off, and one byte more."""
    return buf, _corrupt(buf, where, value), buf[: len(buf) - cut], buf + b"Z"


@settings(max_examples=600, deadline=None)
@given(replies(), st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 3))
def test_whole_reply_matches_a_plain_reading(buf: bytes, where: int, value: int, cut: int) -> None:
    for candidate in _variants(buf, where, value, cut):
        assert whole_reply(candidate) == _whole_reply_oracle(candidate), candidate


@settings(max_examples=600, deadline=None)
@given(replies(), replies(), st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 3))
def test_begun_reply_matches_a_plain_reading(
    first: bytes, rest: bytes, where: int, value: int, cut: int
) -> None:
    begun = m.command_complete("BEGIN") + m.ready_for_query(b"T")
    for head in (begun, first):
        buf = head + rest
        for candidate in _variants(buf, where, value, cut):
            assert begun_reply(candidate) == _begun_reply_oracle(candidate), candidate


@settings(max_examples=600, deadline=None)
@given(replies(), replies(), st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 3))
def test_captured_reply_matches_a_plain_reading(
    first: bytes, rest: bytes, where: int, value: int, cut: int
) -> None:
    captured = m.row_description([("lsn", 3220)]) + m.data_row(["0/3000060"]) + m.command_complete("SELECT 1")
    for tail in (captured + m.ready_for_query(b"I"), rest):
        buf = first + tail
        for candidate in _variants(buf, where, value, cut):
            assert captured_reply(candidate) == _captured_reply_oracle(candidate), candidate


@settings(max_examples=600, deadline=None)
@given(units(), st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 3))
def test_extended_unit_matches_a_plain_reading(data: bytes, where: int, value: int, cut: int) -> None:
    for candidate in (data, _corrupt(data, where, value), data[: len(data) - cut], data + m.sync()):
        assert extended_unit(candidate) == _extended_unit_oracle(candidate), candidate


def test_the_common_cases() -> None:
    tail = struct.pack("!hhI", 0, 1, 1) + b"1" + struct.pack("!h", 0)
    execute = _msg(ord("E"), b"\0" + struct.pack("!I", 0))
    parse = m.parse("", "SELECT $1", ())
    bind = m.bind_raw("", "", tail)
    unit = parse + bind + m.describe(b"P", "") + execute + m.sync()
    assert extended_unit(unit) == len(parse)
    assert extended_unit(bind + execute + m.sync()) == 0
    assert extended_unit(unit[:-1]) == -1
    assert extended_unit(b"") == -1
    reply = m.parse_complete() + m.bind_complete() + m.command_complete("SELECT 1") + m.ready_for_query(b"I")
    assert whole_reply(reply)
    assert not whole_reply(reply[:-1])
    assert not whole_reply(_msg(ord("S"), b"a\0b\0") + reply)  # a setting: the slow path records it
    assert not whole_reply(b"")
    begun = m.command_complete("BEGIN") + m.ready_for_query(b"T")
    assert begun_reply(begun + reply) == len(begun)
    assert begun_reply(begun) == -1  # the unit's own reply is not there yet
    assert begun_reply(begun + reply[:-1]) == -1
    notice = _msg(ord("N"), b"SWARNING\0C25001\0Mthere is already a transaction in progress\0\0")
    assert begun_reply(notice + begun + reply) == -1  # more than the BEGIN's success: feed's
    assert begun_reply(b"") == -1


# literal_shape: the classification cache's key (proxy/router/classify.py), against pglast's own scanner.
_KINDS = {"ICONST": 0x69, "FCONST": 0x66, "SCONST": 0x73}  # i, f, s
_FRAGMENTS = [
    "SELECT",
    "select",
    " ",
    "  ",
    "\n",
    "\t",
    "a",
    "t1",
    "x_2",
    "a$1",
    "E",
    "e",
    "U",
    "&",
    "1",
    "12",
    "007",
    "123456789",
    "1234567890",
    "1.5",
    ".5",
    "1.",
    "1e3",
    "1.5E-3",
    "1e",
    "1..2",
    "0x1F",
    "1_000",
    "'x'",
    "'it''s'",
    "''",
    "'a\\b'",
    "'",
    '"Q"',
    '"a""b"',
    '"',
    "--c\n",
    "-- 5\n",
    "/* 1 */",
    "/* /* 2 */ */",
    "/*",
    "*/",
    "$1",
    "$$",
    "$x$",
    ",",
    "(",
    ")",
    "=",
    "-",
    "+",
    "::",
    ".",
    ";",
    "*",
    "/",
    "é",
    "日本",
    "ü1",
    "'ü'",
    '"ñ"',
]


def _marker_kinds(shape: bytes) -> list[int]:
    return [shape[i + 1] for i in range(len(shape) - 1) if shape[i] == 0]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=14))
def test_literal_shape_finds_the_constants_postgres_lexes(parts: list[str]) -> None:
    """Where literal_shape answers, its literals are exactly pglast's ICONST, FCONST and SCONST tokens
    (same starts, same kinds) and everything else is copied as it is; where pglast's scanner fails, it
    does not answer."""

    text = "".join(parts)
    sql = text.encode()
    offsets: list[int] = []
    shape = literal_shape(sql, offsets)
    if shape is None:
        return
    try:
        tokens = pglast.parser.scan(text)
    except pglast.parser.ParseError:
        raise AssertionError(f"a shape for text PostgreSQL's scanner refuses: {text!r}") from None
    # pglast's scanner counts characters; literal_shape (and pglast's parse locations) count bytes
    constants = [
        (len(text[: t.start].encode()), len(text[: t.end + 1].encode()), _KINDS[t.name])
        for t in tokens
        if t.name in _KINDS
    ]
    found = list(zip(offsets, _marker_kinds(shape), strict=True))
    assert [(start, kind) for start, _, kind in constants] == found
    rebuilt, pos = b"", 0
    for start, end, kind in constants:
        rebuilt += sql[pos:start] + b"\0" + bytes([kind])
        pos = end
    assert rebuilt + sql[pos:] == shape


def test_literal_shape_examples() -> None:
    assert literal_shape(b"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;") == (
        b"SELECT abalance FROM pgbench_accounts WHERE aid = \0i;"
    )
    offsets: list[int] = []
    shape = literal_shape(b"SELECT * FROM t1 WHERE a='x''y' AND b=1.5e3 -- 7\n LIMIT 10", offsets)
    assert shape == b"SELECT * FROM t1 WHERE a=\0s AND b=\0f -- 7\n LIMIT \0i"
    assert offsets == [25, 38, 56]
    # UTF-8: identifiers and literals as PostgreSQL lexes them (a byte above 0x7F is an identifier byte)
    assert literal_shape("SELECT nom FROM clients WHERE ville = 'Zürich' AND n° = 4".encode()) == (
        "SELECT nom FROM clients WHERE ville = \0s AND n° = \0i".encode()
    )
    assert literal_shape("SELECT 1é".encode()) is None  # junk after a number
    for no_shape in (
        b"SELECT 1234567890",  # 10 digits: maybe a bigint
        b"SELECT 0x1F",  # PostgreSQL 16's hex, 15's junk
        b"SELECT $$1$$",
        b"SELECT E'1'",
        b"SELECT 'a'\n'b'",  # one constant, 'ab'
        b"SELECT 'a\\'",
        b"SELECT 'a",
        b"SELECT /* 1",
        b"SELECT a FROM t",  # no literal
    ):
        assert literal_shape(no_shape) is None, no_shape
