"""Encoders and decoders for the typed messages a proxy synthesizes or inspects (sans-IO).

Message layouts follow the PostgreSQL 15 documentation, 55.7 "Message Formats".

Conventions
-----------
* **Encoders** return the whole message as ``bytes``: type byte, Int32 length, payload.
* **Decoders** take the **payload**: the bytes *after* the 5-byte header, i.e. ``buf[start + 5:end]``
  for a ``(type, start, end)`` triple from :func:`proxy.protocol.framing.scan_messages`. Any of
  ``bytes``, ``bytearray`` or ``memoryview`` is accepted (a memoryview is copied once). Offsets a decoder
  returns are relative to the payload.
* Strings are NUL-terminated UTF-8. Decoders use ``errors="surrogateescape"`` and encoders the same, so
  a name that is not valid UTF-8 survives decode + re-encode byte for byte. Encoders reject strings
  containing NUL with ValueError (a programming error, never client input).
* A truncated payload, a missing NUL, trailing garbage or an invalid field raises
  ``ProxyError(PROTOCOL_VIOLATION)`` with severity ERROR -- and nothing else, whatever the input; the
  caller decides whether the connection survives.
* Int32 fields that are really unsigned (OIDs, process ids, cancel secrets) are decoded unsigned.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final

from proxy.errors import PROTOCOL_VIOLATION, ProxyError

Payload = bytes | bytearray | memoryview


class B:
    """Backend (server -> client) message type bytes, as ints (compare with ``buf[start]``)."""

    AUTH: Final = ord("R")
    PARAMETER_STATUS: Final = ord("S")
    BACKEND_KEY_DATA: Final = ord("K")
    READY_FOR_QUERY: Final = ord("Z")
    ERROR: Final = ord("E")
    NOTICE: Final = ord("N")
    NOTIFICATION: Final = ord("A")
    PARSE_COMPLETE: Final = ord("1")
    BIND_COMPLETE: Final = ord("2")
    CLOSE_COMPLETE: Final = ord("3")
    NO_DATA: Final = ord("n")
    COMMAND_COMPLETE: Final = ord("C")
    EMPTY_QUERY: Final = ord("I")
    ROW_DESCRIPTION: Final = ord("T")
    DATA_ROW: Final = ord("D")
    PARAMETER_DESCRIPTION: Final = ord("t")
    PORTAL_SUSPENDED: Final = ord("s")
    COPY_IN: Final = ord("G")
    COPY_OUT: Final = ord("H")
    COPY_BOTH: Final = ord("W")
    COPY_DATA: Final = ord("d")
    COPY_DONE: Final = ord("c")
    FUNCTION_CALL_RESPONSE: Final = ord("V")
    NEGOTIATE: Final = ord("v")


class F:
    """Frontend (client -> server) message type bytes, as ints."""

    QUERY: Final = ord("Q")
    PARSE: Final = ord("P")
    BIND: Final = ord("B")
    DESCRIBE: Final = ord("D")
    EXECUTE: Final = ord("E")
    CLOSE: Final = ord("C")
    SYNC: Final = ord("S")
    FLUSH: Final = ord("H")
    TERMINATE: Final = ord("X")
    COPY_DATA: Final = ord("d")
    COPY_DONE: Final = ord("c")
    COPY_FAIL: Final = ord("f")
    FUNCTION_CALL: Final = ord("F")
    PASSWORD: Final = ord("p")  # also SASLInitialResponse, SASLResponse and GSSResponse


class AuthCode:
    """The Int32 code at the start of an Authentication ('R') message."""

    OK: Final = 0
    KERBEROS_V5: Final = 2
    CLEARTEXT_PASSWORD: Final = 3
    MD5_PASSWORD: Final = 5
    SCM_CREDENTIAL: Final = 6
    GSS: Final = 7
    GSS_CONTINUE: Final = 8
    SSPI: Final = 9
    SASL: Final = 10
    SASL_CONTINUE: Final = 11
    SASL_FINAL: Final = 12


_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U32_PAIR = struct.Struct("!II")

# --- helpers ------------------------------------------------------------------------------------------


def _msg(type_byte: bytes, body: bytes) -> bytes:
    return type_byte + _I32.pack(len(body) + 4) + body


def _cstr(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise ValueError("protocol strings cannot contain NUL characters")
    return data + b"\0"


def _bytes(payload: Payload) -> bytes | bytearray:
    return payload.tobytes() if isinstance(payload, memoryview) else payload


def _bad(what: str) -> ProxyError:
    return ProxyError(PROTOCOL_VIOLATION, "invalid message format", detail=what)


def _read_cstr(data: bytes | bytearray, pos: int, what: str) -> tuple[str, int]:
    """The string starting at ``pos`` and the offset just past its NUL."""
    end = data.find(0, pos)
    if end < 0:
        raise _bad(f"missing NUL terminator in {what}")
    return data[pos:end].decode("utf-8", "surrogateescape"), end + 1


def _single_cstr(payload: Payload, what: str) -> str:
    data = _bytes(payload)
    value, end = _read_cstr(data, 0, what)
    if end != len(data):
        raise _bad(f"unexpected data after {what}")
    return value


# --- backend encoders ---------------------------------------------------------------------------------

_AUTH_OK: Final = _msg(b"R", _I32.pack(AuthCode.OK))
_AUTH_CLEARTEXT: Final = _msg(b"R", _I32.pack(AuthCode.CLEARTEXT_PASSWORD))
_READY: Final = {status: _msg(b"Z", status) for status in (b"I", b"T", b"E")}


def authentication_ok() -> bytes:
    return _AUTH_OK


def authentication_cleartext() -> bytes:
    return _AUTH_CLEARTEXT


def authentication_md5(salt: bytes) -> bytes:
    if len(salt) != 4:
        raise ValueError("the MD5 salt is exactly 4 bytes")
    return _msg(b"R", _I32.pack(AuthCode.MD5_PASSWORD) + salt)


def authentication_sasl(mechanisms: Sequence[str]) -> bytes:
    body = _I32.pack(AuthCode.SASL) + b"".join(_cstr(m) for m in mechanisms) + b"\0"
    return _msg(b"R", body)


def authentication_sasl_continue(data: bytes) -> bytes:
    return _msg(b"R", _I32.pack(AuthCode.SASL_CONTINUE) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return _msg(b"R", _I32.pack(AuthCode.SASL_FINAL) + data)


def parameter_status(name: str, value: str) -> bytes:
    return _msg(b"S", _cstr(name) + _cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    """BackendKeyData; pid and secret are taken modulo 2**32 (decoded back unsigned)."""
    return _msg(b"K", _U32_PAIR.pack(pid & 0xFFFFFFFF, secret & 0xFFFFFFFF))


def ready_for_query(status: bytes) -> bytes:
    """ReadyForQuery with transaction status b"I" (idle), b"T" (in transaction) or b"E" (failed)."""
    try:
        return _READY[status]
    except KeyError:
        raise ValueError(f"invalid transaction status {status!r}") from None


def _fields(severity: str, sqlstate: str, message: str, detail: str | None, hint: str | None) -> bytes:
    parts = [b"S", _cstr(severity), b"V", _cstr(severity), b"C", _cstr(sqlstate), b"M", _cstr(message)]
    if detail is not None:
        parts += (b"D", _cstr(detail))
    if hint is not None:
        parts += (b"H", _cstr(hint))
    parts.append(b"\0")
    return b"".join(parts)


def error_response(
    severity: str, sqlstate: str, message: str, detail: str | None = None, hint: str | None = None
) -> bytes:
    """ErrorResponse with fields S, V (same as S), C, M and optionally D and H."""
    return _msg(b"E", _fields(severity, sqlstate, message, detail, hint))


def error_from(exc: ProxyError) -> bytes:
    """The ErrorResponse a ProxyError stands for."""
    return error_response(exc.severity, exc.sqlstate, exc.message, exc.detail, exc.hint)


def notice_response(
    severity: str, sqlstate: str, message: str, detail: str | None = None, hint: str | None = None
) -> bytes:
    """NoticeResponse, same fields as :func:`error_response` (severity e.g. "NOTICE" or "WARNING")."""
    return _msg(b"N", _fields(severity, sqlstate, message, detail, hint))


def _empty(mtype: bytes) -> Callable[[], bytes]:
    """The encoder of a message with no payload: it returns the one copy encoded here."""
    message = _msg(mtype, b"")
    return lambda: message


parse_complete: Final = _empty(b"1")
bind_complete: Final = _empty(b"2")
close_complete: Final = _empty(b"3")
no_data: Final = _empty(b"n")
empty_query_response: Final = _empty(b"I")


def command_complete(tag: str) -> bytes:
    return _msg(b"C", _cstr(tag))


# typlen of a few common types, for RowDescription; anything else is reported as varlena (-1).
_TYPLEN: Final = {16: 1, 18: 1, 19: 64, 20: 8, 21: 2, 23: 4, 26: 4, 700: 4, 701: 8, 1082: 4, 1114: 8, 1184: 8}


def row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    """RowDescription for text-format columns given as (name, type oid); no table, typmod -1."""
    parts = [_I16.pack(len(columns))]
    for name, type_oid in columns:
        parts.append(_cstr(name))
        # table oid, column attnum, type oid, typlen, typmod, format code (0 = text)
        parts.append(struct.pack("!IhIhih", 0, 0, type_oid, _TYPLEN.get(type_oid, -1), -1, 0))
    return _msg(b"T", b"".join(parts))


def data_row(values: Sequence[str | None]) -> bytes:
    """DataRow of text values (None is SQL NULL)."""
    parts = [_I16.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            data = value.encode("utf-8", "surrogateescape")
            parts.append(_I32.pack(len(data)))
            parts.append(data)
    return _msg(b"D", b"".join(parts))


# --- frontend encoders --------------------------------------------------------------------------------


def query(sql: str) -> bytes:
    return _msg(b"Q", _cstr(sql))


def query_bytes(sql: bytes | bytearray) -> bytes:
    """A Query of SQL text already encoded, taken from a client's message (so holding no NUL): the proxy
    re-sends a client's BEGIN without decoding and encoding it again."""
    return _msg(b"Q", bytes(sql) + b"\0")


