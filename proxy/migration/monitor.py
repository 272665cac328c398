"""The running proxy's view of the stored migration states: read at start, on reload and every health
interval, so a restart, a reload or a second instance routes a migrating role's tables the same way.

At start it also looks at each configured domain role with no stored state: when its tables hold rows in
main while its own database's copies are empty or missing (a new URL: the seed's phase 2), it enters
``planned`` (stored in main) instead of silently sending reads to an empty database, and the log says so in
one line. A role whose own database already holds rows is in service: rows in main's copy (a fallback
outage's writes, say) change nothing. A role that cannot be judged (its database unreachable) is judged at
a later poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import secrets
from collections.abc import Callable
from typing import Any

import asyncpg

from proxy.config import Config
from proxy.config.values import DOMAINS
from proxy.health import close, connect, describe_error
from proxy.lookups import LookupFailed, MainLookups
from proxy.migration import catalog, state, verbs
from proxy.migration.hold import MigrationHold
from proxy.migration.notices import Listener, Notice
from proxy.migration.objects import ReplicationError
from proxy.migration.replication import Progress
from proxy.migration.shadow import Shadow
from proxy.migration.state import Migration, State

log = logging.getLogger("parafort.migration")

# Seconds start() waits for the first read before listening anyway: statements should not run before the
# stored state is known, yet a main that does not answer (a look-up is bounded by 10 s) must not keep the
# proxy from serving the other roles for long.
FIRST_LOAD_WAIT = 15.0
ROWS_CHECK_TIMEOUT = 5.0  # per table: SELECT EXISTS (SELECT FROM t)
TARGET_TIMEOUT = 5.0
ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class Unknown(Exception):
    """The role's own database could not be read (the message says why)."""


def planned_note(role: str, tables: list[str]) -> str:
    """The one line ``check`` and the log give for a role that starts in ``planned``."""
    return (
        f"{role} has a URL, but its tables hold rows in main ({', '.join(tables)}) and none in {role}: "
        f"main keeps serving them (migration state planned) until they are moved; see: parafort-proxy "
        f"migrate {role} plan"
    )


async def tables_with_rows(conn: Any, *, config: Config, role: str) -> list[str]:
    """The role's tables in ``conn``'s database (by the domain map) that hold at least one row."""
    found = []
    for table in await catalog.domain_tables(conn, config.domains, role):
        if await catalog.has_rows(conn, table, ROWS_CHECK_TIMEOUT):
            found.append(table.label)
    return found


async def target_has_rows(config: Config, role: str) -> bool:
    """Whether the role's own database holds rows in any of its tables; Unknown if it cannot be read."""
    dsn = config.roles.get(role).dsn
    assert dsn is not None
    try:
        async with asyncio.timeout(TARGET_TIMEOUT * 3):
            conn = await connect(dsn, TARGET_TIMEOUT, "migration")
            try:
                return bool(await tables_with_rows(conn, config=config, role=role))
            finally:
                await close(conn)
    except ERRORS as exc:
        raise Unknown(describe_error(exc, dsn, TARGET_TIMEOUT)) from None


async def new_role_tables(main: Any, config: Config, role: str) -> list[str]:
    """For a configured role with no stored state: the tables that make it start in ``planned`` (rows in
    main, none in the role's own database), or [] when it serves its tables. Unknown: cannot tell yet."""
    tables = await tables_with_rows(main, config=config, role=role)
    if not tables or await target_has_rows(config, role):
        return []
    return tables


async def migration_notes(conn: Any, config: Config) -> list[str]:
    """``check``'s lines: each configured domain role that main serves (or will serve once a proxy starts)
    because of a migration. Nothing is written."""
    stored = await state.load(conn)
    notes = []
    for role in DOMAINS:
        if not config.roles.get(role).configured:
            continue
        mig = stored.get(role)
        if mig is not None:
            if mig.served_by_main:
                notes.append(
                    f"{role} has a URL, but its migration is in state {mig.state}: main serves its tables "
                    f"until it is cut over; see: parafort-proxy migrate {role} status"
                )
            continue
        try:
            tables = await new_role_tables(conn, config, role)
        except Unknown as exc:
            notes.append(f"{role}: cannot tell whether main must keep serving its tables: {exc}")
            continue
        if tables:
            notes.append(planned_note(role, tables))
    return notes


