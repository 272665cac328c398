"""Shadow reads while a domain migrates: a sampled share of the reads of a streaming role's tables also runs
on the role's own database, off the client's path, and the results are compared.

**On the data path** a client connection calls ``Shadow.offer`` where it counts a read it sends
(``_count_route`` in proxy/frontend/core.py: a unit that starts a lease, a later statement of a
transaction, asyncpg's Bind/Execute after its Parse/Describe/Flush, a unit pipelined behind another), only
while ``Shadow.active`` (some role is in ``streaming``: one attribute check otherwise). ``offer`` keeps a
read whose tables all belong to one streaming role with probability ``migration.shadow_sample`` (read from
the live configuration, so a reload changes it), copies what is needed to run it again into a bounded queue
(full, or already holding a sample of the same statement text: the sample is dropped and counted) and
returns. One waiting sample per statement keeps the sample diverse: a hot statement read a thousand times a
second would otherwise fill the queue and leave every other statement dropped. Nothing else happens there:
the client's unit is routed, sent and answered exactly as without shadowing, and nothing the shadow does
later can delay or fail it.

**What can be sampled**: a simple-protocol Query holding one statement; an extended-protocol unit with one
Bind of a statement parsed in the same unit or prepared earlier by name, with its parameters: in text format
(psycopg for strings, JDBC, libpq), or in binary format for the common types ``binary_text`` knows
(integers, floats, numeric, boolean, text types, json/jsonb, bytea, uuid, date, timestamp[tz]: psycopg's
numbers, asyncpg). Not sampled (counted as ``skipped``, by reason in ``skips``): binary parameters of other
types, a Bind of the cached unnamed statement, units of several statements, and reads whose result depends
on the physical order of rows (a ``LIMIT``/``OFFSET`` without ``ORDER BY`` at the same level): their rows
legitimately differ between two copies of a table. What runs again is the statement alone, in the shadow's
own session: not the client's transaction (its uncommitted rows), nor its session settings
(``search_path``...).

**Off the path** one task (``Shadow._run``) takes samples one at a time, with connections of its own (the
roles' ``url`` logins, ``proxy.health.connect``), every statement in a read-only transaction, a statement
timeout and at most ``MAX_ROWS`` rows read. A statement is run by its text, or, with parameters, as
``PREPARE`` and ``EXECUTE`` with the parameters as quoted literals: their types are first resolved on main
from the client's declared types (``unknown`` where it gave none, so the server infers them as it did for
the client), a binary parameter is turned into its text form by its type, and each literal is read by the
type's input function, exactly as a text-format Bind parameter is.

**The comparison** (``compare``) is by row count and an order-insensitive hash of the rows (``Digest``: the
sum of a 64-bit digest of each row, modulo 2**64, so equal multisets of rows give equal digests whatever
their order):

1. run on main: result A; then read main's WAL insert position L (every commit A saw ends at or before L);
2. wait (``CATCH_UP_WAIT``) until the forward subscription's slot on main has confirmed L
   (``pg_replication_slots.confirmed_flush_lsn``: the target has committed everything up to L); not
   reached in time: ``inconclusive``;
3. run on the target: T;
4. run on main again: A2.

The target at step 3 shows main's data as of some moment between steps 1 and 4 (not before L, not after
main's present). If A2 != A the rows changed meanwhile and T may legitimately equal neither:
``inconclusive``. If A2 == A and T == A: ``match``; T != A: a difference, confirmed by a second round
(``confirm``): the same rows could have changed and changed back between steps 1 and 4, which the two ends
cannot see, so a difference counts as ``diverged`` only if the second round differs too, else it is
``inconclusive``. Reads whose result is not a function of the rows (``now()``, ``random()``) give A2 != A
and so ``inconclusive``, never a false divergence. What this cannot tell from a real difference: a result
that depends on the order rows are read in though both copies hold the same rows (``array_agg`` or
``string_agg`` without ``ORDER BY``, the last digits of a float ``sum``), and ties under an ``ORDER BY`` with
a ``LIMIT``; ``SHOW SHADOW`` names the statement, so such a divergence is easy to judge. A failure (a
connection refused, a statement error, a timeout) is ``error``; more than ``MAX_ROWS`` rows is
``inconclusive``.

Counted per role and outcome (``counts``) and per (role, statement fingerprint) (``stats``, at most
``MAX_FINGERPRINTS`` distinct, then ``OTHER``): pglast's fingerprint, as the classifier and the migration
plan use; the console shows the statement normalized by pglast (literals replaced by ``$n``). No SQL
literal, parameter or row value ever reaches a log line, a metric or the console.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import hashlib
import logging
import math
import random
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import pglast
from pglast.visitors import Visitor

from proxy.config import Config
from proxy.errors import ProxyError
from proxy.health import close, connect
from proxy.migration import naming
from proxy.migration.state import Migration, State
from proxy.protocol import messages as m

log = logging.getLogger("parafort.migration")

MAIN = "main"
MATCH, DIVERGED, INCONCLUSIVE, ERROR = "match", "diverged", "inconclusive", "error"
DROPPED, SKIPPED = "dropped", "skipped"  # not compared: the queue was full; the read cannot be replayed
OUTCOMES = (MATCH, DIVERGED, INCONCLUSIVE, ERROR, DROPPED, SKIPPED)
QUEUE_SIZE = 64
CATCH_UP_WAIT = 5.0  # seconds the target may take to confirm main's position at the time of the read
CATCH_UP_POLL = 0.05
CONNECT_TIMEOUT = 5.0
STATEMENT_TIMEOUT = 5.0  # per statement, on the server and around it
MAX_ROWS = 100_000
MAX_FINGERPRINTS = 100  # distinct (role, fingerprint) kept; then counted under OTHER
OTHER = "other"
MAX_STATEMENT_TEXT = 300  # characters of the normalized statement kept for the console
MASK64 = (1 << 64) - 1
LSN_SQL = "SELECT pg_catalog.pg_current_wal_insert_lsn()"
SLOT_SQL = "SELECT confirmed_flush_lsn FROM pg_catalog.pg_replication_slots WHERE slot_name = $1"
TYPE_SQL = "SELECT pg_catalog.format_type($1::oid, NULL)"
TYPES_SQL = "SELECT parameter_types::text[] FROM pg_catalog.pg_prepared_statements WHERE name = $1"
PREPARED = "parafort_shadow"
_Q, _P, _B = ord("Q"), ord("P"), ord("B")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


class Prepared(Protocol):
    """A client's named prepared statement as the shadow reads it (proxy/frontend/session.py)."""

    @property
    def sql(self) -> str: ...
    @property
    def param_oids(self) -> tuple[int, ...]: ...


