"""Differential: random valid sessions, run on PostgreSQL directly and through the proxy, must answer alike.

Each example is one client session of random units — simple Queries (transaction control, savepoints,
settings, writes, errors, several statements in one) and extended-protocol batches up to a Sync (named
and unnamed statements and portals, Describe, Execute with a row limit, Close, a Flush inside, parameter
counts that do not match) — on one small table. It runs once on a direct connection to main and once
through the proxy, the table reset before each, and the two replies must be the same message for message
(errors compared by their fields but PostgreSQL's source location).

Through the proxy the main pool has one connection, and between the session's units (whenever it is
outside a transaction and has not pinned itself) a second client takes that connection: it has settings
of its own (another ``search_path``, ``TimeZone``, ``application_name``), prepares statements of its own
and leaves an unnamed statement behind. So the session's next unit finds its connection handed over and
used, and the proxy has to put the session's settings and statements back: the fast path, the slow path
and every hand-over between them, against what one PostgreSQL server does.

Two of the session's statements never share a text (a named one carries its name in a comment): the
proxy prepares one upstream statement per text, so an error naming it (a Bind's parameter count, a
duplicate Parse) may name either of the client's names for it. Known gaps are listed in ``KNOWN`` and
in ``_extended_message``.
"""

from __future__ import annotations

import os
import random
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from proxy.dev.cluster import DevClusters
from proxy.dev.testing import APP_USER, ProxyProcess
from proxy.protocol import messages as m
from proxy.protocol.framing import startup_message

TABLE = "pf_diff"
# DELETE, not TRUNCATE: no AccessExclusiveLock for the streaming replica to hold while it replays (a test
# that pauses replay there must still be able to connect to it).
RESET = f"DELETE FROM {TABLE}; INSERT INTO {TABLE} VALUES (1, 10), (2, 20), (3, 30)"
READ_TIMEOUT = 20.0
# Sessions per variant: 40 in the suite (~12 s in all); PARAFORT_DIFF_EXAMPLES=500 for a deeper run.
EXAMPLES = settings(
    max_examples=int(os.environ.get("PARAFORT_DIFF_EXAMPLES", "40")),
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)

# Simple Query texts. {k} is a key that may or may not exist yet (a duplicate key is an error too).
QUERIES = (
    "SELECT 1",
    f"SELECT k, v FROM {TABLE} ORDER BY k",
    f"SELECT count(*), sum(v) FROM {TABLE}",
    f"UPDATE {TABLE} SET v = v + 1 WHERE k = 1",
    f"INSERT INTO {TABLE} VALUES ({{k}}, 0)",
    f"DELETE FROM {TABLE} WHERE k > 3",
    f"SELECT v FROM {TABLE} WHERE k = 2; UPDATE {TABLE} SET v = v * 2 WHERE k = 2; SELECT 'two'",
    "BEGIN",
    "BEGIN",
    "BEGIN READ ONLY",
    "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "COMMIT",
    "COMMIT",
    "ROLLBACK",
    "END",
    "SAVEPOINT s1",
    "ROLLBACK TO SAVEPOINT s1",
    "RELEASE SAVEPOINT s1",
    "SELECT 1/0",
    "SELEC 1",
    "",
    "SET application_name = 'fz_app'",
    "RESET application_name",
    "SET TimeZone = 'UTC'",
    "SET LOCAL statement_timeout = '7s'",
    "SET statement_timeout = '9s'",
    "SHOW statement_timeout",
    "SHOW search_path",
    "SELECT current_setting('TimeZone'), current_setting('application_name')",
    "SELECT 1; BEGIN",
    "COMMIT; SELECT 2",
    "DEALLOCATE p1",
    "DEALLOCATE ALL",
    "DISCARD ALL",
    "RESET ALL",
)
# Extended-protocol statements: (text, parameter count).
STATEMENTS = (
    ("SELECT $1::int + 1", 1),
    (f"SELECT k, v FROM {TABLE} WHERE k = $1::int", 1),
    (f"UPDATE {TABLE} SET v = v + $1::int WHERE k = 1", 1),
    (f"SELECT k FROM {TABLE} ORDER BY k", 0),
    ("SELECT generate_series(1, 3)", 0),
    ("SELECT 1/0", 0),
    ("SELEC 1", 0),
    ("BEGIN", 0),
    ("COMMIT", 0),
    (f"SELECT abalance FROM {TABLE}", 0),  # no such column
)
STATEMENT_NAMES = ("", "", "p1", "p2", "p3")
UNSURE = "?"  # in a session's flags: whether its unnamed statement exists is unsure
BOUND = "?bound"  # in the flags: this unit has bound the unnamed portal (see ``_extended_message``)
PORTAL_NAMES = ("", "", "", "c1")
# What the second client does between the session's units, through the same one-connection pool.
DISTURBER_SETUP = (
    "SET search_path = pg_catalog",
    "SET TimeZone = 'Asia/Tokyo'",
    "SET application_name = 'disturber'",
    "SET statement_timeout = '1min'",
)
DISTURBER_UNITS = (
    m.query("SELECT 1"),
    m.parse("p1", "SELECT 'disturber'::text") + m.sync(),  # the session's statement name, for another text
    m.parse("", "SELECT 2") + m.sync(),  # leaves its own unnamed statement on the connection
    m.bind_raw("", "p1", b"\0\0\0\0\0\0") + b"E\0\0\0\x09\0\0\0\0\0" + m.sync(),
)


