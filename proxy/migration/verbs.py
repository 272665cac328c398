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

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from proxy.config import Config
from proxy.config.dsn import Dsn
from proxy.config.values import TableRef
from proxy.migration import catalog, guard, notices, replication, state
from proxy.migration.hold import MigrationHold
from proxy.migration.naming import names
from proxy.migration.notices import Notice
from proxy.migration.objects import ERRORS, ReplicationError, connected, publication_tables, qualified, step
from proxy.migration.state import MEANING, State, TransitionError, Verb

log = logging.getLogger("parafort.migration")

COLUMNS = ("kind", "name", "detail")
LOCK_SQL = "SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtext('parafort_migration:' || $1))"
UNLOCK_SQL = "SELECT pg_catalog.pg_advisory_unlock(pg_catalog.hashtext('parafort_migration:' || $1))"
# Which database a connection reached: a login that reaches another database (or server) than the role's
# url would copy from, or into, the wrong place.
IDENTITY_SQL = "SELECT pg_catalog.current_database()::text, pg_catalog.pg_postmaster_start_time()::text"
# States whose replication progress is read: forward while copying and streaming, reverse after cutover.
FOLLOWED = frozenset({State.COPYING, State.STREAMING, State.CUTOVER})

# SQLSTATEs of the console's errors.
CONFIG_FILE_ERROR = "F0000"
OBJECT_IN_USE = "55006"
NOT_IN_PREREQUISITE_STATE = "55000"
NOT_SUPPORTED = "0A000"
QUERY_CANCELED = "57014"
NOTICE_MARGIN = 30.0  # seconds other instances hold past cutover_timeout unless told sooner


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
        """Store the new state now, on the claim's own connection."""
        await self.move(self.conn, detail)
        log.info("event=migration_state_stored role=%s from=%s to=%s", self.role, self.current, self.new)

    async def move(self, conn: Any, detail: str) -> None:
        """Write the new state on ``conn`` (in its transaction, if one is open), conditional on the state
        claimed: VerbError if another instance moved it meanwhile."""
        async with step("storing the migration state", self.dsn):
            moved = await state.move(conn, self.role, self.current, self.new, detail)
        if not moved:
            raise VerbError(
                NOT_IN_PREREQUISITE_STATE,
                f"migrate {self.role} {self.verb}: the stored state changed meanwhile (not {self.current} "
                "any more); see: migrate status",
            )


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


async def start(config: Config, role: str, board: Board) -> list[Row]:
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


async def rollback(config: Config, role: str, board: Board) -> list[Row]:
    """copying/streaming -> planned: replication removed on both sides; the target's copied rows stay.
    cutover -> streaming: main serves again (``switch``)."""
    main, target = migration_dsns(config, role, Verb.ROLLBACK)
    await same_databases(config, role, Verb.ROLLBACK)
    async with claimed(main, role, Verb.ROLLBACK) as claim:
        if claim.current is State.CUTOVER:
            return await switch(config, claim, board)
        note = (
            f"replication removed; the rows already copied to {role} stay there (empty its tables there "
            "before a new start: TRUNCATE; the proxy never drops data)"
        )
        rows = await _end_replication(claim, target, f"rolled back from {claim.current}: {note}")
    return [*rows, Row("note", "copied rows", note)]


async def finish(config: Config, role: str, board: Board) -> list[Row]:
    """cutover -> finished: replication removed; the operator is told which copies may be dropped."""
    main, target = migration_dsns(config, role, Verb.FINISH)
    await same_databases(config, role, Verb.FINISH)
    async with claimed(main, role, Verb.FINISH) as claim:
        return await _end_replication(claim, target, "finished: replication removed")


async def _end_replication(claim: Claim, target: Dsn, detail: str) -> list[Row]:
    """Remove the role's replication on both sides and the write guards of the copies nothing replicates
    into any more (the target's on the way back to planned, main's at finish), then store the claimed
    state. Finish lists main's copies as the operator's to drop."""
    finishing = claim.new is State.FINISHED
    report = await replication.finish(claim.dsn, target, claim.role)
    side, label = ("main", "main") if finishing else ("target", claim.role)
    unguarded = await _unguard(claim.dsn if finishing else target, side)
    await claim.store(detail)
    rows = [Row("state", claim.new.value, MEANING[claim.new])]
    rows += [Row("removed", item) for item in report.removed]
    rows += [Row("unguarded", f"{label}: {t}", "takes writes again") for t in unguarded]
    if finishing:
        rows += [Row("may_drop", item, "no longer replicated: drop it when you wish (the proxy never does)")
                 for item in report.may_drop]  # fmt: skip
    return rows


