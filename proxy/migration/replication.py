"""Logical replication for moving a role's tables: start, progress, catch-up, sequences, reverse, finish.

Each function opens short asyncpg side connections (``proxy.health.connect``), does its work and closes
them. Every step looks at what exists first, so running one again after a crash or a restart continues
where it stopped: tables already there are reused (when empty or already subscribed), a publication or a
subscription is created only when missing, and a slot left behind by an interrupted CREATE SUBSCRIPTION is
dropped before the next attempt. Rows are never copied twice: PostgreSQL's subscription tracks each table's
copy itself.

The caller (the migration's state machine) holds writes to the moving tables around ``reverse`` and
``unreverse``: replication changes direction only while neither side writes them.

- cutover, inside the hold: ``lsn = current_lsn(main)``; ``wait_caught_up(main, target, role, lsn, t)``
  (False: resume, nothing changed); ``sync_sequences(main, target, ...)``; ``reverse(...)``; route the
  tables to the target; resume.
- rollback, inside the hold: ``lsn = current_lsn(target, "target")``;
  ``wait_caught_up(..., reverse=True)``; ``sync_sequences(target, main, ...)`` (swapped: main's past the
  target's); ``unreverse(...)``; route the tables to main; resume.
- ``finish`` removes the replication objects and never drops a table or a row.

Errors are ``ReplicationError`` with a message safe to show: a subscription's CONNECTION string carries the
publisher's password (PostgreSQL stores it), and no message or log line here ever contains it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.config.dsn import Dsn
from proxy.config.values import PUBLIC, TableRef, table_label
from proxy.health import parse_lsn
from proxy.migration import definitions, preflight
from proxy.migration.naming import names, parse_tables, quote_ident
from proxy.migration.objects import (
    ERRORS,
    POLL_INTERVAL,
    SLOT_QUERY,
    STATEMENT_TIMEOUT,
    ReplicationError,
    connected,
    drop_publication,
    drop_subscription,
    ensure_publication,
    ensure_subscription,
    fail,
    publication_tables,
    qualified,
    step,
    subscription,
    table_set,
)

__all__ = [
    "FinishReport", "Progress", "ReplicationError", "StartReport", "current_lsn", "finish", "progress",
    "reverse", "start", "sync_sequences", "unreverse", "wait_caught_up",
]  # fmt: skip

log = logging.getLogger("parafort.migration")

# A record that is decoded, and so confirmed, like any commit; its end position is returned.
POSITION_QUERY = "SELECT pg_logical_emit_message(true, 'parafort-migration', 'position')::text"
READY = "r"  # pg_subscription_rel.srsubstate of a table whose initial copy is done and that streams


@dataclass(frozen=True)
class StartReport:
    """What ``start`` did: tables created on the target from main's definitions, tables that were there
    already (empty, or subscribed by an earlier run), and foreign keys left out because they point at
    tables that stay on main."""

    created_tables: tuple[str, ...]
    existing_tables: tuple[str, ...]
    skipped_foreign_keys: tuple[definitions.ForeignKey, ...]


@dataclass(frozen=True)
class Progress:
    """Where a role's replication stands. ``direction``: forward (main -> target), reverse (target ->
    main, after cutover) or none. LSNs are ints (``pg_wal_lsn_diff`` arithmetic); None where unknown."""

    direction: str
    enabled: bool = False
    tables_total: int = 0
    tables_copying: int = 0  # initial copy not finished
    tables_ready: int = 0
    streaming: bool = False  # the apply worker runs and holds its slot on the publisher
    publisher_lsn: int | None = None  # the publisher's current WAL position
    confirmed_lsn: int | None = None  # what the subscription has confirmed (its slot's confirmed_flush_lsn)
    replay_lsn: int | None = None  # the subscriber's applied position as it last reported it
    lag_bytes: int | None = None  # publisher_lsn - confirmed_lsn

    @property
    def done(self) -> bool:
        """The initial copy of every table is done and changes stream."""
        return self.tables_total > 0 and self.tables_ready == self.tables_total and self.streaming


@dataclass(frozen=True)
class FinishReport:
    """What ``finish`` removed, and which copies the operator may now drop (the proxy never does)."""

    removed: tuple[str, ...]
    cut_over: bool | None  # True: reverse replication ran (the target serves); False: forward; None: neither
    may_drop: tuple[str, ...]  # e.g. "main: public.user_activity"


# -- start ------------------------------------------------------------------------------------------------
async def start(
    main: Dsn, target: Dsn, role: str, tables: Sequence[str | TableRef], *, owner: str | None = None
) -> StartReport:
    """Begin copying ``tables`` from main to the target: create missing tables on the target from main's
    definitions (as ``owner`` when given), a publication on main for exactly these tables, and a
    subscription on the target that copies the existing rows and then streams changes.

    Checks first and creates nothing unless all hold: main has wal_level=logical, free replication slots
    and WAL senders, a user that may replicate and publish; the target's user may create a subscription;
    each table exists on main with a replica identity; each table already on the target is empty or
    already subscribed. Safe to run again (see the module docstring). Raises ReplicationError.
    """
    refs = parse_tables(tables)
    n = names(role)
    async with connected(main, "main") as mconn, connected(target, "target") as tconn:
        async with step("checking main and the target", main, target):
            existing_sub = await subscription(tconn, n.forward)
            if await subscription(mconn, n.reverse) is not None:
                raise ReplicationError(f"{role} is cut over (reverse replication runs); start does not apply")
            mfacts = await preflight.server_facts(mconn)
            tfacts = await preflight.server_facts(tconn)
            slots = 0 if existing_sub else 1 + min(len(refs), await _sync_workers(tconn))
            problems = preflight.publisher_problems(mfacts, "main", slots_needed=slots)
            if existing_sub is None:
                problems += preflight.subscriber_problems(tfacts, "target")
            problems += preflight.table_problems(
                await preflight.table_facts(mconn, refs), "main", mfacts.superuser
            )
            fail(problems)
            missing, present = await _target_tables(tconn, refs, existing_sub)
        skipped: tuple[definitions.ForeignKey, ...] = ()
        if missing:
            async with step("creating the tables on the target", main, target):
                skipped = await _create_tables(main, tconn, missing, refs, owner)
        async with step("creating the publication on main", main, target):
            changed = await ensure_publication(mconn, n.forward, refs, "main")
        async with step("creating the subscription on the target", main, target):
            await ensure_subscription(
                tconn, mconn, n.forward, main, existing_sub, copy_data=True, refresh=changed
            )
    return StartReport(
        tuple(table_label(t.schema, t.table) for t in missing),
        tuple(table_label(t.schema, t.table) for t in present),
        skipped,
    )


async def _sync_workers(conn: Any) -> int:
    return int(await conn.fetchval("SELECT current_setting('max_sync_workers_per_subscription')::int"))


async def _target_tables(
    tconn: Any, refs: list[TableRef], sub: tuple[int, bool] | None
) -> tuple[list[TableRef], list[TableRef]]:
    """(missing, present) tables on the target; ReplicationError if one holds rows and is not subscribed."""
    subscribed: set[TableRef] = set()
    if sub is not None:
        rows = await tconn.fetch(
            "SELECT n.nspname::text, c.relname::text FROM pg_subscription_rel r"
            " JOIN pg_class c ON c.oid = r.srrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE r.srsubid = $1",
            sub[0],
        )
        subscribed = {TableRef(r[0], r[1]) for r in rows}
    missing, present, problems = [], [], []
    for facts in await preflight.table_facts(tconn, refs):
        if not facts.exists:
            missing.append(facts.table)
            continue
        present.append(facts.table)
        if facts.table not in subscribed:
            from_table = f"SELECT EXISTS (SELECT 1 FROM {qualified(facts.table)})"
            if await tconn.fetchval(from_table):
                problems.append(
                    f"table {facts.label} on the target already holds rows and is not subscribed (if they "
                    "are the copy of an abandoned start, empty it on the target: TRUNCATE; the proxy "
                    "never does)"
                )
    fail(problems)
    return missing, present


async def _create_tables(
    main: Dsn, tconn: Any, missing: list[TableRef], moving: list[TableRef], owner: str | None
) -> tuple[definitions.ForeignKey, ...]:
    """Main's definitions of ``missing`` on the target, in one transaction (all or none)."""
    defs = definitions.filter_dump(await definitions.dump(main, missing), moving)
    for fk in defs.skipped_foreign_keys:
        log.warning("migration: foreign key %s not created on the target (it would cross databases)", fk)
    async with tconn.transaction():
        for schema in sorted({t.schema or PUBLIC for t in missing} - {PUBLIC}):
            await tconn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
        if owner is not None:
            await tconn.execute(f"SET LOCAL ROLE {quote_ident(owner)}")
        for statement in defs.statements:
            await tconn.execute(statement, timeout=STATEMENT_TIMEOUT)
        # pg_dump's session settings (search_path '') must not outlive the transaction.
        await tconn.execute("RESET ALL")
    log.info("migration: created %d table(s) on the target", len(missing))
    return defs.skipped_foreign_keys