def execute(portal: str, max_rows: int) -> bytes:
    payload = portal.encode() + b"\0" + struct.pack("!I", max_rows)
    return b"E" + struct.pack("!I", len(payload) + 4) + payload


def bind(portal: str, statement: str, params: int, rng: random.Random) -> bytes:
    values = [str(rng.choice((1, 2, 5))).encode() for _ in range(params)]
    rest = struct.pack("!hh", 0, params) + b"".join(struct.pack("!i", len(v)) + v for v in values)
    return m.bind_raw(portal, statement, rest + struct.pack("!h", 0))


@dataclass
class Unit:
    """One client write: its bytes, how many ReadyForQuery end its replies, and a readable account."""

    data: bytes
    ready: int
    text: str


def simple_unit(rng: random.Random) -> Unit:
    sql = rng.choice(QUERIES).format(k=rng.randint(3, 6))
    return Unit(m.query(sql), 1, f"Query {sql!r}")


def extended_unit(rng: random.Random, parsed: dict[str, int], flags: set[str]) -> Unit:
    """Up to five extended messages and a Sync. ``parsed``: the statement names this session parsed (with
    their parameter count), so a Bind mostly names one that exists and mostly sends the right count;
    ``flags``: what the session must leave alone for now (``UNSURE``, ``BOUND``)."""
    parts: list[tuple[bytes, str]] = []
    if rng.random() < 0.4:  # the common unit: [Parse] Bind Describe Execute, as pgbench sends it
        sql, params = rng.choice(STATEMENTS)
        if rng.random() < 0.8 or "" not in parsed or UNSURE in flags:
            parts.append((m.parse("", sql), f"Parse '' {sql!r}"))
            parsed[""] = params
            flags.discard(UNSURE)
        parts += [
            (bind("", "", parsed[""], rng), "Bind '' ''"),
            (m.describe(b"P", ""), "Describe P ''"),
            (execute("", 0), "Execute '' 0"),
        ]
    else:
        flags.discard(BOUND)
        for i in range(rng.randint(1, 5)):
            parts.append(_extended_message(rng, parsed, flags, first=i == 0))
    parts.append((m.sync(), "Sync"))
    return Unit(b"".join(p for p, _ in parts), 1, " ".join(t for _, t in parts))