async def cutover(config: Config, role: str, board: Board) -> list[Row]:
    """streaming -> cutover: the role's own database serves its tables (``switch``)."""
    main, target = migration_dsns(config, role, Verb.CUTOVER)
    await same_databases(config, role, Verb.CUTOVER)
    async with claimed(main, role, Verb.CUTOVER) as claim:
        found = await replication.progress(main, target, role)
        # The initial copy done; the apply worker need not be connected yet (right after a rollback it
        # starts anew): the switch waits, bounded, for it to confirm main's position.
        copied = found.tables_total > 0 and found.tables_ready == found.tables_total
        if found.direction != "forward" or not copied:
            what = (
                f"{found.tables_ready} of {found.tables_total} table(s) copied"
                if found.direction == "forward"
                else "no replication from main found (run: migrate start again, or rollback)"
            )
            raise VerbError(
                NOT_IN_PREREQUISITE_STATE,
                f"migrate {role} cutover: the target does not stream main's changes yet ({what}); "
                "nothing changed",
            )
        return await switch(config, claim, board)


async def _unguard(dsn: Dsn, side: str) -> list[str]:
    async with connected(dsn, side) as conn, step(f"removing the write guards on {side}", dsn):
        return await guard.remove(conn)


# -- the switch: cutover, and rollback from cutover ----------------------------------------------------------
class Board(Protocol):
    """What a switch needs of the running proxy: its hold, and to route by the new state at once."""

    @property
    def hold(self) -> MigrationHold: ...
    @property
    def instance(self) -> str: ...  # this process, as the sender of migration notices
    def switched(self, role: str, new: State, detail: str) -> None: ...


@dataclass(frozen=True)
class Sides:
    """One switch's direction: ``old`` serves the tables now and is held, ``new`` serves them after."""

    main: Dsn
    target: Dsn
    to_target: bool  # cutover (main -> target) or rollback (target -> main)

    @property
    def old(self) -> Dsn:
        return self.main if self.to_target else self.target

    @property
    def new(self) -> Dsn:
        return self.target if self.to_target else self.main

    @property
    def old_side(self) -> str:  # as replication.py names the sides
        return "main" if self.to_target else "target"


async def switch(config: Config, claim: Claim, board: Board) -> list[Row]:
    """Change which database serves ``claim.role``'s tables, holding only the transactions on them.

    0. Before anything is held, the subscription catches up once (bounded by the same timeout), so the
       hold itself waits only for what is written meanwhile.
    1. This instance holds new transactions on the tables (proxy/migration/hold.py).
    2. On the database that serves them now, a transaction takes ``LOCK TABLE ... IN EXCLUSIVE MODE``: it
       waits for the transactions writing them (of every proxy instance) to end, then stops new writes
       there (reads go on); bounded by ``migration.cutover_timeout``.
    3. The subscription catches up with that database's position (bounded by the same deadline); the other
       side's sequences are set past this side's; replication changes direction.
    4. The old side's copies get the write guard (proxy/migration/guard.py) and the new side's lose theirs;
       the new state is stored; the lock transaction commits.
    5. This instance routes by the new state, then releases the hold: the held transactions go to the
       database that serves the tables now.

    A timeout or a failure before the commit leaves everything as it was (replication's direction is
    restored if it had changed). Other proxy instances hold and switch on this instance's notices
    (proxy/migration/notices.py); one that misses them reads the new state at its next poll, and until
    then a write it sends to the old side is refused by the guard (25006), never lost.
    """
    role = claim.role
    main, target = migration_dsns(config, role, claim.verb)
    to_target = claim.current is State.STREAMING
    sides = Sides(main, target, to_target)
    tables = await _switched_tables(sides, role)
    hold = board.hold
    timeout = config.migration.cutover_timeout
    # Catch up once before holding anything (bounded likewise; whatever it reaches shortens the hold).
    lsn = await replication.current_lsn(sides.old, sides.old_side)
    await replication.wait_caught_up(main, target, role, lsn, timeout, reverse=not to_target)
    waited_before = hold.held_total.get(role, 0)
    started = time.monotonic()
    detail = (
        f"cut over: {role} serves its tables; main's copies follow by replication"
        if to_target
        else "rolled back from cutover: main serves the tables again; the target follows by replication"
    )
    with hold.held(role):
        # The other instances hold too (their notice lasts a while past the deadline: the replication
        # steps after the catch-up take their own time).
        await _notify(claim, Notice("hold", role, timeout + NOTICE_MARGIN, board.instance))
        try:
            sequences, guarded = await _switch_held(
                config, claim, sides, tables, deadline=started + timeout, detail=detail,
                changed=Notice("changed", role, 0, board.instance),
            )  # fmt: skip
        except BaseException:
            await _notify(claim, Notice("release", role, 0, board.instance))
            raise
        board.switched(role, claim.new, detail)
        log.info("event=migration_state_stored role=%s from=%s to=%s", role, claim.current, claim.new)
    seconds = time.monotonic() - started
    waited = hold.held_total.get(role, 0) - waited_before
    rows = [Row("state", claim.new.value, MEANING[claim.new])]
    rows.append(Row("held", f"{len(tables)} table(s)", f"{seconds:.3f} s; {waited} transaction(s) waited"))
    rows += [Row("sequence", seq, f"set to {value}") for seq, value in sorted(sequences.items())]
    where = "main" if to_target else role
    keeps = "refuses writes (25006); replication keeps it current"
    rows += [Row("guarded", f"{where}: {t}", keeps) for t in guarded]
    nxt = (
        f"migrate {role} rollback routes back to main (until finish); migrate {role} finish ends replication"
        if to_target
        else f"migrate {role} cutover again when ready, or rollback to stop replicating"
    )
    rows.append(Row("note", "next", nxt))
    return rows