# -- progress and catch-up ---------------------------------------------------------------------------------
async def progress(main: Dsn, target: Dsn, role: str) -> Progress:
    """Where ``role``'s replication stands (forward before cutover, reverse after); ReplicationError if
    a side cannot answer."""
    n = names(role)
    async with (
        connected(main, "main") as mconn,
        connected(target, "target") as tconn,
        step("reading replication progress", main, target),
    ):
        found = await _progress(mconn, tconn, n.forward, "forward")
        if found.direction == "none":
            found = await _progress(tconn, mconn, n.reverse, "reverse")
    return found


async def _progress(pub_conn: Any, sub_conn: Any, name: str, direction: str) -> Progress:
    sub = await subscription(sub_conn, name)
    if sub is None:
        return Progress("none")
    states = dict(
        await sub_conn.fetch(
            "SELECT srsubstate::text, count(*)::int FROM pg_subscription_rel WHERE srsubid = $1 GROUP BY 1",
            sub[0],
        )
    )
    worker = await sub_conn.fetchrow(
        "SELECT pid IS NOT NULL, latest_end_lsn::text FROM pg_stat_subscription"
        " WHERE subid = $1 AND relid IS NULL",
        sub[0],
    )
    current = parse_lsn(await pub_conn.fetchval("SELECT pg_current_wal_lsn()::text"))
    slot = await pub_conn.fetchrow(SLOT_QUERY, name)
    confirmed = parse_lsn(slot[1]) if slot else None
    total = sum(states.values())
    return Progress(
        direction=direction,
        enabled=sub[1],
        tables_total=total,
        tables_copying=total - states.get(READY, 0),
        tables_ready=states.get(READY, 0),
        streaming=bool(worker and worker[0] and slot and slot[0]),
        publisher_lsn=current,
        confirmed_lsn=confirmed,
        replay_lsn=parse_lsn(worker[1]) if worker else None,
        lag_bytes=max(0, current - confirmed) if current is not None and confirmed is not None else None,
    )


