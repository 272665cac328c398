"""The sans-IO protocol codec: framing, message round trips, startup packets and authentication."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import itertools
import re
import secrets
import struct
from collections.abc import Callable

import pytest
import scramp
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import INVALID_PASSWORD, PROTOCOL_VIOLATION, SQLCLIENT_UNABLE_TO_ESTABLISH, ProxyError
from proxy.protocol import (
    MAX_STARTUP_LENGTH,
    AuthCode,
    B,
    CancelRequest,
    ClientAuth,
    F,
    GSSENCRequest,
    ServerAuth,
    SSLRequest,
    StartupMessage,
    authentication_cleartext,
    authentication_md5,
    authentication_ok,
    authentication_sasl,
    authentication_sasl_continue,
    authentication_sasl_final,
    backend_key_data,
    bind_complete,
    bind_raw,
    cancel_request,
    close,
    close_complete,
    command_complete,
    data_row,
    decode_auth,
    decode_backend_key_data,
    decode_bind_names,
    decode_command_complete,
    decode_describe_close,
    decode_parameter_status,
    decode_parse,
    decode_password,
    decode_query,
    decode_ready_for_query,
    decode_sasl_initial_response,
    decode_sasl_mechanisms,
    describe,
    empty_query_response,
    error_from,
    error_response,
    flush,
    gssenc_request,
    make_scram_verifier,
    md5_password,
    no_data,
    notice_response,
    parameter_status,
    parse,
    parse_complete,
    parse_fields,
    parse_scram_verifier,
    password_message,
    query,
    read_startup,
    ready_for_query,
    rewrite_bind,
    row_description,
    sasl_initial_response,
    sasl_response,
    scan_messages,
    ssl_request,
    startup_message,
    sync,
    terminate,
)

MAX = 1 << 20


def split(msg: bytes) -> tuple[int, bytes]:
    """One whole encoded message -> (type byte, payload); checks the framing on the way."""
    found, rest = scan_messages(msg, 0, MAX)
    assert rest == len(msg)
    assert len(found) == 1
    t, start, end = found[0]
    assert (start, end) == (0, len(msg))
    return t, msg[5:]


# --- framing ------------------------------------------------------------------------------------------


def test_scan_messages_walks_complete_messages() -> None:
    stream = query("SELECT 1") + sync() + parse("s1", "SELECT $1", (23,))
    found, rest = scan_messages(stream, 0, MAX)
    assert [t for t, _, _ in found] == [F.QUERY, F.SYNC, F.PARSE]
    assert rest == len(stream)
    assert b"".join(stream[s:e] for _, s, e in found) == stream
    # From an offset, and with an incomplete tail.
    found, rest = scan_messages(stream[:-1], found[1][1], MAX)
    assert [t for t, _, _ in found] == [F.SYNC]
    assert rest == len(stream) - len(parse("s1", "SELECT $1", (23,)))


def test_scan_messages_every_split_point() -> None:
    msgs = [query("SELECT 1"), parse("", "SELECT $1", (25,)), bind_raw("", "", b"\0\0\0\0\0\0"), sync()]
    stream = b"".join(msgs)
    expected = [split(m_) for m_ in msgs]
    for cut in range(len(stream) + 1):
        assert _scan_chunked(stream, [cut]) == expected


def _scan_chunked(stream: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    """Feed ``stream`` in pieces cut at ``cuts``, consuming complete messages like a reader loop would."""
    buf = bytearray()
    out: list[tuple[int, bytes]] = []
    bounds = [0, *sorted(cuts), len(stream)]
    for a, b in itertools.pairwise(bounds):
        buf += stream[a:b]
        found, rest = scan_messages(buf, 0, MAX)
        out += [(t, bytes(buf[s + 5 : e])) for t, s, e in found]
        del buf[:rest]
    assert not buf
    return out


@pytest.mark.parametrize("length", [0, 3, -1, -(2**31), MAX + 1, 2**31 - 1])
def test_scan_messages_bad_length(length: int) -> None:
    bad = b"Q" + struct.pack("!i", length)
    with pytest.raises(ProxyError) as info:
        scan_messages(sync() + bad, 0, MAX)  # rejected on the header alone, before the body arrives
    assert info.value.sqlstate == PROTOCOL_VIOLATION and info.value.fatal
    assert info.value.message == "invalid message length"


def test_scan_messages_max_length_is_inclusive() -> None:
    msg = b"d" + struct.pack("!i", 100) + bytes(96)
    assert scan_messages(msg, 0, 100) == ([(ord("d"), 0, 101)], 101)
    with pytest.raises(ProxyError):
        scan_messages(msg, 0, 99)
    assert scan_messages(b"Z\0\0", 0, 100) == ([], 0)  # header incomplete: nothing yet, no error


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=12),
    st.lists(st.integers(0, 10_000), max_size=10),
)
def test_scan_messages_random_chunking(msgs: list[tuple[int, bytes]], cut_seeds: list[int]) -> None:
    stream = b"".join(bytes([t]) + struct.pack("!i", len(p) + 4) + p for t, p in msgs)
    cuts = [c % (len(stream) + 1) for c in cut_seeds]
    assert _scan_chunked(stream, cuts) == msgs


# --- startup packets ----------------------------------------------------------------------------------


def test_read_startup_each_packet_type() -> None:
    assert read_startup(ssl_request()) == (SSLRequest(), 8)
    assert read_startup(gssenc_request()) == (GSSENCRequest(), 8)
    assert read_startup(cancel_request(1234, -5)) == (CancelRequest(1234, 2**32 - 5), 16)
    params = {"user": "alice", "database": "db", "application_name": "ünï", "options": "-c x=1"}
    raw = startup_message(params)
    packet, n = read_startup(raw + b"trailing bytes belong to the next packet")
    assert n == len(raw)
    assert packet == StartupMessage(3, 0, params)
    assert isinstance(packet, StartupMessage) and packet.is_v3
    assert read_startup(startup_message({})) == (StartupMessage(3, 0, {}), 9)


def test_read_startup_incomplete_at_every_prefix() -> None:
    for raw in (ssl_request(), cancel_request(1, 2), startup_message({"user": "u"})):
        for i in range(len(raw)):
            assert read_startup(raw[:i]) == (None, 0)
            assert read_startup(bytearray(raw[:i])) == (None, 0)


@pytest.mark.parametrize("length", [0, 4, 7, -1, MAX_STARTUP_LENGTH + 1])
def test_read_startup_bad_length(length: int) -> None:
    with pytest.raises(ProxyError) as info:
        read_startup(struct.pack("!i", length))  # rejected before the rest arrives
    assert info.value.sqlstate == PROTOCOL_VIOLATION and info.value.fatal


def test_read_startup_max_length_accepted() -> None:
    value = "x" * (MAX_STARTUP_LENGTH - 8 - len("user") - 3)
    raw = startup_message({"user": value})
    assert len(raw) == MAX_STARTUP_LENGTH
    assert read_startup(raw)[1] == MAX_STARTUP_LENGTH


def _startup_raw(body: bytes, code: int = 196608) -> bytes:
    return struct.pack("!ii", len(body) + 8, code) + body


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no terminator at all
        b"user\0alice\0",  # missing final NUL
        b"user\0alice",  # value not terminated
        b"user\0\0",  # name without value
        b"user\0alice\0database\0\0",  # odd count
        b"\0alice\0\0",  # empty name
        b"user\0alice\0\0\0",  # extra bytes after the terminator
    ],
)
def test_read_startup_bad_params(body: bytes) -> None:
    with pytest.raises(ProxyError) as info:
        read_startup(_startup_raw(body))
    assert info.value.sqlstate == PROTOCOL_VIOLATION and info.value.fatal


def test_read_startup_special_request_lengths() -> None:
    for code in (80877102, 80877103, 80877104):
        with pytest.raises(ProxyError):
            read_startup(_startup_raw(b"\0\0\0\0\0\0\0\0\0", code))


def test_read_startup_other_versions_and_bad_utf8() -> None:
    packet, _ = read_startup(_startup_raw(b"user\0alice\0\0", 3 << 16 | 2))
    assert packet == StartupMessage(3, 2, {"user": "alice"})
    assert isinstance(packet, StartupMessage) and not packet.is_v3
    # Protocol 2.0 has a different body layout: not parsed, the caller rejects it with 0A000.
    packet, _ = read_startup(_startup_raw(b"\x01" * 288, 2 << 16))
    assert packet == StartupMessage(2, 0, {})
    packet, _ = read_startup(_startup_raw(b"user\0al\xffice\0\0"))
    assert packet == StartupMessage(3, 0, {"user": "al\ufffdice"})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_read_startup_random_bytes_only_proxy_errors(data: bytes) -> None:
    try:
        packet, n = read_startup(data)
    except ProxyError as exc:
        assert exc.sqlstate == PROTOCOL_VIOLATION
    else:
        assert (packet is None) == (n == 0)


# --- message round trips ------------------------------------------------------------------------------

ODD = "naïve \udcff name"  # not valid UTF-8 on the wire: surrogateescape must round-trip it


def test_parse_round_trip() -> None:
    t, payload = split(parse("stmt_1", "SELECT $1::int, $2", (23, 4294967295)))
    assert t == F.PARSE
    assert decode_parse(payload) == ("stmt_1", "SELECT $1::int, $2", (23, 4294967295))
    assert decode_parse(memoryview(split(parse(ODD, "SELECT 'ü'"))[1])) == (ODD, "SELECT 'ü'", ())
    assert decode_parse(bytearray(split(parse("", ""))[1])) == ("", "", ())


def test_bind_names_and_rewrite() -> None:
    rest = b"\0\x01\0\x01\0\x01\0\0\0\x03abc\0\x01\0\x00"
    msg = bind_raw("portal", ODD, rest)
    t, payload = split(msg)
    assert t == F.BIND
    portal, statement, offset = decode_bind_names(payload)
    assert (portal, statement) == ("portal", ODD)
    assert payload[offset:] == rest
    new = rewrite_bind(payload, "pf_42")
    assert new == bind_raw("portal", "pf_42", rest)
    assert decode_bind_names(memoryview(split(new)[1]))[:2] == ("portal", "pf_42")
    assert rewrite_bind(split(bind_raw("", "", b""))[1], "x") == bind_raw("", "x", b"")


def test_describe_close_round_trip() -> None:
    for encode, type_byte in ((describe, F.DESCRIBE), (close, F.CLOSE)):
        for kind in (b"S", b"P"):
            t, payload = split(encode(kind, ODD))
            assert t == type_byte
            assert decode_describe_close(payload) == (kind, ODD)
        with pytest.raises(ValueError):
            encode(b"X", "name")
    with pytest.raises(ProxyError):
        decode_describe_close(b"Xname\0")


def test_simple_round_trips() -> None:
    t, payload = split(query("SELECT 'ü'; SELECT 2"))
    assert (t, decode_query(payload)) == (F.QUERY, "SELECT 'ü'; SELECT 2")
    t, payload = split(parameter_status("application_name", ODD))
    assert (t, decode_parameter_status(payload)) == (B.PARAMETER_STATUS, ("application_name", ODD))
    t, payload = split(backend_key_data(4242, -1))
    assert (t, decode_backend_key_data(payload)) == (B.BACKEND_KEY_DATA, (4242, 4294967295))
    t, payload = split(command_complete("INSERT 0 1"))
    assert (t, decode_command_complete(payload)) == (B.COMMAND_COMPLETE, "INSERT 0 1")
    for status in (b"I", b"T", b"E"):
        t, payload = split(ready_for_query(status))
        assert (t, decode_ready_for_query(payload)) == (B.READY_FOR_QUERY, status)
    with pytest.raises(ValueError):
        ready_for_query(b"X")


def test_fixed_messages() -> None:
    assert parse_complete() == b"1\0\0\0\x04"
    assert bind_complete() == b"2\0\0\0\x04"
    assert close_complete() == b"3\0\0\0\x04"
    assert no_data() == b"n\0\0\0\x04"
    assert empty_query_response() == b"I\0\0\0\x04"
    assert sync() == b"S\0\0\0\x04"
    assert flush() == b"H\0\0\0\x04"
    assert terminate() == b"X\0\0\0\x04"
    assert authentication_ok() == b"R\0\0\0\x08\0\0\0\0"


def test_error_and_notice_fields() -> None:
    t, payload = split(error_response("FATAL", "08P01", "bad ü", detail="d", hint=ODD))
    assert t == B.ERROR
    assert parse_fields(payload) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "08P01",
        "M": "bad ü",
        "D": "d",
        "H": ODD,
    }
    t, payload = split(notice_response("WARNING", "01000", "careful"))
    assert t == B.NOTICE
    assert parse_fields(payload) == {"S": "WARNING", "V": "WARNING", "C": "01000", "M": "careful"}
    exc = ProxyError("28P01", "nope", detail="x", severity="FATAL")
    assert error_from(exc) == error_response("FATAL", "28P01", "nope", "x", None)
    assert parse_fields(b"\0") == {}
    for bad in (b"", b"Mmsg\0", b"Mmsg", b"Mmsg\0\0extra"):
        with pytest.raises(ProxyError):
            parse_fields(bad)


def test_auth_messages_round_trip() -> None:
    cases: list[tuple[bytes, int, bytes]] = [
        (authentication_ok(), AuthCode.OK, b""),
        (authentication_cleartext(), AuthCode.CLEARTEXT_PASSWORD, b""),
        (authentication_md5(b"salt"), AuthCode.MD5_PASSWORD, b"salt"),
        (authentication_sasl_continue(b"r=abc"), AuthCode.SASL_CONTINUE, b"r=abc"),
        (authentication_sasl_final(b"v=xyz"), AuthCode.SASL_FINAL, b"v=xyz"),
    ]
    for msg, code, rest in cases:
        t, payload = split(msg)
        assert t == B.AUTH
        assert decode_auth(payload) == (code, rest)
    t, payload = split(authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    code, rest = decode_auth(payload)
    assert code == AuthCode.SASL
    assert decode_sasl_mechanisms(rest) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    with pytest.raises(ValueError):
        authentication_md5(b"toolong")
    with pytest.raises(ProxyError):
        decode_sasl_mechanisms(b"SCRAM-SHA-256\0")  # list terminator missing


def test_password_messages_round_trip() -> None:
    t, payload = split(password_message(b"md5abc"))
    assert (t, decode_password(payload)) == (F.PASSWORD, b"md5abc")
    t, payload = split(sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    assert decode_sasl_initial_response(payload) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert decode_sasl_initial_response(b"SCRAM-SHA-256\0\xff\xff\xff\xff") == ("SCRAM-SHA-256", None)
    assert split(sasl_response(b"c=biws,r=x,p=y")) == (F.PASSWORD, b"c=biws,r=x,p=y")
    with pytest.raises(ValueError):
        password_message(b"a\0b")
    for bad in (b"", b"pw", b"pw\0x"):
        with pytest.raises(ProxyError):
            decode_password(bad)
    for bad in (b"SCRAM-SHA-256\0\0\0\0\x05abc", b"SCRAM-SHA-256\0\0\0", b"SCRAM-SHA-256\0\xff\xff\xff\xfex"):
        with pytest.raises(ProxyError):
            decode_sasl_initial_response(bad)


def test_row_description_and_data_row() -> None:
    t, payload = split(row_description([("name", 25), ("n", 20)]))
    assert t == B.ROW_DESCRIPTION
    assert struct.unpack_from("!h", payload)[0] == 2
    assert payload[2:7] == b"name\0"
    assert struct.unpack_from("!IhIhih", payload, 7) == (0, 0, 25, -1, -1, 0)
    assert payload[25:27] == b"n\0"
    assert struct.unpack_from("!IhIhih", payload, 27) == (0, 0, 20, 8, -1, 0)
    assert len(payload) == 27 + 18
    t, payload = split(data_row(["ab", None, "", "ü"]))
    assert t == B.DATA_ROW
    assert payload == b"\0\x04" + b"\0\0\0\x02ab" + b"\xff\xff\xff\xff" + b"\0\0\0\0" + b"\0\0\0\x02\xc3\xbc"


def test_encoders_reject_nul() -> None:
    calls: list[Callable[[], bytes]] = [
        lambda: query("a\0b"),
        lambda: parse("s\0", "q"),
        lambda: command_complete("\0"),
        lambda: startup_message({"user": "a\0"}),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()


def test_decoders_reject_malformed() -> None:
    cases: list[tuple[Callable[[bytes], object], bytes]] = [
        (decode_query, b"SELECT 1"),
        (decode_query, b"SELECT 1\0extra"),
        (decode_parse, b"s\0q\0"),
        (decode_parse, b"s\0q\0\0\x02\0\0\0\x17"),
        (decode_parse, b"s\0q\0\xff\xff"),
        (decode_parse, b"s\0q\0\0\0junk"),
        (decode_bind_names, b"portal\0stmt"),
        (decode_bind_names, b"portal"),
        (lambda p: rewrite_bind(p, "x"), b"portal\0stmt"),
        (lambda p: rewrite_bind(p, "x"), b""),
        (decode_describe_close, b""),
        (decode_describe_close, b"Sname"),
        (decode_parameter_status, b"name\0value"),
        (decode_parameter_status, b"a\0b\0c"),
        (decode_backend_key_data, b"\0\0\0\x01\0\0\0"),
        (decode_command_complete, b"SELECT 1"),
        (decode_ready_for_query, b""),
        (decode_ready_for_query, b"II"),
        (decode_auth, b"\0\0\0"),
    ]
    for decode, payload in cases:
        with pytest.raises(ProxyError) as info:
            decode(payload)
        assert info.value.sqlstate == PROTOCOL_VIOLATION, (decode, payload)


DECODERS: list[Callable[[bytes], object]] = [
    parse_fields,
    decode_parse,
    decode_bind_names,
    lambda p: rewrite_bind(p, "s1"),
    decode_describe_close,
    decode_query,
    decode_parameter_status,
    decode_backend_key_data,
    decode_command_complete,
    decode_auth,
    decode_ready_for_query,
    decode_sasl_mechanisms,
    decode_password,
    decode_sasl_initial_response,
]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=48), st.sampled_from([bytes, bytearray, memoryview]))
def test_decoders_raise_only_proxy_error(data: bytes, kind: Callable[[bytes], bytes]) -> None:
    for decode in DECODERS:
        try:
            decode(kind(data))
        except ProxyError as exc:
            assert exc.sqlstate == PROTOCOL_VIOLATION


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=12).filter(lambda s: "\0" not in s),
    st.text(max_size=30).filter(lambda s: "\0" not in s),
    st.lists(st.integers(0, 2**32 - 1), max_size=5),
    st.binary(max_size=20),
)
def test_round_trip_property(name: str, sql: str, oids: list[int], rest: bytes) -> None:
    assert decode_parse(split(parse(name, sql, tuple(oids)))[1]) == (name, sql, tuple(oids))
    payload = split(bind_raw(sql, name, rest))[1]
    portal, statement, offset = decode_bind_names(payload)
    assert (portal, statement, payload[offset:]) == (sql, name, rest)
    assert decode_query(split(query(sql))[1]) == sql


# --- authentication -----------------------------------------------------------------------------------


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    found, rest = scan_messages(data, 0, MAX)
    assert rest == len(data)
    return [(t, data[s + 5 : e]) for t, s, e in found]


def authenticate(method: str, user: str, secret: str | None, password: str | None) -> list[int]:
    """Run ServerAuth against ClientAuth in process; returns the auth codes the client saw."""
    server = ServerAuth(method, user, secret)
    client = ClientAuth(user, password)
    codes: list[int] = []
    to_client = server.start()
    while True:
        reply = b""
        for t, payload in _frames(to_client):
            assert t == B.AUTH
            code, data = decode_auth(payload)
            codes.append(code)
            answer = client.feed(code, data)
            if answer is not None:
                reply += answer
        if server.done:
            assert client.done and not reply
            return codes
        frames = _frames(reply)
        assert len(frames) == 1
        to_client, done = server.feed(*frames[0])
        assert done == server.done


def auth_error(method: str, user: str, secret: str | None, password: str | None) -> ProxyError:
    with pytest.raises(ProxyError) as info:
        authenticate(method, user, secret, password)
    return info.value


def test_scram_with_plain_secret() -> None:
    codes = authenticate("scram-sha-256", "alice", "s3cret ü", "s3cret ü")
    assert codes == [AuthCode.SASL, AuthCode.SASL_CONTINUE, AuthCode.SASL_FINAL, AuthCode.OK]


def test_scram_with_verifier_secret() -> None:
    verifier = make_scram_verifier("pa$$word")
    assert authenticate("scram-sha-256", "bob", verifier, "pa$$word")[-1] == AuthCode.OK
    # PostgreSQL's rule: method md5 with a SCRAM-stored secret authenticates with SCRAM.
    assert authenticate("md5", "bob", verifier, "pa$$word")[0] == AuthCode.SASL


def test_md5_with_plain_and_stored_secret() -> None:
    assert authenticate("md5", "carol", "hunter2", "hunter2") == [AuthCode.MD5_PASSWORD, AuthCode.OK]
    stored = "md5" + hashlib.md5(b"hunter2carol").hexdigest()
    assert authenticate("md5", "carol", stored, "hunter2") == [AuthCode.MD5_PASSWORD, AuthCode.OK]
    # The proxy can also log in upstream with only the stored hash.
    assert authenticate("md5", "carol", "hunter2", stored) == [AuthCode.MD5_PASSWORD, AuthCode.OK]


def test_trust() -> None:
    server = ServerAuth("trust", "anyone", None)
    assert server.start() == authentication_ok()
    assert server.done
    assert authenticate("trust", "dave", None, None) == [AuthCode.OK]


FAILED = 'password authentication failed for user "eve"'


@pytest.mark.parametrize("method", ["scram-sha-256", "md5"])
def test_wrong_password_and_unknown_user_identical(method: str) -> None:
    secret = "right" if method == "md5" else make_scram_verifier("right")
    errors = [
        auth_error(method, "eve", secret, "wrong"),
        auth_error(method, "eve", None, "wrong"),
        auth_error(method, "eve", "", ""),
    ]
    for exc in errors:
        assert (exc.sqlstate, exc.message, exc.severity, exc.detail, exc.hint) == (
            INVALID_PASSWORD,
            FAILED,
            "FATAL",
            None,
            None,
        )
        assert error_from(exc) == error_from(errors[0])


def test_scram_unknown_user_indistinguishable_from_plain_secret() -> None:
    """Unknown user, md5-stored secret and a plain secret: same full exchange, same stable salt."""
    salts = []
    for secret in (None, None, "md5" + "0" * 32, "the-real-one", "the-real-one"):
        server = ServerAuth("scram-sha-256", "mallory", secret)
        client = scramp.ScramClient(["SCRAM-SHA-256"], "mallory", "guess")
        server.start()
        out, done = server.feed(F.PASSWORD, split(sasl_initial_response("SCRAM-SHA-256", _b(client)))[1])
        assert not done
        code, server_first = decode_auth(split(out)[1])
        assert code == AuthCode.SASL_CONTINUE
        salts.append(re.search(r",s=([^,]+),", server_first.decode()).group(1))  # type: ignore[union-attr]
        client.set_server_first(server_first.decode())
        with pytest.raises(ProxyError) as info:
            server.feed(F.PASSWORD, split(sasl_response(client.get_client_final().encode()))[1])
        assert info.value.message == 'password authentication failed for user "mallory"'
    assert len(set(salts)) == 1 and len(base64.b64decode(salts[0])) == 16
    other = ServerAuth("scram-sha-256", "someone-else", None)
    other.start()
    client = scramp.ScramClient(["SCRAM-SHA-256"], "x", "guess")
    out, _ = other.feed(F.PASSWORD, split(sasl_initial_response("SCRAM-SHA-256", _b(client)))[1])
    assert f"s={salts[0]}," not in out.decode("latin-1")


def _b(client: scramp.ScramClient) -> bytes:
    return str(client.get_client_first()).encode()


def _libpq_style_exchange(gs2: str, password: str, secret: str) -> ServerAuth:
    """A SCRAM client computed by hand the way libpq does it: empty user name in client-first."""
    server = ServerAuth("scram-sha-256", "app", secret)
    server.start()
    nonce = base64.b64encode(secrets.token_bytes(18)).decode()
    bare = f"n=,r={nonce}"
    out, _ = server.feed(F.PASSWORD, split(sasl_initial_response("SCRAM-SHA-256", (gs2 + bare).encode()))[1])
    server_first = decode_auth(split(out)[1])[1].decode()
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    assert attrs["r"].startswith(nonce)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c={base64.b64encode(gs2.encode()).decode()},r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(stored_key, auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = f"{without_proof},p={base64.b64encode(proof).decode()}"
    out, done = server.feed(F.PASSWORD, split(sasl_response(final.encode()))[1])
    assert done and server.done
    frames = _frames(out)
    assert [decode_auth(p)[0] for _, p in frames] == [AuthCode.SASL_FINAL, AuthCode.OK]
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    expected = base64.b64encode(hmac.digest(server_key, auth_message, "sha256")).decode()
    assert decode_auth(frames[0][1])[1].decode() == f"v={expected}"
    return server


@pytest.mark.parametrize("gs2", ["n,,", "y,,"])
def test_scram_empty_username_and_gs2_headers(gs2: str) -> None:
    _libpq_style_exchange(gs2, "pw", "pw")
    _libpq_style_exchange(gs2, "pw", make_scram_verifier("pw"))
    with pytest.raises(ProxyError) as info:
        _libpq_style_exchange(gs2, "pw", "other")
    assert info.value.sqlstate == INVALID_PASSWORD


def test_server_auth_protocol_violations() -> None:
    server = ServerAuth("md5", "u", "pw")
    server.start()
    with pytest.raises(ProxyError) as info:
        server.feed(F.QUERY, b"SELECT 1\0")
    assert (info.value.sqlstate, info.value.severity) == (PROTOCOL_VIOLATION, "FATAL")

    def scram_first(payload: bytes) -> ProxyError:
        server = ServerAuth("scram-sha-256", "u", "pw")
        server.start()
        with pytest.raises(ProxyError) as info:
            server.feed(F.PASSWORD, payload)
        return info.value

    for payload in (
        split(sasl_initial_response("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc"))[1],
        split(sasl_initial_response("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc"))[1],
        split(sasl_initial_response("SCRAM-SHA-256", b"n,,garbage"))[1],
        split(sasl_initial_response("SCRAM-SHA-256", b"\xff"))[1],
        b"SCRAM-SHA-256\0\xff\xff\xff\xff",
        b"no terminator",
    ):
        exc = scram_first(payload)
        assert (exc.sqlstate, exc.severity) == (PROTOCOL_VIOLATION, "FATAL"), payload
    with pytest.raises(ValueError):
        ServerAuth("password", "u", "pw")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40), st.booleans())
def test_server_auth_random_input_only_proxy_error(data: bytes, scram: bool) -> None:
    server = ServerAuth("scram-sha-256" if scram else "md5", "u", "pw")
    server.start()
    with pytest.raises(ProxyError):
        server.feed(F.PASSWORD, data)


def test_client_auth_cleartext_and_md5_messages() -> None:
    client = ClientAuth("u", "pw")
    assert client.feed(AuthCode.CLEARTEXT_PASSWORD, b"") == password_message(b"pw")
    answer = client.feed(AuthCode.MD5_PASSWORD, b"\x01\x02\x03\x04")
    assert answer == password_message(md5_password("u", "pw", b"\x01\x02\x03\x04").encode())
    inner = hashlib.md5(b"pwu").hexdigest()
    assert md5_password("u", "pw", b"abcd") == "md5" + hashlib.md5(inner.encode() + b"abcd").hexdigest()
    assert client.feed(AuthCode.OK, b"") is None and client.done


@pytest.mark.parametrize(
    ("code", "name"),
    [(2, "Kerberos V5"), (6, "SCM credential"), (7, "GSSAPI"), (9, "SSPI"), (42, "unknown (42)")],
)
def test_client_auth_unsupported_codes(code: int, name: str) -> None:
    with pytest.raises(ProxyError) as info:
        ClientAuth("u", "topsecret").feed(code, b"")
    assert info.value.sqlstate == SQLCLIENT_UNABLE_TO_ESTABLISH
    assert name in info.value.message and "topsecret" not in str(info.value)


def test_client_auth_errors() -> None:
    def error(password: str | None, code: int, data: bytes = b"") -> ProxyError:
        with pytest.raises(ProxyError) as info:
            ClientAuth("u", password).feed(code, data)
        return info.value

    sasl_list = decode_auth(split(authentication_sasl(["SCRAM-SHA-256"]))[1])[1]
    for code, data, method in (
        (AuthCode.CLEARTEXT_PASSWORD, b"", "password"),
        (AuthCode.MD5_PASSWORD, b"salt", "md5"),
        (AuthCode.SASL, sasl_list, "SCRAM-SHA-256"),
    ):
        exc = error(None, code, data)
        assert exc.sqlstate == SQLCLIENT_UNABLE_TO_ESTABLISH
        assert method in exc.message and "not configured" in exc.message
    exc = error("topsecret", AuthCode.SASL, decode_auth(split(authentication_sasl(["SCRAM-SHA-1"]))[1])[1])
    assert exc.sqlstate == SQLCLIENT_UNABLE_TO_ESTABLISH and "SCRAM-SHA-1" in exc.message
    stored = "md5" + "a" * 32
    exc = error(stored, AuthCode.CLEARTEXT_PASSWORD)
    assert "md5 hash" in exc.message and stored not in str(exc)
    exc = error(make_scram_verifier("x"), AuthCode.SASL, sasl_list)
    assert "SCRAM verifier" in exc.message and "SCRAM-SHA-256$" not in exc.message
    assert error("pw", AuthCode.MD5_PASSWORD, b"toolong").sqlstate == PROTOCOL_VIOLATION


def test_client_auth_rejects_bad_server_signature_and_skipped_final() -> None:
    server = scramp.ScramMechanism().make_server(lambda _u: scramp.ScramMechanism().make_auth_info("pw"))
    client = ClientAuth("u", "pw")
    first = client.feed(AuthCode.SASL, b"SCRAM-SHA-256\0\0")
    assert first is not None
    server.set_client_first(decode_sasl_initial_response(split(first)[1])[1].decode())  # type: ignore[union-attr]
    final = client.feed(AuthCode.SASL_CONTINUE, server.get_server_first().encode())
    assert final is not None
    server.set_client_final(split(final)[1].decode())
    with pytest.raises(ProxyError) as info:
        client.feed(AuthCode.OK, b"")  # AuthenticationOk without SASLFinal: server never proved itself
    assert info.value.sqlstate == SQLCLIENT_UNABLE_TO_ESTABLISH
    bogus = "v=" + base64.b64encode(bytes(32)).decode()
    with pytest.raises(ProxyError) as info:
        client.feed(AuthCode.SASL_FINAL, bogus.encode())
    assert info.value.sqlstate == SQLCLIENT_UNABLE_TO_ESTABLISH and "pw" not in info.value.message.split()


def test_client_auth_wrong_password_upstream() -> None:
    exc = auth_error("scram-sha-256", "u", "right", "wrong")
    assert exc.sqlstate == INVALID_PASSWORD  # raised by ServerAuth, the "upstream" here


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([0, 3, 5, 10, 11, 12, 2, 7]), st.binary(max_size=30))
def test_client_auth_random_input_only_proxy_error(code: int, data: bytes) -> None:
    client = ClientAuth("u", "pw")
    with contextlib.suppress(ProxyError):
        client.feed(code, data)


# --- SCRAM verifier format ----------------------------------------------------------------------------

PG_VERIFIER = re.compile(
    r"^SCRAM-SHA-256\$4096:[A-Za-z0-9+/]{22}==\$[A-Za-z0-9+/]{43}=:[A-Za-z0-9+/]{43}=$"
)  # what PostgreSQL 15 stores in pg_authid.rolpassword: 16-byte salt, 32-byte keys


def test_make_scram_verifier_matches_postgres_format() -> None:
    verifier = make_scram_verifier("correct horse")
    assert PG_VERIFIER.match(verifier), verifier
    parsed = parse_scram_verifier(verifier)
    assert parsed is not None and str(parsed) == verifier
    # Independent derivation of StoredKey/ServerKey (RFC 5802) from the stored salt.
    salted = hashlib.pbkdf2_hmac("sha256", b"correct horse", parsed.salt, 4096)
    assert parsed.stored_key == hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    assert parsed.server_key == hmac.digest(salted, b"Server Key", "sha256")


def test_libpq_generated_verifier_authenticates() -> None:
    """A verifier made by libpq's PQencryptPasswordConn (no server involved) works as a userlist secret."""
    pq = pytest.importorskip("psycopg.pq")
    conn = pq.PGconn.connect_start(b"host=/nonexistent-parafort-dir port=1")
    try:
        verifier = conn.encrypt_password(b"libpq pw", b"app", b"scram-sha-256").decode()
        md5_stored = conn.encrypt_password(b"libpq pw", b"app", b"md5").decode()
    finally:
        conn.finish()
    assert PG_VERIFIER.match(verifier), verifier
    assert authenticate("scram-sha-256", "app", verifier, "libpq pw")[-1] == AuthCode.OK
    assert md5_stored == "md5" + hashlib.md5(b"libpq pwapp").hexdigest()
    assert authenticate("md5", "app", md5_stored, "libpq pw")[-1] == AuthCode.OK


@pytest.mark.parametrize(
    "secret",
    [
        "plain",
        "SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB",  # keys too short
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:!!$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==",
    ],
)
def test_parse_scram_verifier_rejects(secret: str) -> None:
    assert parse_scram_verifier(secret) is None