def parse(name: str, sql: str, param_oids: Sequence[int] = ()) -> bytes:
    body = _cstr(name) + _cstr(sql) + _I16.pack(len(param_oids))
    if param_oids:
        body += struct.pack(f"!{len(param_oids)}I", *param_oids)
    return _msg(b"P", body)


def bind_raw(portal: str, statement: str, rest: bytes) -> bytes:
    """Bind with the given portal and statement names; ``rest`` is everything after them, verbatim."""
    return _msg(b"B", _cstr(portal) + _cstr(statement) + rest)


def _kind(kind: bytes) -> bytes:
    if kind not in (b"S", b"P"):
        raise ValueError(f"kind must be b'S' or b'P', not {kind!r}")
    return kind


def describe(kind: bytes, name: str) -> bytes:
    """Describe a prepared statement (kind b"S") or a portal (b"P")."""
    return _msg(b"D", _kind(kind) + _cstr(name))


def close(kind: bytes, name: str) -> bytes:
    """Close a prepared statement (kind b"S") or a portal (b"P")."""
    return _msg(b"C", _kind(kind) + _cstr(name))


sync: Final = _empty(b"S")
flush: Final = _empty(b"H")
terminate: Final = _empty(b"X")


def password_message(data: bytes) -> bytes:
    """PasswordMessage: ``data`` (cleartext password or "md5..." hash) plus the NUL this appends."""
    if b"\0" in data:
        raise ValueError("a password cannot contain NUL characters")
    return _msg(b"p", data + b"\0")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return _msg(b"p", _cstr(mechanism) + _I32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return _msg(b"p", data)


# --- decoders (payload = bytes after the 5-byte header) -----------------------------------------------


def parse_fields(payload: Payload) -> dict[str, str]:
    """ErrorResponse/NoticeResponse fields: field code character -> value (e.g. "C" -> "08P01")."""
    data = _bytes(payload)
    fields: dict[str, str] = {}
    pos = 0
    n = len(data)
    while pos < n:
        code = data[pos]
        if code == 0:
            if pos + 1 != n:
                raise _bad("unexpected data after error fields")
            return fields
        value, pos = _read_cstr(data, pos + 1, "error field")
        fields[chr(code)] = value
    raise _bad("missing terminator after error fields")


def decode_parse(payload: Payload) -> tuple[str, str, tuple[int, ...]]:
    """Parse: (statement name, query, parameter type oids)."""
    data = _bytes(payload)
    name, pos = _read_cstr(data, 0, "statement name")
    sql, pos = _read_cstr(data, pos, "query string")
    if pos + 2 > len(data):
        raise _bad("truncated Parse message")
    (count,) = _I16.unpack_from(data, pos)
    pos += 2
    if count < 0 or pos + 4 * count != len(data):
        raise _bad("parameter type count does not match the message length")
    oids: tuple[int, ...] = struct.unpack_from(f"!{count}I", data, pos) if count else ()
    return name, sql, oids


def decode_bind_names(payload: Payload) -> tuple[str, str, int]:
    """Bind: (portal, statement name, offset in the payload where the rest after the names begins)."""
    data = _bytes(payload)
    portal, pos = _read_cstr(data, 0, "portal name")
    statement, pos = _read_cstr(data, pos, "statement name")
    return portal, statement, pos


def rewrite_bind(payload: Payload, new_statement: str) -> bytes:
    """A whole new Bind message: same portal and parameters, statement name replaced."""
    data = _bytes(payload)
    portal_end = data.find(0)
    if portal_end < 0:
        raise _bad("missing NUL terminator in portal name")
    statement_end = data.find(0, portal_end + 1)
    if statement_end < 0:
        raise _bad("missing NUL terminator in statement name")
    body = b"".join((data[: portal_end + 1], _cstr(new_statement), data[statement_end + 1 :]))
    return _msg(b"B", body)


def decode_describe_close(payload: Payload) -> tuple[bytes, str]:
    """Describe or Close: (kind b"S" or b"P", name)."""
    data = _bytes(payload)
    if not data:
        raise _bad("empty Describe/Close message")
    kind = bytes(data[:1])
    if kind not in (b"S", b"P"):
        raise _bad(f"invalid Describe/Close target type {kind!r}")
    name, pos = _read_cstr(data, 1, "statement or portal name")
    if pos != len(data):
        raise _bad("unexpected data after statement or portal name")
    return kind, name


def decode_query(payload: Payload) -> str:
    """Query: the SQL text."""
    return _single_cstr(payload, "query string")


def decode_command_complete(payload: Payload) -> str:
    """CommandComplete: the command tag, e.g. "INSERT 0 1"."""
    return _single_cstr(payload, "command tag")


def decode_parameter_status(payload: Payload) -> tuple[str, str]:
    """ParameterStatus: (name, value)."""
    data = _bytes(payload)
    name, pos = _read_cstr(data, 0, "parameter name")
    value, pos = _read_cstr(data, pos, "parameter value")
    if pos != len(data):
        raise _bad("unexpected data after parameter value")
    return name, value


def decode_backend_key_data(payload: Payload) -> tuple[int, int]:
    """BackendKeyData: (process id, secret key), both unsigned."""
    if len(payload) != 8:
        raise _bad(f"BackendKeyData payload of {len(payload)} bytes (expected 8)")
    pid, secret = _U32_PAIR.unpack_from(payload, 0)
    return pid, secret


def decode_ready_for_query(payload: Payload) -> bytes:
    """ReadyForQuery: the transaction status, b"I", b"T" or b"E"."""
    status = bytes(payload)
    if status not in _READY:
        raise _bad(f"invalid transaction status {status!r}")
    return status


def decode_auth(payload: Payload) -> tuple[int, bytes]:
    """Authentication*: (auth code, the bytes after the code)."""
    if len(payload) < 4:
        raise _bad("truncated Authentication message")
    (code,) = _I32.unpack_from(payload, 0)
    return code, bytes(payload[4:])


def decode_sasl_mechanisms(data: Payload) -> list[str]:
    """The mechanism list of AuthenticationSASL (the bytes after the code, as from decode_auth)."""
    buf = _bytes(data)
    names: list[str] = []
    pos = 0
    while True:
        name, pos = _read_cstr(buf, pos, "SASL mechanism list")
        if not name:
            break
        names.append(name)
    if pos != len(buf):
        raise _bad("unexpected data after SASL mechanism list")
    return names


def decode_password(payload: Payload) -> bytes:
    """PasswordMessage (cleartext or md5): the password bytes without the NUL."""
    data = _bytes(payload)
    end = data.find(0)
    if end < 0 or end != len(data) - 1:
        raise _bad("password message is not a single NUL-terminated string")
    return bytes(data[:end])


def decode_sasl_initial_response(payload: Payload) -> tuple[str, bytes | None]:
    """SASLInitialResponse: (mechanism, initial client response or None when absent, length -1)."""
    data = _bytes(payload)
    mechanism, pos = _read_cstr(data, 0, "SASL mechanism name")
    if pos + 4 > len(data):
        raise _bad("truncated SASLInitialResponse")
    (length,) = _I32.unpack_from(data, pos)
    pos += 4
    if length == -1 and pos == len(data):
        return mechanism, None
    if length < 0 or pos + length != len(data):
        raise _bad("SASLInitialResponse length does not match the message length")
    return mechanism, bytes(data[pos:])