async def current_lsn(dsn: Dsn, side: str = "main") -> int:
    """A WAL position of ``side`` past every transaction committed there so far: what a hold waits for the
    subscription to confirm. Raises ReplicationError.

    Not ``pg_current_wal_lsn()``: with ``synchronous_commit = off`` a commit can still sit in WAL buffers
    behind the written position, so a wait for that position could end before the commit is replicated.
    Instead this writes a small logical message in a transaction committed synchronously: every commit
    before it is then flushed, and the message's position is past each of them.
    """
    async with connected(dsn, side) as conn, step(f"reading {side}'s WAL position", dsn), conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = on")
        lsn = parse_lsn(await conn.fetchval(POSITION_QUERY))
    assert lsn is not None
    return lsn


async def wait_caught_up(
    main: Dsn,
    target: Dsn,
    role: str,
    lsn: int | str,
    timeout: float,  # noqa: ASYNC109 (a deadline, polled)
    *,
    reverse: bool = False,
) -> bool:
    """Poll until the subscription has confirmed WAL up to ``lsn`` of its publisher (``current_lsn`` of main
    at the start of a cutover hold; with ``reverse``, of the target, for a rollback): True, or False after
    ``timeout`` seconds. Raises ReplicationError if the publisher cannot be asked."""
    want = parse_lsn(lsn) if isinstance(lsn, str) else lsn
    n = names(role)
    publisher, side, slot = (target, "target", n.reverse) if reverse else (main, "main", n.forward)
    deadline = time.monotonic() + timeout
    async with connected(publisher, side) as conn, step("waiting for the subscription", main, target):
        while True:
            row = await conn.fetchrow(SLOT_QUERY, slot, timeout=max(1.0, timeout))
            confirmed = parse_lsn(row[1]) if row else None
            if confirmed is not None and want is not None and confirmed >= want:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(POLL_INTERVAL, remaining))