class MigrationMonitor:
    """Reads the states through main's look-up connection and tells ``on_change`` which configured roles
    main must keep serving (``held``) whenever that set changes, and its ``shadow`` every state read."""

    def __init__(
        self,
        lookups: MainLookups,
        config: Callable[[], Config],
        interval: Callable[[], float],
        on_change: Callable[[frozenset[str]], None],
    ) -> None:
        self.lookups = lookups
        self.config = config
        self.interval = interval
        self.on_change = on_change
        self.migrations: dict[str, Migration] = {}
        self.loaded = False  # read at least once
        self.error: str | None = None  # why the last read failed
        self._judged: set[str] = set()  # configured roles with no stored state already looked at
        self._unknown_logged: set[str] = set()
        self._unstored: dict[str, Migration] = {}  # planned, but main refused to store it
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Replication of roles in copying or streaming, read at every poll (with their migration logins).
        self.progress: dict[str, Progress] = {}
        self.progress_error: dict[str, str] = {}  # why a role's progress could not be read
        self._switches = 0  # states this instance's verbs applied (a read begun before one is stale)
        self.hold = MigrationHold()  # new transactions on a role's tables wait while it is cut over
        # Notices from the instance that carries out a switch (proxy/migration/notices.py).
        self.instance = secrets.token_hex(8)  # this process, as a sender of notices
        self.listener = Listener(self._notice)
        self._remote: dict[str, asyncio.TimerHandle] = {}  # roles held at another instance's notice
        # Reads of a streaming role's tables sampled and compared on its own database (shadow.py): told the
        # states at every read, started and stopped with the monitor.
        self.shadow = Shadow(config)

    @property
    def held(self) -> frozenset[str]:
        config = self.config()
        configured = frozenset(d for d in DOMAINS if config.roles.get(d).configured)
        return state.held_by_main(self.migrations, configured)

    async def start(self) -> None:
        """Start polling; wait (briefly) for the first read, so the first statements see the stored state."""
        loop = asyncio.get_running_loop()
        self.shadow.start()
        first: asyncio.Future[None] = loop.create_future()
        self._task = loop.create_task(self._run(first))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(first), FIRST_LOAD_WAIT)
        if not first.done():
            log.warning(
                "event=migration_state_pending note=%r",
                "main did not answer yet: configured roles are served by their own databases until the "
                "stored migration state is read",
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.listener.close()
        for role in list(self._remote):
            self._remote_release(role)
        await self.shadow.stop()

    def refresh(self) -> None:
        """Read again now (a reload)."""
        self._wake.set()

    async def _run(self, first: asyncio.Future[None]) -> None:
        while True:
            self._wake.clear()
            try:
                await self.listener.ensure(self.lookups.dsn)
                await self.sync()
            except Exception:  # a bug here must not end the polling
                log.exception("event=migration_state_error")
            if not first.done():
                first.set_result(None)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval()):
                    await self._wake.wait()

    async def sync(self) -> None:
        """One read of the stored states (and a look at configured roles not judged yet)."""
        switches = self._switches
        try:
            migrations = await self.lookups.run(state.load)
            migrations = await self._judge_new_roles(migrations)
        except LookupFailed as exc:
            if self.error is None:
                log.warning("event=migration_state_unreadable error=%r", str(exc))
            self.error = str(exc)
            return
        except ValueError as exc:  # a state this version does not know: keep what we have
            log.error("event=migration_state_unknown error=%r", str(exc))
            return
        self.error = None
        if switches == self._switches:  # else read before a switch this instance made: the next read counts
            self._apply(migrations)
        await self._follow_all()

    async def _follow_all(self) -> None:
        config = self.config()
        for role in DOMAINS:
            mig = self.migrations.get(role)
            if mig is None or mig.state not in verbs.FOLLOWED or not config.roles.get(role).configured:
                self.progress.pop(role, None)
                self.progress_error.pop(role, None)
                continue
            await self.follow(role)

    async def follow(self, role: str) -> None:
        """Read ``role``'s replication progress (kept for SHOW MIGRATION); when the initial copy is done,
        store copying -> streaming (conditionally: another instance may have done it first)."""
        mig = self.migrations.get(role)
        if mig is None or mig.state not in verbs.FOLLOWED:
            return
        try:
            found = await verbs.progress(self.config(), role)
        except verbs.VerbError as exc:
            self.progress_error[role] = exc.message
            return
        except ReplicationError as exc:
            self.progress_error[role] = str(exc)
            return
        self.progress[role] = found
        self.progress_error.pop(role, None)
        if mig.state is State.COPYING and found.done:
            detail = "initial copy done: changes stream from main"
            try:
                moved = await self.lookups.run(
                    lambda conn: state.move(conn, role, State.COPYING, State.STREAMING, detail)
                )
                if moved:
                    log.info("event=migration_copied role=%s tables=%d", role, found.tables_total)
                switches = self._switches
                migrations = await self.lookups.run(state.load)
                if switches == self._switches:
                    self._apply(migrations)
            except (LookupFailed, ValueError) as exc:  # ValueError: a state this version does not know
                self.progress_error[role] = f"initial copy done, but the state could not be stored: {exc}"

    def switched(self, role: str, new: State, detail: str) -> None:
        """A verb of this instance stored ``role``'s new state: route by it now, not at the next poll."""
        mig = self.migrations.get(role)
        now = dt.datetime.now(dt.UTC)
        stored = Migration(role, new, mig.started_at if mig is not None else now, now, detail)
        self._switches += 1
        self._apply({**self.migrations, role: stored})

    # -- notices from the instance carrying out a switch ----------------------------------------------------
    def _notice(self, notice: Notice) -> None:
        if notice.sender == self.instance:
            return
        log.info("event=migration_notice kind=%s role=%s", notice.kind, notice.role)
        if notice.kind == "hold":
            if notice.role not in self._remote:
                self.hold.hold(notice.role)
            else:
                self._remote[notice.role].cancel()
            loop = asyncio.get_running_loop()
            self._remote[notice.role] = loop.call_later(notice.seconds, self._remote_release, notice.role)
        elif notice.kind == "changed":
            asyncio.get_running_loop().create_task(self._changed(notice.role))
        else:
            self._remote_release(notice.role)

    async def _changed(self, role: str) -> None:
        """Another instance stored ``role``'s new state: route by it, then let the held units go."""
        try:
            migrations = await self.lookups.run(state.load)
        except (LookupFailed, ValueError) as exc:  # the guard refuses misrouted writes until the next poll
            log.warning("event=migration_state_unreadable role=%s error=%r", role, str(exc))
        else:
            self._switches += 1
            self._apply(migrations)
        self._remote_release(role)

    def _remote_release(self, role: str) -> None:
        timer = self._remote.pop(role, None)
        if timer is not None:
            timer.cancel()
            self.hold.release(role)

    async def _judge_new_roles(self, migrations: dict[str, Migration]) -> dict[str, Migration]:
        config = self.config()
        for role in DOMAINS:
            if role in self._judged or not config.roles.get(role).configured:
                continue
            if role in migrations:
                self._judged.add(role)
                continue
            tables = await self.lookups.run(functools.partial(tables_with_rows, config=config, role=role))
            if tables:
                try:
                    in_service = await target_has_rows(config, role)  # not on the look-up connection
                except Unknown as exc:
                    if role not in self._unknown_logged:
                        self._unknown_logged.add(role)
                        log.warning("event=migration_role_unjudged role=%s error=%r", role, str(exc))
                    continue
                if not in_service:
                    migrations = await self._enter_planned(migrations, role, tables)
            self._judged.add(role)
        return migrations

    async def _enter_planned(
        self, migrations: dict[str, Migration], role: str, tables: list[str]
    ) -> dict[str, Migration]:
        log.warning("event=migration_planned role=%s note=%r", role, planned_note(role, tables))
        detail = f"rows in main, none in {role}, at start"
        try:
            return await self.lookups.run(lambda conn: state.enter(conn, role, State.PLANNED, detail))
        except LookupFailed as exc:
            log.error(
                "event=migration_state_not_stored role=%s error=%r note=%r",
                role,
                str(exc),
                "this instance keeps main serving the role's tables; other instances may not",
            )
            now = dt.datetime.now(dt.UTC)
            self._unstored[role] = Migration(role, State.PLANNED, now, now, f"{detail} (not stored)")
            return migrations

    def _apply(self, migrations: dict[str, Migration]) -> None:
        before = {r: m.state for r, m in self.migrations.items()}
        held_before = self.held
        migrations = {**self._unstored, **migrations}  # a stored state wins over one kept in memory only
        self.migrations = migrations
        held = self.held
        config = self.config()
        for role in sorted(set(before) | set(migrations)):
            mig = migrations.get(role)
            if self.loaded and before.get(role) == (mig.state if mig else None):
                continue
            log.info(
                "event=migration_state role=%s state=%s served_by=%s",
                role,
                mig.state if mig else "none",
                "main" if role in held or not config.roles.get(role).configured else role,
            )
        self.loaded = True
        self.shadow.follow(migrations)
        if held != held_before:
            self.on_change(held)