@dataclass(frozen=True, slots=True)
class Sample:
    """A read to run again: its text, and for a Bind its declared parameter types and the parameters as
    the client sent them (None: NULL), each with its format (True: binary)."""

    role: str
    sql: str
    param_oids: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] | None = None  # None: run the text as it is
    binary: tuple[bool, ...] = ()


class Unreplayable(Exception):
    """The unit cannot be run again faithfully (the message says why; it holds no SQL)."""


# -- the hash -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Result:
    rows: int
    digest: int


class Digest:
    """An order-insensitive digest of rows: their count and the sum of a 64-bit hash of each, mod 2**64."""

    __slots__ = ("digest", "rows")

    def __init__(self) -> None:
        self.rows = 0
        self.digest = 0

    def add(self, row: Sequence[object]) -> None:
        data = repr(tuple(row)).encode("utf-8", "surrogateescape")
        self.digest = (self.digest + int.from_bytes(hashlib.blake2b(data, digest_size=8).digest())) & MASK64
        self.rows += 1

    @property
    def result(self) -> Result:
        return Result(self.rows, self.digest)


def digest_of(rows: Iterable[Sequence[object]]) -> Result:
    found = Digest()
    for row in rows:
        found.add(row)
    return found.result


def judge(first: Result, target: Result, second: Result) -> str:
    """One round: main before (A), the target (T), main after (A2)."""
    if first != second:
        return INCONCLUSIVE  # main's rows changed during the round
    return MATCH if target == first else DIVERGED