async def _switched_tables(sides: Sides, role: str) -> list[TableRef]:
    """The tables replication carries now (its publication on the side that serves them)."""
    n = names(role)
    publication = n.forward if sides.to_target else n.reverse
    async with connected(sides.old, sides.old_side) as conn, step("reading the replicated tables", sides.old):
        tables = await publication_tables(conn, publication)
    if not tables:
        raise VerbError(
            NOT_IN_PREREQUISITE_STATE,
            f"migrate {role}: no publication {publication} on {sides.old_side}: replication is not running "
            "as the stored state says; nothing changed",
        )
    return tables


async def _switch_held(
    config: Config,
    claim: Claim,
    sides: Sides,
    tables: list[TableRef],
    *,
    deadline: float,
    detail: str,
    changed: Notice,
) -> tuple[dict[str, int], list[str]]:
    role = claim.role
    main, target = sides.main, sides.target
    what = f"migrate {role} {claim.verb}"
    switched = committed = False
    async with connected(sides.old, sides.old_side) as lock:
        transaction = await _locked(lock, tables, deadline, what, sides.old_side)
        try:
            lsn = await replication.current_lsn(sides.old, sides.old_side)
            remaining = max(0.0, deadline - time.monotonic())
            if not await replication.wait_caught_up(
                main, target, role, lsn, remaining, reverse=not sides.to_target
            ):
                raise VerbError(
                    QUERY_CANCELED,
                    f"{what}: the subscription did not catch up with {sides.old_side} within "
                    f"cutover_timeout ({config.migration.cutover_timeout:g}s); the hold ended and nothing "
                    "changed",
                )
            sequences = await replication.sync_sequences(sides.old, sides.new, role, tables)
            if sides.to_target:
                await replication.reverse(main, target, role, tables)
            else:
                await replication.unreverse(main, target, role, tables)
            switched = True
            async with step(f"guarding {sides.old_side}'s copies", sides.old):
                guarded = await guard.install(lock, tables, role)
            if sides.to_target:
                await _unguard(target, "target")
                await claim.move(lock, detail)  # committed with the lock and the guards
                await notices.send(lock, changed)  # delivered at that commit
            else:
                async with connected(main, "main") as mconn, mconn.transaction():
                    async with step("removing the write guards on main", main):
                        await guard.remove(mconn)
                    await claim.move(mconn, detail)
                    await notices.send(mconn, changed)
                committed = True  # main serves again, whatever becomes of the target's lock
            async with step(f"committing on {sides.old_side}", sides.old):
                await transaction.commit()
            committed = True
        except BaseException:
            with contextlib.suppress(*ERRORS):
                await transaction.rollback()
            if switched and not committed:
                await _restore_direction(sides, role, tables, what)
            raise
    return sequences, guarded