def _extended_message(
    rng: random.Random, parsed: dict[str, int], flags: set[str], first: bool
) -> tuple[bytes, str]:
    """One extended message (``first``: of its unit). An unnamed Parse behind other messages of its unit
    may be skipped after their error, which the proxy's books do not follow (they take the skipped
    statement as the client's): the unnamed statement is then not used (``UNSURE``) until a unit parses
    it first. The unnamed portal is described or executed only in the unit that binds it: PostgreSQL 15.18
    itself crashes (SIGSEGV, and every session of the server with it) on an Execute of the unnamed portal
    after a RELEASE or ROLLBACK TO of a missing savepoint failed a transaction and a named Parse was refused
    in it (reproduced on a direct connection; see docs/architecture.md). (So a finished portal of a lone
    extended BEGIN or COMMIT the proxy answered itself, which is not on the server, is not used again
    either: executing it is an error both ways, 34000 through the proxy and 55000 on PostgreSQL.)"""
    kind = rng.choice("PPBBBDEECH")
    name = rng.choice(STATEMENT_NAMES)
    portal = rng.choice(PORTAL_NAMES)
    if name == "" and UNSURE in flags and kind in "BDC":
        return m.flush(), "Flush"
    if portal == "" and kind in "DE" and BOUND not in flags:
        return m.flush(), "Flush"
    if kind == "P":
        sql, params = rng.choice(STATEMENTS)
        if name:  # a text of its own: see the module's note on statements that share a text
            sql = f"{sql} /* {name} */"
        if not name:
            (flags.discard if first else flags.add)(UNSURE)
        parsed[name] = params
        return m.parse(name, sql), f"Parse {name!r} {sql!r}"
    if kind == "B":
        if not portal:
            flags.add(BOUND)
        params = parsed.get(name, 0) if rng.random() < 0.9 else 1 - min(parsed.get(name, 0), 1)
        return bind(portal, name, params, rng), f"Bind {portal!r} {name!r} ({params} params)"
    if kind == "D":
        which = rng.choice((b"S", b"P"))
        target = name if which == b"S" else portal
        return m.describe(which, target), f"Describe {which.decode()} {target!r}"
    if kind == "E":
        rows = rng.choice((0, 0, 1))
        return execute(portal, rows), f"Execute {portal!r} {rows}"
    if kind == "C":
        which = rng.choice((b"S", b"P"))
        target = name if which == b"S" else portal
        if which == b"S":
            parsed.pop(name, None)
        return m.close(which, target), f"Close {which.decode()} {target!r}"
    return m.flush(), "Flush"


def session(rng: random.Random) -> list[Unit]:
    parsed: dict[str, int] = {}
    flags: set[str] = set()
    return [
        simple_unit(rng) if rng.random() < 0.45 else extended_unit(rng, parsed, flags)
        for _ in range(rng.randint(4, 25))
    ]


# -- the raw client ----------------------------------------------------------------------------------------
class Raw:
    """A client socket speaking the protocol by hand: a trust login, then units and their replies."""

    def __init__(self, sock: socket.socket, params: dict[str, str]) -> None:
        self.sock = sock
        self.buf = b""
        self.status = b"I"
        sock.settimeout(READ_TIMEOUT)
        sock.sendall(startup_message(params))
        login = self.read(1)
        assert [t for t, _ in login if t == b"E"] == [], f"login failed: {login}"

    def message(self) -> tuple[bytes, bytes]:
        while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack_from("!i", self.buf, 1)[0]:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no reply within {READ_TIMEOUT}s") from None
            if not chunk:
                raise AssertionError("the connection was closed")
            self.buf += chunk
        length = struct.unpack_from("!i", self.buf, 1)[0]
        message = (self.buf[0:1], self.buf[5 : 1 + length])
        self.buf = self.buf[1 + length :]
        return message

    def read(self, ready: int) -> list[tuple[bytes, bytes]]:
        out = []
        while ready:
            mtype, payload = self.message()
            out.append((mtype, payload))
            if mtype == b"Z":
                ready -= 1
                self.status = payload
        return out

    def run(self, unit: Unit) -> list[tuple[bytes, bytes]]:
        self.sock.sendall(unit.data)
        return self.read(unit.ready)

    def close(self) -> None:
        self.sock.sendall(m.terminate())
        self.sock.close()