def confirm(first: str, again: str) -> str:
    """A difference counts only if a second round differs too (rows may change and change back)."""
    if first != DIVERGED:
        return first
    return DIVERGED if again == DIVERGED else INCONCLUSIVE


# -- what the data path copies ---------------------------------------------------------------------------
def bind_params(payload: bytes, offset: int) -> tuple[tuple[bytes | None, ...], tuple[bool, ...]]:
    """The parameters of a Bind (payload without the header; ``offset`` past the two names) as sent, and
    whether each is in binary format. Copies the values: nothing of the client's buffer is kept."""
    (nformats,) = _I16.unpack_from(payload, offset)
    offset += 2
    formats = struct.unpack_from(f"!{nformats}h", payload, offset) if nformats > 0 else ()
    offset += 2 * max(nformats, 0)
    (nparams,) = _I16.unpack_from(payload, offset)
    offset += 2
    if nformats not in (0, 1, nparams):
        raise Unreplayable("malformed message")
    values: list[bytes | None] = []
    for _ in range(nparams):
        (length,) = _I32.unpack_from(payload, offset)
        offset += 4
        if length < 0:
            values.append(None)
            continue
        values.append(bytes(payload[offset : offset + length]))
        offset += length
    if nformats == 1:
        formats = formats * nparams
    return tuple(values), tuple(bool(f) for f in formats) if nformats else (False,) * nparams


def sample_of(
    role: str, buf: bytes, msgs: Sequence[tuple[int, int, int]], statements: Mapping[str, Prepared]
) -> Sample | None:
    """What a unit runs, to run it again (None: it executes nothing, a Describe say); Unreplayable when it
    cannot be replayed faithfully."""
    if len(msgs) == 1 and msgs[0][0] == _Q:
        _, start, end = msgs[0]
        return Sample(role, m.decode_query(buf[start + 5 : end]))
    parsed: dict[str, tuple[str, tuple[int, ...]]] = {}
    found: Sample | None = None
    for mtype, start, end in msgs:
        if mtype == _P:
            name, sql, oids = m.decode_parse(buf[start + 5 : end])
            parsed[name] = (sql, oids)
        elif mtype == _B:
            if found is not None:
                raise Unreplayable("several statements")
            payload = buf[start + 5 : end]
            _, name, offset = m.decode_bind_names(payload)
            if name in parsed:
                sql, oids = parsed[name]
            elif name and name in statements:
                stmt = statements[name]
                sql, oids = stmt.sql, stmt.param_oids
            else:
                raise Unreplayable("statement not in the unit")
            values, binary = bind_params(payload, offset)
            found = Sample(role, sql, oids, values, binary)
        elif mtype == _Q:
            raise Unreplayable("several statements")
    return found


class _OrderDependent(Visitor):
    """Finds a LIMIT or OFFSET without ORDER BY at the same level: which rows it keeps depends on the
    physical order of the table, which differs between two copies."""

    def __init__(self) -> None:
        super().__init__()
        self.found = False

    def visit_SelectStmt(self, ancestors: object, node: Any) -> None:
        if (node.limitCount is not None or node.limitOffset is not None) and not node.sortClause:
            self.found = True


def check_replayable(sql: str) -> None:
    """Unreplayable for text that is not one statement, or a read whose rows depend on physical order."""
    try:
        tree = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        raise Unreplayable("not parsable") from None
    if len(tree) != 1:
        raise Unreplayable("several statements")
    visitor = _OrderDependent()
    visitor(tree)
    if visitor.found:
        raise Unreplayable("LIMIT or OFFSET without ORDER BY")


