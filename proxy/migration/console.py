"""A minimal client of the proxy's admin console for ``parafort-proxy migrate``: log in (the proxy's own
sans-IO client authentication), send one simple Query, collect the columns and rows or the error.

The console speaks only the simple query protocol, which general drivers do not use for result rows; this
is a few dozen lines over proxy/protocol, not a second driver.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path

from proxy.errors import ProxyError
from proxy.frontend.ryw import decode_row
from proxy.protocol import messages as m
from proxy.protocol.auth import ClientAuth
from proxy.protocol.framing import ssl_request, startup_message

MAX_MESSAGE = 64 * 1024 * 1024
TIMEOUT = 60.0  # seconds for one console command


class ConsoleError(Exception):
    """The console could not be reached, refused the login, or answered the command with an error."""


@dataclass(frozen=True)
class Result:
    columns: list[str]
    rows: list[list[str | None]]
    tag: str


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    database: str
    user: str
    password: str | None
    tls_cert: Path | None = None  # the proxy's certificate when it requires TLS (trusted as is)


def _row_description(payload: bytes) -> list[str]:
    count = int.from_bytes(payload[:2], "big")
    names, pos = [], 2
    for _ in range(count):
        end = payload.index(0, pos)
        names.append(payload[pos:end].decode())
        pos = end + 1 + 18  # table oid, attnum, type oid, typlen, typmod, format
    return names


def _error_text(payload: bytes) -> str:
    fields = m.parse_fields(payload)
    return f"{fields.get('M', 'error')} (SQLSTATE {fields.get('C', '?')})"


async def _read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = await reader.readexactly(5)
    length = int.from_bytes(header[1:5], "big")
    if not 4 <= length <= MAX_MESSAGE:
        raise ConsoleError(f"bad message length {length} from the proxy")
    return header[0], await reader.readexactly(length - 4)


async def query(target: Target, sql: str, seconds: float = TIMEOUT) -> Result:
    """Run one console command; ConsoleError with one line on any failure."""
    where = f"the admin console at {target.host}:{target.port}"
    try:
        async with asyncio.timeout(seconds):
            reader, writer = await asyncio.open_connection(target.host, target.port)
            try:
                if target.tls_cert is not None:
                    writer.write(ssl_request())
                    await writer.drain()
                    if await reader.readexactly(1) != b"S":
                        raise ConsoleError(f"{where} refused TLS")
                    context = ssl.create_default_context(cafile=str(target.tls_cert))
                    context.check_hostname = False
                    await writer.start_tls(context)
                await _login(reader, writer, target)
                writer.write(m.query(sql))
                await writer.drain()
                return await _collect(reader)
            finally:
                writer.write(m.terminate())
                writer.close()
    except TimeoutError:
        raise ConsoleError(f"{where} did not answer within {seconds:g}s") from None
    except (OSError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ConsoleError(f"cannot reach {where} (is the proxy running?): {reason}") from None
    except ProxyError as exc:
        raise ConsoleError(f"{where}: {exc.message}") from None


async def _login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target) -> None:
    writer.write(startup_message({"user": target.user, "database": target.database}))
    await writer.drain()
    auth = ClientAuth(target.user, target.password)
    while True:
        kind, payload = await _read(reader)
        if kind == m.B.AUTH:
            answer = auth.feed(*m.decode_auth(payload))
            if answer is not None:
                writer.write(answer)
                await writer.drain()
        elif kind == m.B.ERROR:
            why = _error_text(payload)
            raise ConsoleError(f"login to the admin console as {target.user!r} failed: {why}")
        elif kind == m.B.READY_FOR_QUERY:
            return


async def _collect(reader: asyncio.StreamReader) -> Result:
    columns: list[str] = []
    rows: list[list[str | None]] = []
    tag, error = "", None
    while True:
        kind, payload = await _read(reader)
        if kind == m.B.ROW_DESCRIPTION:
            columns = _row_description(payload)
        elif kind == m.B.DATA_ROW:
            rows.append(decode_row(payload))
        elif kind == m.B.COMMAND_COMPLETE:
            tag = m.decode_command_complete(payload)
        elif kind == m.B.ERROR:
            error = m.parse_fields(payload).get("M", "error")
        elif kind == m.B.READY_FOR_QUERY:
            if error is not None:
                raise ConsoleError(error)
            return Result(columns, rows, tag)
