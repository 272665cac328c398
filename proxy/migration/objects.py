"""The replication objects of a migration on one server: side connections, publications, subscriptions,
slots — each created or removed only after looking at what exists, so every step can run again.

Errors become ``ReplicationError`` in one place (``step``), with every password of the DSNs involved
masked: a subscription's CONNECTION string carries the publisher's password (PostgreSQL stores it), and no
message or log line here ever contains it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from proxy.config.dsn import Dsn
from proxy.config.values import PUBLIC, TableRef
from proxy.health import close, connect, describe_error
from proxy.migration import definitions
from proxy.migration.naming import (
    create_publication,
    create_subscription,
    quote_ident,
    redact,
    set_publication_tables,
)

log = logging.getLogger("parafort.migration")

CONNECT_TIMEOUT = 10.0
STATEMENT_TIMEOUT = 120.0  # CREATE SUBSCRIPTION waits for the publisher's running transactions
POLL_INTERVAL = 0.1
SLOT_RELEASE_TIMEOUT = 15.0  # a stopped subscription's walsender lets go of its slot within this

ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

SUBSCRIPTION_QUERY = """
SELECT s.oid, s.subenabled FROM pg_subscription s
WHERE s.subname = $1 AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
PUBLICATION_QUERY = "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)"
PUBLICATION_TABLES_QUERY = """
SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2
"""
SLOT_QUERY = "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1"
SYNC_SLOTS_QUERY = "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE $1 ORDER BY 1"


class ReplicationError(Exception):
    """A migration step that cannot proceed; the message says why and what to do (never a password)."""


@contextlib.asynccontextmanager
async def connected(dsn: Dsn, side: str) -> AsyncIterator[Any]:
    """A side connection to ``side`` (main or the target), closed on exit."""
    try:
        conn = await connect(dsn, CONNECT_TIMEOUT, "migration")
    except ERRORS as exc:
        raise ReplicationError(
            f"cannot connect to {side}: {describe_error(exc, dsn, CONNECT_TIMEOUT)}"
        ) from None
    try:
        yield conn
    finally:
        await close(conn)


@contextlib.asynccontextmanager
async def step(what: str, *dsns: Dsn) -> AsyncIterator[None]:
    """Turn a failure while doing ``what`` into a ReplicationError that carries no password of ``dsns``."""
    try:
        yield
    except ReplicationError:
        raise
    except definitions.DefinitionError as exc:
        raise ReplicationError(redact(f"{what}: {exc}", *dsns)) from None
    except ERRORS as exc:
        if isinstance(exc, asyncpg.PostgresError):
            text = f"{exc.sqlstate}: {exc}"
        else:
            text = f"{type(exc).__name__}: {exc}"
        raise ReplicationError(redact(f"{what} failed: {' '.join(text.split())}", *dsns)) from None


def fail(problems: list[str]) -> None:
    """Raise one ReplicationError naming every problem found before anything was created."""
    if problems:
        raise ReplicationError("; ".join(problems) + " (nothing was created)")


def qualified(ref: TableRef) -> str:
    return f"{quote_ident(ref.schema or PUBLIC)}.{quote_ident(ref.table)}"


def table_set(tables: list[TableRef]) -> list[TableRef]:
    return sorted({t.qualified for t in tables})


async def subscription(conn: Any, name: str) -> tuple[int, bool] | None:
    """(oid, enabled) of subscription ``name`` in this database, or None."""
    row = await conn.fetchrow(SUBSCRIPTION_QUERY, name)
    return (int(row[0]), bool(row[1])) if row else None


async def publication_tables(conn: Any, name: str) -> list[TableRef] | None:
    """The tables of publication ``name``, or None when there is no such publication."""
    if not await conn.fetchval(PUBLICATION_QUERY, name):
        return None
    return [TableRef(r[0], r[1]) for r in await conn.fetch(PUBLICATION_TABLES_QUERY, name)]


