"""Migration states: everything that decides which database serves a moving domain lives here.

Moving a domain role's tables from main to its own database goes through these states, stored in main's
database (schema ``parafort_migration``, one row per role) so that a restart, a reload or a second proxy
instance sees the same one::

    (no row) --rows found in main at start--> planned
    planned   --start-->    copying     tables created on the target, publication + subscription
    copying   --copied-->   streaming   initial copy done, changes stream from main
    copying   --rollback--> planned     replication removed, nothing else changed
    streaming --rollback--> planned
    streaming --cutover-->  cutover     the target serves; reverse replication keeps main current
    cutover   --rollback--> streaming   main serves again (within the rollback window)
    cutover   --finish-->   finished    replication removed; main's copies may be dropped by the operator

In ``planned``, ``copying`` and ``streaming`` main serves the role's tables, exactly as if the role had no
URL; in ``cutover`` and ``finished`` (and with no row) the role's own database does. The transition table is
data (``TRANSITIONS``), tested on its own; ``next_state`` is the one door.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from proxy.config.values import DOMAINS

SCHEMA = "parafort_migration"
TABLE = f"{SCHEMA}.migrations"


class State(StrEnum):
    PLANNED = "planned"  # a URL is configured, main's copy holds rows: main serves, nothing copied yet
    COPYING = "copying"  # replication set up, initial copy running: main serves
    STREAMING = "streaming"  # initial copy done, changes streaming to the target: main serves
    CUTOVER = "cutover"  # the target serves; reverse replication keeps main's copy current for a rollback
    FINISHED = "finished"  # the target serves; replication removed


class Verb(StrEnum):
    START = "start"
    COPIED = "copied"  # not an operator verb: the initial copy finished
    CUTOVER = "cutover"
    ROLLBACK = "rollback"
    FINISH = "finish"


OPERATOR_VERBS = (Verb.START, Verb.CUTOVER, Verb.ROLLBACK, Verb.FINISH)

SERVED_BY_MAIN = frozenset({State.PLANNED, State.COPYING, State.STREAMING})

TRANSITIONS: dict[tuple[State, Verb], State] = {
    (State.PLANNED, Verb.START): State.COPYING,
    (State.COPYING, Verb.COPIED): State.STREAMING,
    (State.COPYING, Verb.ROLLBACK): State.PLANNED,
    (State.STREAMING, Verb.ROLLBACK): State.PLANNED,
    (State.STREAMING, Verb.CUTOVER): State.CUTOVER,
    (State.CUTOVER, Verb.ROLLBACK): State.STREAMING,
    (State.CUTOVER, Verb.FINISH): State.FINISHED,
}

MEANING = {
    State.PLANNED: "main serves its tables; nothing copied yet (next verb: start)",
    State.COPYING: "main serves its tables; initial copy to the target under way",
    State.STREAMING: "main serves its tables; the target follows main by logical replication",
    State.CUTOVER: "the target serves its tables; main's copy is kept current for a rollback",
    State.FINISHED: "the target serves its tables; replication removed",
}


class TransitionError(ValueError):
    """A verb that does not apply to the role's current state (the message says what does)."""


def next_state(role: str, current: State | None, verb: Verb) -> State:
    """The state ``verb`` leads to from ``current`` (None: no migration recorded for ``role``).

    Raises TransitionError for a verb that does not apply to ``current``; its message is one line an
    operator can act on.
    """
    if current is None:
        raise TransitionError(f"migrate {role} {verb}: no migration recorded for {role}")
    found = TRANSITIONS.get((current, verb))
    if found is None:
        allowed = sorted(v.value for (s, v) in TRANSITIONS if s == current and v in OPERATOR_VERBS)
        raise TransitionError(
            f"migrate {role} {verb}: not possible in state {current}"
            + (f" (possible: {', '.join(allowed)})" if allowed else "")
        )
    return found


@dataclass(frozen=True)
class Migration:
    """One role's stored migration."""

    role: str
    state: State
    started_at: dt.datetime
    updated_at: dt.datetime
    detail: str = ""

    @property
    def served_by_main(self) -> bool:
        return self.state in SERVED_BY_MAIN


def held_by_main(migrations: dict[str, Migration], configured: frozenset[str]) -> frozenset[str]:
    """The configured domain roles whose tables main serves because of their migration state."""
    return frozenset(r for r, mig in migrations.items() if r in configured and mig.served_by_main)


# -- storage in main (an asyncpg connection of the proxy's own) --------------------------------------------
_STATES = ", ".join(f"'{s.value}'" for s in State)
_ROLES = ", ".join(f"'{r}'" for r in DOMAINS)
CREATE_SQL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
COMMENT ON SCHEMA {SCHEMA} IS 'ParaFort Proxy: state of moving a domain''s tables to its own database';
CREATE TABLE IF NOT EXISTS {TABLE} (
    role text PRIMARY KEY CHECK (role IN ({_ROLES})),
    state text NOT NULL CHECK (state IN ({_STATES})),
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    detail text NOT NULL DEFAULT ''
);
"""
# Two instances creating the schema at once would collide in pg_namespace: one at a time.
LOCK_SQL = "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('parafort_migration'))"
EXISTS_SQL = f"SELECT pg_catalog.to_regclass('{TABLE}') IS NOT NULL"
LOAD_SQL = f"SELECT role, state, started_at, updated_at, detail FROM {TABLE} ORDER BY role"
# The one write of a transition: it applies only if the state is still the one the verb was checked against.
MOVE_SQL = f"UPDATE {TABLE} SET state = $3, detail = $4, updated_at = now() WHERE role = $1 AND state = $2"
INSERT_SQL = f"INSERT INTO {TABLE} (role, state, detail) VALUES ($1, $2, $3) ON CONFLICT (role) DO NOTHING"


def parse_rows(rows: list[Any]) -> dict[str, Migration]:
    """Stored rows as Migrations by role (rows of an unknown state raise ValueError)."""
    return {
        row[0]: Migration(row[0], State(row[1]), row[2], row[3], row[4] or "")
        for row in rows
        if row[0] in DOMAINS
    }


async def load(conn: Any) -> dict[str, Migration]:
    """Every stored migration by role; none when the schema was never created (nothing is created here)."""
    if not await conn.fetchval(EXISTS_SQL):
        return {}
    return parse_rows(await conn.fetch(LOAD_SQL))


async def enter(conn: Any, role: str, state: State, detail: str) -> dict[str, Migration]:
    """Record ``role`` in ``state`` unless a row exists already (another instance may have been first);
    creates the schema on first use. Returns every stored migration afterwards."""
    async with conn.transaction():
        await conn.execute(LOCK_SQL)
        await conn.execute(CREATE_SQL)
        await conn.execute(INSERT_SQL, role, state.value, detail)
    return await load(conn)


async def move(conn: Any, role: str, current: State, new: State, detail: str) -> bool:
    """Store ``role``'s transition from ``current`` to ``new``: True, or False when the stored state is no
    longer ``current`` (another instance moved it first) and nothing was written."""
    tag = await conn.execute(MOVE_SQL, role, current.value, new.value, detail)
    return bool(tag == "UPDATE 1")