def normalized(replies: list[tuple[bytes, bytes]]) -> list[tuple[str, object]]:
    """Replies as compared: errors and notices by their fields less the source location (file, line,
    routine), the proxy's own read-your-writes token left out, the rest byte for byte."""
    out: list[tuple[str, object]] = []
    for mtype, payload in replies:
        if mtype in (b"E", b"N"):
            fields = m.parse_fields(payload)
            out.append((mtype.decode(), {k: v for k, v in sorted(fields.items()) if k not in "FLR"}))
        elif mtype == b"S" and m.decode_parameter_status(payload)[0].startswith("parafort."):
            continue
        else:
            out.append((mtype.decode(), payload))
    return out


# Where the proxy answers otherwise, as a known gap: (direct's error, the proxy's), by SQLSTATE and
# message.
# - A Bind of the unnamed statement after its Parse failed, on a connection that is not the one the
#   Parse failed on: the proxy parses the client's unnamed statement there again, and the client hears
#   the Parse's error again instead of 26000 (in a failed transaction: 25P02, the Parse refused).
# - A Bind with the wrong number of parameters, in a failed transaction, of an unnamed statement the proxy
#   keeps (statements.cache_unnamed) after an earlier Bind of it failed: the proxy's books dropped the
#   statement then (a failed Bind may mean it is gone), so it prepares it again, which the failed
#   transaction refuses (25P02), where PostgreSQL checks the parameter count first (08P01).
# - Session state changed by a unit sent while an earlier unit's reply is still coming (pipelined; not
#   generated): the outcome of a pipelined SET / RESET is judged when the first unit ends, so an error
#   there drops a later SET that succeeded from the books (the next hand-over puts the old value back).
#   DEALLOCATE or DISCARD ALL so pipelined: the proxy cannot answer a DEALLOCATE of one statement in
#   order, forgets the name and sends it on, and PostgreSQL, which knows the statement by its upstream
#   name, answers 26000 where it would have deallocated it; and when anything in that write fails, the
#   connection serves that client alone until it leaves (what it holds is unknown to the proxy), so the
#   other clients wait for the pool. A named statement used so pipelined while its Parse is still in
#   flight: the proxy cannot know yet whether the name exists (no 42P05 then; an error about it may name
#   it "").
# - A Parse of a name the client has already, in a failed transaction, of a statement a failed
#   transaction lets through (COMMIT), on a connection that lacks the client's statement of that name:
#   the proxy prepares that statement there first, which the failed transaction refuses (25P02), where
#   PostgreSQL answers 42P05.
_NO_UNNAMED = ("26000", "unnamed prepared statement does not exist")
_ABORTED = ("25P02", "current transaction is aborted, commands ignored until end of transaction block")
KNOWN = {
    (_NO_UNNAMED, ("42601", 'syntax error at or near "SELEC"')),
    (_NO_UNNAMED, ("42703", 'column "abalance" does not exist')),
    (_NO_UNNAMED, _ABORTED),
    (("08P01", 'bind message supplies 1 parameters, but prepared statement "" requires 0'), _ABORTED),
    *((("42P05", f'prepared statement "{name}" already exists'), _ABORTED) for name in STATEMENT_NAMES),
}


def same(want: list[tuple[str, object]], got: list[tuple[str, object]]) -> bool:
    if len(want) != len(got):
        return False
    for (wtype, w), (gtype, g) in zip(want, got, strict=True):
        if (wtype, w) == (gtype, g):
            continue
        if not (wtype == gtype == "E" and isinstance(w, dict) and isinstance(g, dict)):
            return False
        if ((w.get("C"), w.get("M")), (g.get("C"), g.get("M"))) not in KNOWN:
            return False
    return True


def run_direct(pg: DevClusters, units: list[Unit]) -> list[list[tuple[str, object]]]:
    main = pg.main
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(main.sockdir / f".s.PGSQL.{main.port}"))
        client = Raw(sock, {"user": main.user, "database": main.database})
        try:
            return [normalized(client.run(unit)) for unit in units]
        finally:
            client.close()