async def _notify(claim: Claim, notice: Notice) -> None:
    """Tell the other instances (best effort: one that misses it reads the state at its next poll)."""
    try:
        await notices.send(claim.conn, notice)
    except ERRORS as exc:
        log.warning("event=migration_notice_failed kind=%s error=%r", notice.kind, str(exc))


# Transactions waiting for a lock on the tables (they arrived after the LOCK: a write this instance sent
# just before its hold began, or one of a proxy instance that has not held).
# (Writes wait for RowExclusiveLock, TRUNCATE for AccessExclusiveLock; autovacuum's waits do not count.)
WAITERS_SQL = (
    "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = ANY($1::regclass[])"
    " AND mode IN ('RowExclusiveLock', 'AccessExclusiveLock')"
)
SETTLE_PAUSE = 0.02  # seconds between letting waiting writers through and locking again


async def _locked(conn: Any, tables: list[TableRef], deadline: float, what: str, side: str) -> Any:
    """A transaction on ``conn`` holding ``LOCK TABLE ... IN EXCLUSIVE MODE`` on ``tables``: new writes to
    them wait, reads go on. Writers that queued behind the lock would meet the write guard once it
    commits, so while time remains (half of what is left) the lock is let go for them to finish on this
    side, still served, and taken again."""
    settle_until = time.monotonic() + (deadline - time.monotonic()) / 2
    names = [qualified(t) for t in tables]
    while True:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await _lock_tables(conn, tables, deadline, what, side)
            waiting = await conn.fetchval(WAITERS_SQL, names)
        except BaseException:
            with contextlib.suppress(*ERRORS):
                await transaction.rollback()
            raise
        if not waiting or time.monotonic() >= settle_until:
            return transaction
        await transaction.rollback()
        log.info("event=migration_lock_settling side=%s waiting=%d", side, waiting)
        await asyncio.sleep(SETTLE_PAUSE)


async def _lock_tables(conn: Any, tables: list[TableRef], deadline: float, what: str, side: str) -> None:
    """Stop new writes to ``tables`` on ``side`` for this transaction, once those writing them have ended
    (bounded by ``deadline``); reads go on."""
    remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
    try:
        await conn.execute(f"SET LOCAL lock_timeout = {remaining_ms}")
        await conn.execute(f"LOCK TABLE {', '.join(qualified(t) for t in tables)} IN EXCLUSIVE MODE")
    except asyncpg.LockNotAvailableError:
        raise VerbError(
            QUERY_CANCELED,
            f"{what}: transactions writing the tables on {side} did not end within cutover_timeout; the hold "
            "ended and nothing changed",
        ) from None
    except ERRORS as exc:
        raise ReplicationError(f"locking the tables on {side}: {exc}") from None
    await conn.execute("SET LOCAL lock_timeout = 0")


async def _restore_direction(sides: Sides, role: str, tables: list[TableRef], what: str) -> None:
    """A switch failed after replication changed direction: change it back (the old side still serves)."""
    try:
        if sides.to_target:
            await replication.unreverse(sides.main, sides.target, role, tables)
        else:
            await replication.reverse(sides.main, sides.target, role, tables)
        note = f"{what} failed: replication restored"
        log.warning("event=migration_switch_undone role=%s note=%r", role, note)
    except ReplicationError as exc:
        log.error(
            "event=migration_switch_undo_failed role=%s error=%r note=%r",
            role,
            str(exc),
            f"replication runs towards {sides.old_side}, which serves the tables: run {what} again",
        )


VERBS = {Verb.START: start, Verb.CUTOVER: cutover, Verb.ROLLBACK: rollback, Verb.FINISH: finish}


async def carry_out(config: Config, role: str, verb: Verb, board: Board) -> list[Row]:
    """Run one operator verb; VerbError (one line, with a SQLSTATE) if it cannot be carried out."""
    action = VERBS[verb]
    try:
        return await action(config, role, board)
    except ReplicationError as exc:
        raise VerbError(
            NOT_IN_PREREQUISITE_STATE, f"migrate {role} {verb}: {exc}; the state is unchanged"
        ) from None


async def progress(config: Config, role: str) -> replication.Progress:
    """``role``'s replication progress; VerbError without migration logins, ReplicationError if a side
    cannot answer."""
    main, target = migration_dsns(config, role, "status")
    return await replication.progress(main, target, role)