# -- sequences ---------------------------------------------------------------------------------------------
# Each sequence a column of the tables owns (serial or identity), with its last value on this server.
OWNED_SEQUENCES_QUERY = """
SELECT tn.nspname::text, tc.relname::text, a.attname::text, s.last_value, s.increment_by
FROM unnest($1::text[], $2::text[]) AS t(schema, name)
JOIN pg_namespace tn ON tn.nspname = t.schema
JOIN pg_class tc ON tc.relnamespace = tn.oid AND tc.relname = t.name
JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = tc.oid
    AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
JOIN pg_class sc ON sc.oid = d.objid AND sc.relkind = 'S'
JOIN pg_namespace sn ON sn.oid = sc.relnamespace
JOIN pg_attribute a ON a.attrelid = tc.oid AND a.attnum = d.refobjsubid
JOIN pg_sequences s ON s.schemaname = sn.nspname AND s.sequencename = sc.relname
ORDER BY 1, 2, 3
"""


def sequence_target(source_last: int | None, dest_last: int | None, increment: int) -> int | None:
    """The value to give the destination's sequence so that its next value is past the source's, or None
    when nothing needs to change (the source never used it, or the destination is already past)."""
    if source_last is None:
        return None
    if dest_last is not None and (dest_last >= source_last if increment > 0 else dest_last <= source_last):
        return None
    return source_last


async def sync_sequences(
    main: Dsn, target: Dsn, role: str, tables: Sequence[str | TableRef]
) -> dict[str, int]:
    """Set the target's sequences owned by ``tables``' columns past main's values (for a cutover, while
    writes are held); never moves a sequence back. Called with main and target swapped, it sets main's
    past the target's (for a rollback). Returns {target sequence: its last value now} for each sequence
    main has used. Raises ReplicationError, naming any column whose sequence the target lacks."""
    refs = parse_tables(tables)
    names(role)  # the role must be valid, as everywhere
    result: dict[str, int] = {}
    async with (
        connected(main, "main") as mconn,
        connected(target, "target") as tconn,
        step("synchronising sequences", main, target),
    ):
        for seq, last, increment in await _sequence_plan(mconn, tconn, refs):
            # seq as pg_get_serial_sequence spells it: schema-qualified, quoted where needed.
            row = await tconn.fetchrow(f"SELECT last_value, is_called FROM {seq}")
            value = sequence_target(last, int(row[0]) if row[1] else None, increment)
            if value is not None:
                await tconn.execute("SELECT setval($1::regclass, $2, true)", seq, value)
                result[seq] = value
            elif last is not None:
                result[seq] = int(row[0])
    log.info("migration: %d sequence(s) synchronised", len(result))
    return result


async def _sequence_plan(mconn: Any, tconn: Any, refs: list[TableRef]) -> list[tuple[str, int | None, int]]:
    """(target's sequence, main's last value, increment) per sequence the tables own on main;
    ReplicationError naming the columns whose sequence the target lacks."""
    plan: list[tuple[str, int | None, int]] = []
    missing = []
    schemas, tables = [t.schema or PUBLIC for t in refs], [t.table for t in refs]
    for schema, table, column, last, increment in await mconn.fetch(OWNED_SEQUENCES_QUERY, schemas, tables):
        ref = qualified(TableRef(schema, table))
        seq = await tconn.fetchval("SELECT pg_get_serial_sequence($1, $2)", ref, column)
        if seq is None:
            missing.append(f"{table_label(schema, table)}.{column}")
        else:
            plan.append((seq, last, int(increment)))
    if missing:
        raise ReplicationError(
            f"the target has no sequence for {', '.join(missing)}; no sequence was changed"
        )
    return plan


# -- reverse and back ----------------------------------------------------------------------------------------
async def reverse(main: Dsn, target: Dsn, role: str, tables: Sequence[str | TableRef]) -> None:
    """After cutover, with writes to ``tables`` held: replicate the target's changes back to main (a
    publication on the target, a subscription on main without an initial copy) and stop forward
    replication, so main's copy stays current for a rollback. If the reverse subscription cannot be
    created, forward replication is left as it was. Safe to run again. Raises ReplicationError."""
    await _switch(main, target, role, parse_tables(tables), to_reverse=True)