def run_proxied(
    proxy: ProxyProcess, units: list[Unit], disturb: Callable[[], bytes | None]
) -> list[list[tuple[str, object]]]:
    """``units`` through the proxy; before each, while the session is outside a transaction, the second
    client runs what ``disturb`` gives it (None: nothing this time)."""

    def connect() -> Raw:
        return Raw(socket.create_connection(("127.0.0.1", proxy.port), timeout=READ_TIMEOUT), login)

    login = {"user": APP_USER, "database": "app"}
    client, disturber = connect(), connect()
    try:
        for sql in DISTURBER_SETUP:
            disturber.run(Unit(m.query(sql), 1, sql))
        out = []
        for i, unit in enumerate(units):
            if client.status == b"I" and (data := disturb()) is not None:
                try:
                    disturber.run(Unit(data, 1, "disturber"))
                except AssertionError as exc:
                    raise AssertionError(f"the second client, before unit {i}: {exc}") from None
            try:
                out.append(normalized(client.run(unit)))
            except AssertionError as exc:
                raise AssertionError(f"unit {i}: {exc}") from None
        return out
    finally:
        client.close()
        disturber.close()


@pytest.fixture(scope="module")
def diff_table(pg: DevClusters) -> Iterator[None]:
    pg.main.psql(
        f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (k int PRIMARY KEY, v int)", superuser=False
    )
    yield
    if pg.main.running:
        pg.main.psql(f"DROP TABLE IF EXISTS {TABLE}", superuser=False)
        pg.wait_replica_caught_up()


def start(start_proxy: Callable[..., ProxyProcess], variant: str) -> ProxyProcess:
    """main: one upstream; replica: reads go to the streaming replica, read-your-writes on (its token left
    out of the comparison); cache_unnamed: unnamed statements kept prepared upstream. One connection a
    pool, so the second client takes the session's whenever it is free."""
    config: dict[str, object] = {"auth": {"method": "trust"}, "roles": {"main": {"pool_size": 1}}}
    roles: tuple[str, ...] = ("main",)
    if variant == "replica":
        roles = ("main", "read_replica")
        config["roles"] = {"main": {"pool_size": 1}, "read_replica": {"pool_size": 1}}
    if variant == "cache_unnamed":
        config["statements"] = {"cache_unnamed": True}
    return start_proxy(roles=roles, config=config)


def compare(
    pg: DevClusters, proxy: ProxyProcess, units: list[Unit], variant: str, disturb: Callable[[], bytes | None]
) -> None:
    """Run ``units`` directly and through ``proxy``, the table reset before each; their replies must match."""
    pg.main.psql(RESET, superuser=False)
    direct = run_direct(pg, units)
    pg.main.psql(RESET, superuser=False)
    if variant == "replica":
        pg.wait_replica_caught_up()
    try:
        proxied = run_proxied(proxy, units, disturb)
    except AssertionError as exc:  # no reply, or the connection closed: say where, with the proxy's log
        session = "\n".join(f"  {j}: {u.text}" for j, u in enumerate(units))
        raise AssertionError(f"{exc}\nsession:\n{session}\nproxy log:\n{proxy.log()[-4000:]}") from None
    for i, (unit, want, got) in enumerate(zip(units, direct, proxied, strict=True)):
        assert same(want, got), (
            f"unit {i} differs through the proxy\n  sent: {unit.text}\n"
            f"  direct:  {want}\n  proxied: {got}\nsession:\n"
            + "\n".join(f"  {j}: {u.text}" for j, u in enumerate(units))
        )


@pytest.mark.parametrize("variant", ["main", "replica", "cache_unnamed"])
def test_sessions_answer_as_postgresql_does(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess], diff_table: None, variant: str
) -> None:
    proxy = start(start_proxy, variant)

    @EXAMPLES
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        units = session(rng)

        def disturb() -> bytes | None:
            return rng.choice(DISTURBER_UNITS) if rng.random() < 0.7 else None

        compare(pg, proxy, units, variant, disturb)

    check()


# -- the differences the random sessions found, each as a script of its own --------------------------------
def _q(sql: str) -> Unit:
    return Unit(m.query(sql), 1, f"Query {sql!r}")


