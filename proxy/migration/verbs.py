"""The operator verbs that change a migration: ``start``, ``rollback`` and ``finish`` (the admin console's
``MIGRATE role START|ROLLBACK|FINISH``, which ``parafort-proxy migrate`` calls), and the internal step
copying -> streaming (``follow``, from the monitor and ``status``).

Each verb runs on connections of its own with the role's migration logins (``roles.main.migration_url``
and ``roles.<role>.migration_url``: PostgreSQL 15 lets only superusers create subscriptions):

1. take a session advisory lock on main for the role, so that one verb at a time changes it, across every
   proxy instance (the other gets one line: another migrate command is under way);
2. read the stored state and ask ``state.next_state`` whether the verb applies;
3. do the replication work (proxy/migration/replication.py), which is safe to run again after a failure;
4. store the new state with an UPDATE conditional on the state read in 2.

A failure in 3 leaves the stored state as it was: the replication steps look at what exists first, so the
same verb can simply be run again. Nothing here drops a table or a row.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from proxy.config import Config
from proxy.config.dsn import Dsn
from proxy.config.values import TableRef
from proxy.migration import catalog, replication, state
from proxy.migration.objects import ERRORS, ReplicationError, connected, step
from proxy.migration.state import MEANING, State, TransitionError, Verb

log = logging.getLogger("parafort.migration")

COLUMNS = ("kind", "name", "detail")
LOCK_SQL = "SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtext('parafort_migration:' || $1))"
UNLOCK_SQL = "SELECT pg_catalog.pg_advisory_unlock(pg_catalog.hashtext('parafort_migration:' || $1))"
# Which database a connection reached: a login that reaches another database (or server) than the role's
# url would copy from, or into, the wrong place.
IDENTITY_SQL = "SELECT pg_catalog.current_database()::text, pg_catalog.pg_postmaster_start_time()::text"
FOLLOWED = frozenset({State.COPYING, State.STREAMING})  # states whose replication progress is read

# SQLSTATEs of the console's errors.
CONFIG_FILE_ERROR = "F0000"
OBJECT_IN_USE = "55006"
NOT_IN_PREREQUISITE_STATE = "55000"
NOT_SUPPORTED = "0A000"


class VerbError(Exception):
    """A verb that could not be carried out; ``message`` is one line, ``sqlstate`` the console's code."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


@dataclass(frozen=True)
class Row:
    kind: str  # state, created, existing, foreign_key, removed, may_drop, note
    name: str
    detail: str = ""

    def values(self) -> tuple[str, str, str]:
        return (self.kind, self.name, self.detail)


def migration_dsns(config: Config, role: str, verb: str) -> tuple[Dsn, Dsn]:
    """(main's, the role's) migration logins; VerbError naming the first that is missing."""
    rc = config.roles.get(role)
    if rc.dsn is None:
        raise VerbError(
            NOT_IN_PREREQUISITE_STATE,
            f"migrate {role} {verb}: roles.{role}.url is not set: no database to move to",
        )
    for name, env, dsn in (
        ("main", "MIGRATION_DATABASE_URL", config.roles.main.migration_dsn),
        (role, f"{role.upper()}_MIGRATION_DATABASE_URL", rc.migration_dsn),
    ):
        if dsn is None:
            raise VerbError(
                CONFIG_FILE_ERROR,
                f"migrate {role} {verb}: roles.{name}.migration_url ({env}) is not set: it needs a login to "
                f"{name}'s database that may set up logical replication (PostgreSQL 15: a superuser)",
            )
    main, target = config.roles.main.migration_dsn, rc.migration_dsn
    assert main is not None and target is not None
    return main, target


@dataclass
class Claim:
    """A role held for one verb: the connection (migration login to main) holding its advisory lock, and
    the stored state the verb was checked against."""

    conn: Any
    dsn: Dsn
    role: str
    verb: Verb
    current: State
    new: State

    async def store(self, detail: str) -> None:
        async with step("storing the migration state", self.dsn):
            moved = await state.move(self.conn, self.role, self.current, self.new, detail)
        if not moved:
            raise VerbError(
                NOT_IN_PREREQUISITE_STATE,
                f"migrate {self.role} {self.verb}: the stored state changed meanwhile (not {self.current} "
                "any more); see: migrate status",
            )
        log.info("event=migration_state_stored role=%s from=%s to=%s", self.role, self.current, self.new)


@contextlib.asynccontextmanager
async def claimed(main: Dsn, role: str, verb: Verb) -> AsyncIterator[Claim]:
    """Lock ``role`` for ``verb`` on main and check that the stored state allows it (VerbError if not)."""
    async with connected(main, "main") as conn:
        async with step("locking the role's migration", main):
            got = await conn.fetchval(LOCK_SQL, role)
        if not got:
            raise VerbError(
                OBJECT_IN_USE,
                f"migrate {role} {verb}: another migrate command for {role} is under way (this or another "
                "proxy instance); nothing changed",
            )
        try:
            async with step("reading the migration state", main):
                mig = (await state.load(conn)).get(role)
            current = mig.state if mig is not None else None
            try:
                new = state.next_state(role, current, verb)
            except state.NotImplementedVerb as exc:
                raise VerbError(NOT_SUPPORTED, str(exc)) from None
            except TransitionError as exc:
                raise VerbError(NOT_IN_PREREQUISITE_STATE, str(exc)) from None
            assert current is not None
            yield Claim(conn, main, role, verb, current, new)
        finally:
            with contextlib.suppress(*ERRORS):  # closing the connection releases it anyway
                await conn.execute(UNLOCK_SQL, role)