async def unreverse(main: Dsn, target: Dsn, role: str, tables: Sequence[str | TableRef]) -> None:
    """For a rollback, with writes to ``tables`` held and main caught up: replicate main's changes to the
    target again (forward, without an initial copy) and stop reverse replication. Safe to run again."""
    await _switch(main, target, role, parse_tables(tables), to_reverse=False)


async def _switch(main: Dsn, target: Dsn, role: str, refs: list[TableRef], *, to_reverse: bool) -> None:
    n = names(role)
    async with connected(main, "main") as mconn, connected(target, "target") as tconn:
        # (connection, side, dsn) of the new direction's publisher and subscriber; the old direction is
        # the other way round, under the other name.
        pub, pub_side, pub_dsn = (tconn, "target", target) if to_reverse else (mconn, "main", main)
        sub, sub_side = (mconn, "main") if to_reverse else (tconn, "target")
        new, old = (n.reverse, n.forward) if to_reverse else (n.forward, n.reverse)
        async with step(f"checking {pub_side} and {sub_side}", main, target):
            existing = await subscription(sub, new)
            facts = await preflight.server_facts(pub)
            problems = preflight.publisher_problems(facts, pub_side, slots_needed=0 if existing else 1)
            if existing is None:
                problems += preflight.subscriber_problems(await preflight.server_facts(sub), sub_side)
            problems += preflight.table_problems(
                await preflight.table_facts(pub, refs), pub_side, facts.superuser
            )
            fail(problems)
            previous = await subscription(
                pub, old
            )  # the old direction's subscription is on today's publisher
        stop_old = previous is not None and previous[1]
        async with step(f"stopping replication into {pub_side}", main, target):
            if stop_old:
                await pub.execute(f"ALTER SUBSCRIPTION {quote_ident(old)} DISABLE")
        try:
            async with step(f"replicating from {pub_side} to {sub_side}", main, target):
                await ensure_publication(pub, new, refs, pub_side)
                await ensure_subscription(sub, pub, new, pub_dsn, existing, copy_data=False)
        except ReplicationError:
            if stop_old:  # leave the old direction running, as it was
                with contextlib.suppress(*ERRORS):
                    await pub.execute(f"ALTER SUBSCRIPTION {quote_ident(old)} ENABLE")
            raise
        async with step(f"removing replication into {pub_side}", main, target):
            await drop_subscription(pub, old, sub)
            await drop_publication(sub, old, sub_side)
    log.info("migration: %s: replication now runs from %s to %s", role, pub_side, sub_side)


# -- finish -----------------------------------------------------------------------------------------------
async def finish(main: Dsn, target: Dsn, role: str) -> FinishReport:
    """Remove ``role``'s replication: subscriptions, publications and slots on both sides. Never drops a
    table or a row; the report says which copies the operator may now drop (main's after a cutover, the
    target's when replication still ran forward). Safe to run again. Raises ReplicationError."""
    n = names(role)
    removed: list[str] = []
    async with (
        connected(main, "main") as mconn,
        connected(target, "target") as tconn,
        step("removing replication", main, target),
    ):
        cut_over = None
        if await subscription(mconn, n.reverse) is not None:
            cut_over = True
        elif await subscription(tconn, n.forward) is not None:
            cut_over = False
        moved = await publication_tables(tconn, n.reverse) or await publication_tables(mconn, n.forward) or []
        removed += await drop_subscription(tconn, n.forward, mconn)
        removed += await drop_subscription(mconn, n.reverse, tconn)
        removed += await drop_publication(mconn, n.forward, "main")
        removed += await drop_publication(tconn, n.reverse, "target")
    may_drop: tuple[str, ...] = ()
    if cut_over is not None:
        side = "main" if cut_over else "target"
        may_drop = tuple(f"{side}: {table_label(t.schema, t.table)}" for t in table_set(moved))
    for item in removed:
        log.info("migration: %s: removed %s", role, item)
    return FinishReport(tuple(removed), cut_over, may_drop)