def _x(text: str, *messages: bytes) -> Unit:
    return Unit(b"".join(messages) + m.sync(), 1, text + " Sync")


_NO_PARAMS = b"\0\0\0\0\0\0"
SCRIPTS: dict[str, tuple[str, list[Unit]]] = {
    # The second client's settings were put back with RESETs whose ParameterStatus the session heard,
    # though nothing it knew had changed.
    "no-parameter-status-after-a-hand-over": ("main", [_q("SELECT 1"), _q("SELECT 1"), _q("SHOW TimeZone")]),
    # The proxy answered START TRANSACTION with PostgreSQL's tag for BEGIN.
    "start-transaction-tag": ("main", [_q("START TRANSACTION"), _q("SELECT 1"), _q("COMMIT")]),
    # A simple Query destroys the unnamed statement; the proxy kept the client's and parsed it again.
    "a-query-destroys-the-unnamed-statement": (
        "main",
        [
            _x("Parse '' 'SELECT 41'", m.parse("", "SELECT 41")),
            _q("SELECT 1"),
            _x("Bind '' '' Execute", m.bind_raw("", "", _NO_PARAMS), execute("", 0)),
        ],
    ),
    # A named Parse refused in a failed transaction stayed in the proxy's books.
    "a-failed-named-parse-makes-nothing": (
        "main",
        [
            _q("BEGIN"),
            _q("SELECT 1/0"),
            _x("Parse 'p1'", m.parse("p1", "SELECT 1")),
            _q("ROLLBACK"),
            _x("Bind '' 'p1' Execute", m.bind_raw("", "p1", _NO_PARAMS), execute("", 0)),
        ],
    ),
    # With statements.cache_unnamed, an unnamed Parse in a failed transaction was answered by the proxy.
    "cached-parse-in-a-failed-transaction": (
        "cache_unnamed",
        [
            _x(
                "Parse '' 'SELECT 7'", m.parse("", "SELECT 7"), m.bind_raw("", "", _NO_PARAMS), execute("", 0)
            ),
            _q("BEGIN"),
            _q("SELECT 1/0"),
            _x("Parse '' 'SELECT 7'", m.parse("", "SELECT 7")),
            _q("ROLLBACK"),
        ],
    ),
    # A Close of the unnamed statement left the client's in the proxy's books: parsed again for Describe.
    "close-of-the-unnamed-statement": (
        "main",
        [
            _x("Parse '' 'SELECT 8'", m.parse("", "SELECT 8")),
            _x("Close S '' Describe S ''", m.close(b"S", ""), m.describe(b"S", "")),
        ],
    ),
    # BEGIN READ ONLY inside a transaction (a warning) makes it read only; the proxy dropped its modes.
    "begin-read-only-inside-a-transaction": (
        "replica",
        [_q("START TRANSACTION"), _q("BEGIN READ ONLY"), _q(f"UPDATE {TABLE} SET v = 0"), _q("ROLLBACK")],
    ),
    # An error naming a prepared statement named it as upstream ("pf_..."), not as the client did.
    "errors-name-the-clients-statement": (
        "main",
        [
            _x("Parse 'p1' 'SELECT 1'", m.parse("p1", "SELECT 1")),
            _x("Bind '' 'p1' (1 param)", m.bind_raw("", "p1", b"\0\0\0\x01\0\0\0\x011\0\0")),
        ],
    ),
    # A setting made in a transaction that "COMMIT; SELECT 2" ended was dropped from the proxy's books
    # (it read the unit's last tag only), so the next hand-over put the old value back.
    "settings-kept-by-a-commit-among-other-statements": (
        "main",
        [_q("BEGIN"), _q("SET TimeZone = 'UTC'"), _q("COMMIT; SELECT 2"), _q("SHOW TimeZone")],
    ),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_scripts_answer_as_postgresql_does(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess], diff_table: None, script: str
) -> None:
    """Each script, with the second client taking the connection before every unit it can."""
    variant, units = SCRIPTS[script]
    proxy = start(start_proxy, variant)
    compare(pg, proxy, units, variant, lambda: DISTURBER_UNITS[2])