async def same_database(config: Config, role: str, side: str, verb: str) -> None:
    """VerbError unless ``side``'s migration login reaches the same database as its url (same name, same
    server: its postmaster's start time)."""
    rc = config.roles.get(side)
    found = []
    for what, dsn in (("url", rc.dsn), ("migration_url", rc.migration_dsn)):
        assert dsn is not None
        async with connected(dsn, f"{side} ({what})") as conn, step(f"identifying {side}'s database", dsn):
            found.append(tuple(await conn.fetchrow(IDENTITY_SQL)))
    if found[0] != found[1]:
        raise VerbError(
            NOT_IN_PREREQUISITE_STATE,
            f"migrate {role} {verb}: roles.{side}.migration_url reaches database {found[1][0]!r} of a server "
            f"started at {found[1][1]}, not roles.{side}.url's {found[0][0]!r} of a server started at "
            f"{found[0][1]}; nothing changed",
        )


async def same_databases(config: Config, role: str, verb: str) -> None:
    """Both migration logins reach the databases the proxy serves (the state is stored in main's, the
    tables are copied from main's into the role's)."""
    for side in ("main", role):
        await same_database(config, role, side, verb)


async def moving_tables(conn: Any, config: Config, role: str) -> list[TableRef]:
    """The role's tables in main by the domain map, exactly as the plan lists them."""
    tables = await catalog.domain_tables(conn, config.domains, role)
    return [TableRef(t.schema, t.name) for t in tables]


async def start(config: Config, role: str) -> list[Row]:
    """planned -> copying: the target's tables, main's publication, the target's subscription."""
    main, target = migration_dsns(config, role, Verb.START)
    await same_databases(config, role, Verb.START)
    async with claimed(main, role, Verb.START) as claim:
        async with step("reading main's catalog", main):
            tables = await moving_tables(claim.conn, config, role)
        if not tables:
            raise VerbError(
                NOT_IN_PREREQUISITE_STATE,
                f"migrate {role} start: no table of main belongs to {role} (domain map); nothing changed",
            )
        app = config.roles.get(role).dsn
        owner = app.user if app is not None and app.user != target.user else None
        report = await replication.start(main, target, role, tables, owner=owner)
        await claim.store(f"started: {len(tables)} table(s) copying to {role}")
    rows = [Row("state", State.COPYING.value, MEANING[State.COPYING])]
    rows += [Row("created", t, f"created in {role} from main's definition") for t in report.created_tables]
    rows += [
        Row("existing", t, f"already in {role} (empty or subscribed): reused") for t in report.existing_tables
    ]
    rows += [
        Row("foreign_key", str(fk), f"not created in {role}: it would cross databases")
        for fk in report.skipped_foreign_keys
    ]
    rows.append(Row("note", "next", f"migrate {role} status shows the copy's progress; main keeps serving"))
    return rows


async def rollback(config: Config, role: str) -> list[Row]:
    """copying/streaming -> planned: replication removed on both sides; the target's copied rows stay."""
    main, target = migration_dsns(config, role, Verb.ROLLBACK)
    await same_databases(config, role, Verb.ROLLBACK)
    async with claimed(main, role, Verb.ROLLBACK) as claim:
        report = await replication.finish(main, target, role)
        note = (
            f"replication removed; the rows already copied to {role} stay there (empty its tables there "
            "before a new start: TRUNCATE; the proxy never drops data)"
        )
        await claim.store(f"rolled back from {claim.current}: {note}")
    rows = [Row("state", State.PLANNED.value, MEANING[State.PLANNED])]
    rows += [Row("removed", item) for item in report.removed]
    rows.append(Row("note", "copied rows", note))
    return rows


async def finish(config: Config, role: str) -> list[Row]:
    """cutover -> finished: replication removed; the operator is told which copies may be dropped."""
    main, target = migration_dsns(config, role, Verb.FINISH)
    await same_databases(config, role, Verb.FINISH)
    async with claimed(main, role, Verb.FINISH) as claim:
        report = await replication.finish(main, target, role)
        await claim.store("finished: replication removed")
    rows = [Row("state", State.FINISHED.value, MEANING[State.FINISHED])]
    rows += [Row("removed", item) for item in report.removed]
    rows += [Row("may_drop", item, "no longer replicated: drop it when you wish (the proxy never does)")
             for item in report.may_drop]  # fmt: skip
    return rows


VERBS = {Verb.START: start, Verb.ROLLBACK: rollback, Verb.FINISH: finish}


async def carry_out(config: Config, role: str, verb: Verb) -> list[Row]:
    """Run one operator verb; VerbError (one line, with a SQLSTATE) if it cannot be carried out."""
    action = VERBS.get(verb)
    if action is None:
        raise VerbError(NOT_SUPPORTED, state.unavailable(role, verb))
    try:
        return await action(config, role)
    except ReplicationError as exc:
        raise VerbError(
            NOT_IN_PREREQUISITE_STATE, f"migrate {role} {verb}: {exc}; the state is unchanged"
        ) from None


async def progress(config: Config, role: str) -> replication.Progress:
    """``role``'s replication progress; VerbError without migration logins, ReplicationError if a side
    cannot answer."""
    main, target = migration_dsns(config, role, "status")
    return await replication.progress(main, target, role)