async def ensure_publication(conn: Any, name: str, refs: list[TableRef], side: str) -> bool:
    """Create publication ``name`` for exactly ``refs``, or set its tables to them; True if it changed."""
    current = await publication_tables(conn, name)
    if current is None:
        await conn.execute(create_publication(name, refs))
        log.info("migration: created publication %s on %s", name, side)
        return True
    if table_set(current) != table_set(refs):
        await conn.execute(set_publication_tables(name, refs))
        log.info("migration: publication %s on %s now lists %d table(s)", name, side, len(refs))
        return True
    return False


async def drop_publication(conn: Any, name: str, side: str) -> list[str]:
    if await publication_tables(conn, name) is None:
        return []
    await conn.execute(f"DROP PUBLICATION {quote_ident(name)}")
    return [f"publication {name} on {side}"]


async def quiet_statement_log(conn: Any) -> None:
    """Keep this session's statements (CREATE SUBSCRIPTION carries a password) out of the server log where
    the user may say so (a superuser may; for others the server's settings stay)."""
    for setting in (
        "log_statement = 'none'",
        "log_min_error_statement = panic",
        "log_min_duration_statement = -1",
    ):
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"SET {setting}")


async def ensure_subscription(
    sub_conn: Any, pub_conn: Any, name: str, publisher: Dsn, existing: tuple[int, bool] | None, *,
    copy_data: bool, refresh: bool = False,
) -> None:  # fmt: skip
    """Create subscription ``name`` to publication ``name`` (its slot on the publisher is ``name`` too), or
    enable it and, with ``refresh``, pick up the publication's new tables."""
    quoted = quote_ident(name)
    if existing is None:
        await drop_slot(pub_conn, name)  # left by an interrupted CREATE SUBSCRIPTION: no subscription uses it
        await quiet_statement_log(sub_conn)
        statement = create_subscription(name, publisher, name, copy_data=copy_data)
        await sub_conn.execute(statement, timeout=STATEMENT_TIMEOUT)
        log.info("migration: created subscription %s (copy_data=%s)", name, copy_data)
        return
    if not existing[1]:
        await sub_conn.execute(f"ALTER SUBSCRIPTION {quoted} ENABLE")
        log.info("migration: enabled subscription %s", name)
    if refresh:
        copy = "true" if copy_data else "false"
        await sub_conn.execute(
            f"ALTER SUBSCRIPTION {quoted} REFRESH PUBLICATION WITH (copy_data = {copy})",
            timeout=STATEMENT_TIMEOUT,
        )


async def drop_slot(conn: Any, slot: str) -> bool:
    """Drop replication slot ``slot`` if it exists, waiting (bounded) for a stopping walsender to let go;
    True if one was dropped."""
    deadline = time.monotonic() + SLOT_RELEASE_TIMEOUT
    while True:
        row = await conn.fetchrow(SLOT_QUERY, slot)
        if row is None:
            return False
        if not row[0]:
            await conn.execute("SELECT pg_drop_replication_slot($1)", slot)
            log.info("migration: dropped replication slot %s", slot)
            return True
        if time.monotonic() > deadline:
            raise ReplicationError(f"replication slot {slot} is in use by another connection; not dropped")
        await asyncio.sleep(POLL_INTERVAL)


async def drop_subscription(sub_conn: Any, name: str, pub_conn: Any) -> list[str]:
    """Drop subscription ``name`` with its slot on the publisher, and any slot of it left behind (its own,
    or a table copy's); returns what was removed."""
    sub = await subscription(sub_conn, name)
    removed = []
    sync_slots = f"pg\\_{sub[0]}\\_sync\\_%" if sub else None
    if sub is not None:
        await sub_conn.execute(f"DROP SUBSCRIPTION {quote_ident(name)}", timeout=STATEMENT_TIMEOUT)
        removed.append(f"subscription {name}")
    # Table-copy slots (pg_<subscription oid>_sync_<table oid>_<system id>) go with the subscription; one
    # left by a crash would hold WAL on the publisher forever.
    leftovers = [name] + (
        [r[0] for r in await pub_conn.fetch(SYNC_SLOTS_QUERY, sync_slots)] if sync_slots else []
    )
    for slot in leftovers:
        if await drop_slot(pub_conn, slot):
            removed.append(f"slot {slot}")
    return removed
