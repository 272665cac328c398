"""Message framing for the PostgreSQL v3 wire protocol (sans-IO).

Two framings exist on the wire (PostgreSQL 15 docs, 55.7 "Message Formats"):

* the startup phase: untyped packets ``Int32 length (incl. itself) | Int32 code | body`` --
  StartupMessage, SSLRequest, GSSENCRequest and CancelRequest;
* everything after it: typed messages ``Byte1 type | Int32 length (incl. itself) | payload``.

The data path forwards raw bytes and only needs message boundaries, so :func:`scan_messages` walks
headers in place (compiled: proxy/protocol/scan.pyx; no payload copies).
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass, field
from typing import Final

from proxy.errors import PROTOCOL_VIOLATION, ProxyError
from proxy.protocol.scan import scan_messages

__all__ = [
    "CANCEL_REQUEST_CODE",
    "COLLECT_FROM",
    "GSSENC_REQUEST_CODE",
    "MAX_STARTUP_LENGTH",
    "PROTOCOL_V3",
    "SSL_REQUEST_CODE",
    "CancelRequest",
    "Collector",
    "GSSENCRequest",
    "SSLRequest",
    "StartupMessage",
    "StartupPacket",
    "cancel_request",
    "collector",
    "gssenc_request",
    "new_cancel_key",
    "read_startup",
    "scan_messages",
    "ssl_request",
    "startup_message",
]

#: Largest startup-phase packet accepted (PostgreSQL's own limit, MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_LENGTH: Final = 10_000

PROTOCOL_V3: Final = 3 << 16  # 196608: protocol 3.0
CANCEL_REQUEST_CODE: Final = 80877102  # 1234 << 16 | 5678
SSL_REQUEST_CODE: Final = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST_CODE: Final = 80877104  # 1234 << 16 | 5680

_I32 = struct.Struct("!i")
_unpack_i32 = _I32.unpack_from
_U32_PAIR = struct.Struct("!II")


def _violation(message: str, detail: str | None = None) -> ProxyError:
    return ProxyError(PROTOCOL_VIOLATION, message, detail=detail, severity="FATAL")


#: A message still missing more than this many bytes is collected chunk by chunk and joined once (linear),
#: not concatenated onto the buffer at every read (quadratic).
COLLECT_FROM: Final = 64 * 1024
_U32 = struct.Struct("!I")


class Collector:
    """One large typed message arriving in chunks (with the buffered bytes before it): kept as a list of
    chunks and joined once, when all of it is there."""

    __slots__ = ("_have", "_need", "_parts")

    def __init__(self, head: bytes, need: int) -> None:
        self._parts = [head]
        self._have = len(head)
        self._need = need

    def add(self, data: bytes) -> bytes | None:
        """Add a chunk read from the socket; returns all the bytes so far once the message is complete
        (they may run past its end), else None."""
        self._parts.append(data)
        self._have += len(data)
        if self._have < self._need:
            return None
        return b"".join(self._parts)


def collector(rest: bytes, at: int) -> Collector | None:
    """A Collector for the buffered ``rest`` when the message whose header (complete, its length already
    checked) starts at ``rest[at]`` is still missing more than COLLECT_FROM bytes; else None (keep the
    buffer as it is)."""
    need = at + 1 + _U32.unpack_from(rest, at + 1)[0]
    if need - len(rest) <= COLLECT_FROM:
        return None
    return Collector(rest, need)


# --- startup-phase packets ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks to upgrade the connection to TLS (answer with one byte, b"S" or b"N")."""


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption (answer with one byte, b"G" or b"N")."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """A query-cancel request on a fresh connection; pid and secret are as sent in BackendKeyData."""

    pid: int
    secret: int


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """A StartupMessage; any code that is not a special request is reported as one.

    ``params`` is only parsed for protocol major version 3; for other versions (e.g. a 2.0 client, whose
    body has a different layout) it is empty and the caller is expected to reject the connection with
    FEATURE_NOT_SUPPORTED unless :attr:`is_v3`.
    """

    major: int
    minor: int
    params: dict[str, str] = field(default_factory=dict)

    @property
    def is_v3(self) -> bool:
        """Protocol 3.0 exactly, the only version the proxy speaks."""
        return self.major == 3 and self.minor == 0


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def read_startup(buf: bytearray | bytes) -> tuple[StartupPacket | None, int]:
    """Parse one startup-phase packet from the start of ``buf``.

    Returns ``(packet, consumed_bytes)``, or ``(None, 0)`` while the packet is incomplete. Raises
    ProxyError 08P01 FATAL for a bad length (checked as soon as the length field has arrived) or a
    malformed body.
    """
    n = len(buf)
    if n < 4:
        return None, 0
    (length,) = _unpack_i32(buf, 0)
    if length < 8 or length > MAX_STARTUP_LENGTH:
        raise _violation(
            "invalid length of startup packet",
            f"declared length {length} (allowed 8..{MAX_STARTUP_LENGTH})",
        )
    if n < length:
        return None, 0
    (code,) = _unpack_i32(buf, 4)
    packet: StartupPacket
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if length != 8:
            raise _violation("invalid length of startup packet", f"encryption request of length {length}")
        packet = SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
    elif code == CANCEL_REQUEST_CODE:
        if length != 16:
            raise _violation("invalid length of startup packet", f"cancel request of length {length}")
        pid, secret = _U32_PAIR.unpack_from(buf, 8)
        packet = CancelRequest(pid, secret)
    else:
        major = (code >> 16) & 0xFFFF
        minor = code & 0xFFFF
        params = _startup_params(bytes(buf[8:length])) if major == 3 else {}
        packet = StartupMessage(major, minor, params)
    return packet, length


def _startup_params(body: bytes) -> dict[str, str]:
    # body = (name NUL value NUL)* NUL
    if not body or body[-1] != 0:
        raise _violation("invalid startup packet layout: expected terminator as last byte")
    content = body[:-1]
    if not content:
        return {}
    if content[-1] != 0:
        raise _violation("invalid startup packet layout: expected terminator as last byte")
    items = content[:-1].split(b"\0")
    if len(items) % 2:
        raise _violation("invalid startup packet layout: parameter name without a value")
    params: dict[str, str] = {}
    for i in range(0, len(items), 2):
        name = items[i]
        if not name:
            raise _violation("invalid startup packet layout: empty parameter name")
        params[name.decode("utf-8", "replace")] = items[i + 1].decode("utf-8", "replace")
    return params


# --- startup-phase encoders ---------------------------------------------------------------------------


def _cstr(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise ValueError("protocol strings cannot contain NUL characters")
    return data + b"\0"


def startup_message(params: dict[str, str]) -> bytes:
    """A protocol 3.0 StartupMessage carrying ``params`` (user, database, options, GUCs...)."""
    body = b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return struct.pack("!ii", len(body) + 8, PROTOCOL_V3) + body


def cancel_request(pid: int, secret: int) -> bytes:
    """A CancelRequest packet (pid and secret are taken modulo 2**32, as on the wire)."""
    return struct.pack("!iiII", 16, CANCEL_REQUEST_CODE, pid & 0xFFFFFFFF, secret & 0xFFFFFFFF)


def new_cancel_key() -> tuple[int, int]:
    """A fresh random (process id, secret key) pair for a client's BackendKeyData. The process id is a
    positive int32, never 0, as a real backend's is."""
    return secrets.randbits(31) or 1, secrets.randbits(32)


_SSL_REQUEST: Final = struct.pack("!ii", 8, SSL_REQUEST_CODE)
_GSSENC_REQUEST: Final = struct.pack("!ii", 8, GSSENC_REQUEST_CODE)


def ssl_request() -> bytes:
    """An SSLRequest packet."""
    return _SSL_REQUEST


def gssenc_request() -> bytes:
    """A GSSENCRequest packet."""
    return _GSSENC_REQUEST