def describe(sql: str) -> tuple[str, str]:
    """(fingerprint, normalized text without literals) of a statement, as the console shows it."""
    try:
        fingerprint = str(pglast.parser.fingerprint(sql))
        normalized = " ".join(str(pglast.parser.normalize(sql)).split())
    except pglast.parser.ParseError:
        return "unparsable", "(not parsable)"
    if len(normalized) > MAX_STATEMENT_TEXT:
        normalized = normalized[: MAX_STATEMENT_TEXT - 3] + "..."
    return fingerprint, normalized


def quote_literal(value: str | None) -> str:
    return "NULL" if value is None else naming.quote_literal(value)


# -- binary parameters as text ------------------------------------------------------------------------
EPOCH = dt.datetime(2000, 1, 1)  # PostgreSQL's epoch for dates and timestamps
INT64_MAX, INT64_MIN = (1 << 63) - 1, -(1 << 63)
_INTS = {"smallint": "!h", "integer": "!i", "bigint": "!q", "oid": "!I"}
_FLOATS = {"real": "!f", "double precision": "!d"}
_TEXTS = frozenset({"text", "character varying", "character", "name", "json", "unknown", '"char"'})


def _float(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def _numeric(data: bytes) -> str:
    ndigits, weight, sign, dscale = struct.unpack_from("!hhHh", data)
    special = {0xC000: "NaN", 0xD000: "Infinity", 0xF000: "-Infinity"}
    if sign in special:
        return special[sign]
    digits = struct.unpack_from(f"!{ndigits}h", data, 8)
    value = 0
    for digit in digits:
        value = value * 10000 + digit
    exponent = 4 * (weight - ndigits + 1)  # value * 10**exponent
    context = decimal.Context(prec=max(4 * ndigits + dscale + 10, 28))
    number = decimal.Decimal(value).scaleb(exponent, context)
    number = number.quantize(decimal.Decimal(1).scaleb(-dscale), context=context)
    return ("-" if sign == 0x4000 else "") + format(number, "f")


def _timestamp(data: bytes, zone: str) -> str:
    (micros,) = struct.unpack("!q", data)
    if micros in (INT64_MAX, INT64_MIN):
        return "infinity" if micros > 0 else "-infinity"
    return (EPOCH + dt.timedelta(microseconds=micros)).isoformat(sep=" ") + zone


def binary_text(type_name: str, data: bytes) -> str:
    """A binary-format parameter of type ``type_name`` (as regtype spells it) in PostgreSQL's text form,
    which the type's input function reads back to the same value; Unreplayable for a type not known here."""
    try:
        if type_name in _INTS:
            return str(struct.unpack(_INTS[type_name], data)[0])
        if type_name in _FLOATS:
            return _float(struct.unpack(_FLOATS[type_name], data)[0])
        if type_name in _TEXTS:
            return data.decode("utf-8")
        if type_name == "jsonb" and data[:1] == b"\x01":
            return data[1:].decode("utf-8")
        if type_name == "boolean":
            return {b"\x01": "t", b"\x00": "f"}[data]
        if type_name == "bytea":
            return "\\x" + data.hex()
        if type_name == "uuid":
            return str(uuid.UUID(bytes=data))
        if type_name == "numeric":
            return _numeric(data)
        if type_name == "date":
            (days,) = struct.unpack("!i", data)
            if days in (0x7FFFFFFF, -0x80000000):
                return "infinity" if days > 0 else "-infinity"
            return (EPOCH.date() + dt.timedelta(days=days)).isoformat()
        if type_name == "timestamp without time zone":
            return _timestamp(data, "")
        if type_name == "timestamp with time zone":
            return _timestamp(data, "+00")
    except (struct.error, KeyError, ValueError, OverflowError, decimal.InvalidOperation):
        raise Unreplayable("malformed binary parameter") from None
    raise Unreplayable(f"binary parameters of type {type_name}")


def literals(sample: Sample, types: Sequence[str]) -> list[str]:
    """The sample's parameters as SQL literals, binary ones converted by their resolved ``types``."""
    assert sample.params is not None
    out = []
    for value, binary, type_name in zip(sample.params, sample.binary, types, strict=True):
        if value is None:
            out.append("NULL")
            continue
        try:
            text = binary_text(type_name, value) if binary else value.decode("utf-8")
        except UnicodeDecodeError:
            raise Unreplayable("parameters not UTF-8") from None
        if "\0" in text:
            raise Unreplayable("parameter holds NUL")
        out.append(quote_literal(text))
    return out


# -- counting -------------------------------------------------------------------------------------------
@dataclass
class Stats:
    """One statement (by fingerprint) of one role: what its samples came to."""

    role: str
    fingerprint: str
    statement: str
    outcomes: dict[str, int] = field(default_factory=dict)
    last_seen: float = 0.0  # time.time()
    last_error: str | None = None  # an SQLSTATE or an exception's type: never a message with values

    @property
    def samples(self) -> int:
        return sum(self.outcomes.values())


class Shadow:
    """The shadow reads of one proxy process (see the module docstring). ``config`` is read at each use."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self.config = config
        self.active = False  # some configured role is streaming: the data path offers its reads
        self.streaming: frozenset[str] = frozenset()
        self.counts: dict[tuple[str, str], int] = {}  # (role, outcome) -> samples
        self.stats: dict[tuple[str, str], Stats] = {}  # (role, fingerprint) -> what its samples came to
        self.skips: dict[tuple[str, str], int] = {}  # (role, why it cannot be replayed) -> samples
        self._queue: deque[Sample] = deque()
        self._queued: set[tuple[str, str]] = set()  # (role, statement text) of the samples in the queue
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conns: dict[str, Any] = {}  # role -> asyncpg connection of the shadow's own
        self._types: dict[int, str] = {}  # parameter type oid -> its name (as main spells it)
        self._errors_logged: set[tuple[str, str]] = set()  # (role, SQLSTATE or exception type)

    # -- following the migration states ------------------------------------------------------------------
    def follow(self, migrations: Mapping[str, Migration]) -> None:
        """The stored states as the migration monitor last read them."""
        roles = self.config().roles
        self.streaming = frozenset(
            role for role, mig in migrations.items() if mig.state is State.STREAMING and roles.get(role).dsn
        )
        self.active = bool(self.streaming)
        if not self.active:
            self._queue.clear()
            self._queued.clear()

    # -- the data path -----------------------------------------------------------------------------------
    def offer(
        self,
        domains: tuple[str, ...],
        buf: bytes,
        msgs: Sequence[tuple[int, int, int]],
        statements: Mapping[str, Prepared],
    ) -> None:
        """A read the client connection routed (``domains``: the roles its tables belong to). Copies a
        sample into the queue or does nothing; never raises, never waits."""
        if len(domains) != 1 or domains[0] not in self.streaming:
            return
        role = domains[0]
        share = self.config().migration.shadow_sample
        if share <= 0.0 or (share < 1.0 and random.random() >= share):
            return
        if len(self._queue) >= QUEUE_SIZE:
            self._count(role, DROPPED)
            return
        try:
            sample = sample_of(role, buf, msgs, statements)
            if sample is None:
                return
        except Unreplayable as exc:
            self._skip(role, str(exc))
            return
        except (ProxyError, struct.error, UnicodeDecodeError):
            self._skip(role, "malformed message")
            return
        key = (role, sample.sql)
        if key in self._queued:  # the same statement waits already: one compare per statement at a time
            self._count(role, DROPPED)
            return
        self._queued.add(key)
        self._queue.append(sample)
        self._ready.set()

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for role in list(self._conns):
            await self._drop(role)

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            if not self._queue:
                self._ready.clear()
                continue
            sample = self._queue.popleft()
            self._queued.discard((sample.role, sample.sql))
            if sample.role not in self.streaming:
                continue
            try:
                await self.process(sample)
            except Exception:  # a bug here must not end the shadowing, nor reach a client
                log.exception("event=migration_shadow_bug role=%s", sample.role)

    # -- one sample --------------------------------------------------------------------------------------
    async def process(self, sample: Sample) -> str:
        """Compare one sample and count its outcome (returned)."""
        try:
            check_replayable(sample.sql)
        except Unreplayable as exc:
            self._skip(sample.role, str(exc))
            return SKIPPED
        fingerprint, statement = describe(sample.sql)
        error: str | None = None
        try:
            outcome = await self.compare(sample)
        except Unreplayable as exc:
            self._skip(sample.role, str(exc))
            return SKIPPED
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            outcome = ERROR
            error = exc.sqlstate if isinstance(exc, asyncpg.PostgresError) else type(exc).__name__
            for role in (MAIN, sample.role):  # a connection in doubt is not used again
                await self._drop(role)
        self._count(sample.role, outcome)
        entry = self._record(sample.role, fingerprint, statement, outcome, error)
        if outcome == DIVERGED and entry.outcomes[DIVERGED] == 1:  # once per statement: SHOW SHADOW counts
            log.warning(
                "event=migration_shadow_diverged role=%s fingerprint=%s statement=%r",
                sample.role,
                entry.fingerprint,
                entry.statement,
            )
        if error is not None and (sample.role, error) not in self._errors_logged:
            self._errors_logged.add((sample.role, error))  # once per role and kind: counted after that
            log.warning("event=migration_shadow_error role=%s error=%s", sample.role, error)
        return outcome

    async def compare(self, sample: Sample) -> str:
        """Two rounds at most (``confirm``); raises on a failure, Unreplayable for parameters that cannot
        be replayed."""
        statement = await self._statement(sample)
        first = await self._round(sample, statement)
        if first != DIVERGED:
            return first
        return confirm(first, await self._round(sample, statement))

    async def _statement(self, sample: Sample) -> tuple[str, str] | None:
        """For a sample with parameters: (PREPARE, EXECUTE) with the parameters as literals. Their types are
        resolved on main as the client's Parse left them (declared, or inferred where it gave none), and
        declared in full, so main and the target read the literals alike."""
        if not sample.params:
            return None
        main = await self._conn(MAIN)
        declared = [await self._type_name(oid) for oid in sample.param_oids]
        declared += ["unknown"] * (len(sample.params) - len(declared))
        async with asyncio.timeout(STATEMENT_TIMEOUT), main.transaction(readonly=True):
            await main.execute(f"PREPARE {PREPARED}({', '.join(declared)}) AS {sample.sql}")
            try:
                types = [str(t) for t in await main.fetchval(TYPES_SQL, PREPARED)]
            finally:
                await main.execute(f"DEALLOCATE {PREPARED}")
        values = literals(sample, types)
        return (
            f"PREPARE {PREPARED}({', '.join(types)}) AS {sample.sql}",
            f"EXECUTE {PREPARED}({', '.join(values)})",
        )

    async def _round(self, sample: Sample, statement: tuple[str, str] | None) -> str:
        main = await self._conn(MAIN)
        target = await self._conn(sample.role)
        before = await self._read(main, sample.sql, statement)
        if before is None:
            return INCONCLUSIVE
        async with asyncio.timeout(STATEMENT_TIMEOUT):
            lsn = await main.fetchval(LSN_SQL)
        if not await self._caught_up(main, naming.names(sample.role).forward, lsn):
            return INCONCLUSIVE
        found = await self._read(target, sample.sql, statement)
        after = await self._read(main, sample.sql, statement)
        if found is None or after is None:
            return INCONCLUSIVE
        return judge(before, found, after)

    async def _caught_up(self, main: Any, slot: str, lsn: Any) -> bool:
        """Whether the slot confirms ``lsn`` within CATCH_UP_WAIT (polled on main)."""
        deadline = time.monotonic() + CATCH_UP_WAIT
        while True:
            async with asyncio.timeout(STATEMENT_TIMEOUT):
                confirmed = await main.fetchval(SLOT_SQL, slot)
            if confirmed is not None and confirmed >= lsn:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(CATCH_UP_POLL)

    async def _read(self, conn: Any, sql: str, statement: tuple[str, str] | None) -> Result | None:
        """The rows of ``sql`` (or of the prepared ``statement``) on ``conn`` as a digest; None beyond
        MAX_ROWS."""
        found = Digest()
        async with asyncio.timeout(STATEMENT_TIMEOUT * 2), conn.transaction(readonly=True):
            if statement is not None:
                await conn.execute(statement[0])
                sql = statement[1]
            try:
                async for row in conn.cursor(sql, prefetch=500):
                    found.add(row)
                    if found.rows > MAX_ROWS:
                        return None
            finally:
                if statement is not None:
                    await conn.execute(f"DEALLOCATE {PREPARED}")
        return found.result

    async def _type_name(self, oid: int) -> str:
        if oid == 0:
            return "unknown"
        name = self._types.get(oid)
        if name is None:
            main = await self._conn(MAIN)
            async with asyncio.timeout(STATEMENT_TIMEOUT):
                name = self._types[oid] = str(await main.fetchval(TYPE_SQL, oid))
        return name

    async def _conn(self, role: str) -> Any:
        conn = self._conns.get(role)
        if conn is not None and not conn.is_closed():
            return conn
        dsn = self.config().roles.get(role).dsn
        if dsn is None:
            raise OSError(f"{role} has no URL")
        conn = await connect(dsn, CONNECT_TIMEOUT, "shadow")
        try:
            async with asyncio.timeout(STATEMENT_TIMEOUT):
                await conn.execute(
                    f"SET statement_timeout = {int(STATEMENT_TIMEOUT * 1000)}; "
                    "SET standard_conforming_strings = on"
                )
        except BaseException:
            await close(conn)
            raise
        self._conns[role] = conn
        return conn

    async def _drop(self, role: str) -> None:
        conn = self._conns.pop(role, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                await close(conn)

    # -- counters ----------------------------------------------------------------------------------------
    def _count(self, role: str, outcome: str) -> None:
        key = (role, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1

    def _skip(self, role: str, reason: str) -> None:
        self._count(role, SKIPPED)
        key = (role, reason)
        self.skips[key] = self.skips.get(key, 0) + 1

    def _record(self, role: str, fingerprint: str, statement: str, outcome: str, error: str | None) -> Stats:
        entry = self.stats.get((role, fingerprint))
        if entry is None:
            if len(self.stats) >= MAX_FINGERPRINTS:
                fingerprint, statement = OTHER, "(other statements)"
                entry = self.stats.get((role, fingerprint))
            if entry is None:
                entry = self.stats[(role, fingerprint)] = Stats(role, fingerprint, statement)
        entry.outcomes[outcome] = entry.outcomes.get(outcome, 0) + 1
        entry.last_seen = time.time()
        if error is not None:
            entry.last_error = error
        return entry

    def divergences(self, role: str) -> int | None:
        """Divergences counted for ``role`` since start; None when none of its reads was ever sampled."""
        if not any(r == role for r, _ in self.counts):
            return None
        return self.counts.get((role, DIVERGED), 0)

    def for_role(self, role: str | None = None) -> list[Stats]:
        """The statements sampled (of ``role``, or all), most divergent first."""
        found = [s for s in self.stats.values() if role is None or s.role == role]
        return sorted(found, key=lambda s: (s.role, -s.outcomes.get(DIVERGED, 0), -s.samples, s.fingerprint))
