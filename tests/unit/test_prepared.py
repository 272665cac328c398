"""Prepared-statement bookkeeping (proxy/frontend/prepared.py) on an upstream connection with no socket:
what goes out, what is expected back, and what the connection's books say."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from proxy.backend.connection import ServerConnection
from proxy.backend.expect import (
    FORWARD,
    K_BIND,
    K_CLOSE,
    K_PARSE,
    K_SYNC,
    K_SYNTH,
    SWALLOW,
    SWALLOW_OK,
    Expect,
)
from proxy.config.dsn import parse_dsn
from proxy.frontend import prepared
from proxy.frontend.prepared import (
    Piece,
    StalePlanRetry,
    Statements,
    bind_header,
    forget_on_failure,
    prepare,
)
from proxy.frontend.session import PreparedStatement
from proxy.protocol import messages as m

SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
STMT = PreparedStatement.make(SQL, (23,))


@dataclass
class Ctx:
    unnamed_statements: dict[bytes, PreparedStatement] = field(default_factory=dict)
    max_statements: int = 2
    statement_events: dict[tuple[str, str], int] = field(default_factory=dict)


class Wire:
    """The upstream's transport: what the connection wrote."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def server() -> ServerConnection:
    conn = ServerConnection("main", parse_dsn("postgresql://u@127.0.0.1:1/d"), "main")
    conn.transport = Wire()  # type: ignore[assignment]
    return conn


def shape(ents: list[prepared.Entry]) -> list[tuple[int, int]]:
    """(kind, action) of each expectation; a plain int stands for a forwarded reply of that kind."""
    return [(e.kind, e.action) if isinstance(e, Expect) else (e, FORWARD) for e in ents]


def test_prepare_is_close_then_parse_and_books_it() -> None:
    conn, out, ents, events = server(), [], [], {}  # type: ignore[var-annotated]
    prepare(conn, STMT, SWALLOW_OK, out, ents, events=events)
    assert b"".join(out) == m.close(b"S", STMT.upstream_name) + m.parse(STMT.upstream_name, SQL, (23,))
    assert shape(ents) == [(K_CLOSE, SWALLOW), (K_PARSE, SWALLOW_OK)]
    assert list(conn.prepared) == [STMT.upstream_name]
    assert events == {("main", "prepared"): 1}
    parse = ents[1]
    assert isinstance(parse, Expect) and parse.on_done is not None
    parse.on_done(False)  # the Parse failed: the books forget it
    assert conn.prepared == {}


def test_ensure_prepares_once_and_keeps_the_most_recently_used_last() -> None:
    conn, st = server(), Statements(Ctx())
    other = PreparedStatement.make("SELECT 2", ())
    out: list[Piece] = []
    ents: list[prepared.Entry] = []
    assert st.ensure(conn, STMT, out, ents) is True
    assert st.ensure(conn, other, out, ents) is True
    assert shape(ents) == [(K_CLOSE, SWALLOW), (K_PARSE, SWALLOW_OK)] * 2
    out.clear()
    ents.clear()
    assert st.ensure(conn, STMT, out, ents) is False  # already there: nothing sent
    assert (out, ents) == ([], [])
    assert list(conn.prepared) == [other.upstream_name, STMT.upstream_name]


def test_named_parse_closes_first_even_when_the_connection_has_it() -> None:
    """asyncpg re-prepares after "cached plan must not change result type": the Parse reaches the server."""
    ctx = Ctx()
    conn, st = server(), Statements(ctx)
    conn.prepared[STMT.upstream_name] = None
    out: list[Piece] = []
    ents: list[prepared.Entry] = []
    named: dict[str, PreparedStatement] = {}
    st.parse_named(conn, m.parse("s1", SQL, (23,))[5:], named, out, ents)
    assert named == {"s1": STMT}
    assert b"".join(out) == m.close(b"S", STMT.upstream_name) + m.parse(STMT.upstream_name, SQL, (23,))
    assert shape(ents) == [(K_CLOSE, SWALLOW), (K_PARSE, FORWARD)]  # the client's own ParseComplete
    assert ctx.statement_events == {("main", "prepared"): 1}


def test_a_failed_named_parse_leaves_the_books_as_they_were() -> None:
    """PostgreSQL makes nothing of a Parse that fails (or is skipped after an error, or refused in an aborted
    transaction): the client has no statement by that name, and the connection's books drop the upstream
    one."""
    conn, st = server(), Statements(Ctx())
    named: dict[str, PreparedStatement] = {}
    out: list[Piece] = []
    ents: list[prepared.Entry] = []
    st.parse_named(conn, m.parse("s1", SQL, (23,))[5:], named, out, ents)
    assert named == {"s1": STMT} and STMT.upstream_name in conn.prepared
    parse = ents[-1]
    assert isinstance(parse, Expect) and parse.on_done is not None
    parse.on_done(False)
    assert named == {}
    assert STMT.upstream_name not in conn.prepared


def test_a_parse_of_a_name_the_client_has_is_refused_by_postgresql() -> None:
    """42P05 as on the client's own server: the Parse goes upstream under the upstream name of the statement
    the client has (prepared there first when the connection lacks it), and PostgreSQL refuses it; the
    books do not change."""
    other = PreparedStatement.make("SELECT 2", ())
    conn, st = server(), Statements(Ctx())
    named = {"s1": other}
    out: list[Piece] = []
    ents: list[prepared.Entry] = []
    st.parse_named(conn, m.parse("s1", SQL, (23,))[5:], named, out, ents)
    assert named == {"s1": other}
    assert b"".join(out) == (
        m.close(b"S", other.upstream_name)
        + m.parse(other.upstream_name, other.sql, ())
        + m.parse(other.upstream_name, SQL, (23,))
    )
    assert shape(ents)[-1] == (K_PARSE, FORWARD)


def test_cached_unnamed_parse_is_answered_by_the_proxy_when_the_connection_has_it() -> None:
    ctx = Ctx()
    conn, st = server(), Statements(ctx)
    payload = m.parse("", SQL, ())[5:]
    out: list[Piece] = []
    ents: list[prepared.Entry] = []
    st.parse_unnamed_cached(conn, payload, out, ents)
    stmt = st.unnamed_stmt
    assert stmt is not None and st.unnamed is None
    assert shape(ents) == [(K_CLOSE, SWALLOW), (K_PARSE, FORWARD)]
    out.clear()
    ents.clear()
    st.parse_unnamed_cached(conn, payload, out, ents)
    assert out == []
    assert len(ents) == 1 and isinstance(ents[0], Expect)
    assert (ents[0].kind, ents[0].data) == (K_SYNTH, m.parse_complete())
    assert st.unnamed_stmt is stmt  # one PreparedStatement per distinct payload, shared by all clients
    assert ctx.statement_events == {("main", "prepared"): 1, ("main", "reused"): 1}


def test_the_shared_unnamed_cache_is_bounded() -> None:
    ctx = Ctx()
    ctx.unnamed_statements = {str(i).encode(): STMT for i in range(prepared.UNNAMED_CACHE_SIZE)}
    st = Statements(ctx)
    st.parse_unnamed_cached(server(), m.parse("", "SELECT 1", ())[5:], [], [])
    assert len(ctx.unnamed_statements) == 1


def test_claiming_the_unnamed_statement_never_uses_another_clients() -> None:
    conn, st = server(), Statements(Ctx())
    out: list[Piece] = []
    ents: list[prepared.Entry] = []
    st.claim_unnamed(conn, out, ents)  # this client never parsed one: the connection's goes
    assert out == [m.close(b"S", "")] and shape(ents) == [(K_CLOSE, SWALLOW)]
    raw = m.parse("", SQL, ())
    st.answered_locally(raw)  # as send (send.py) does for an unnamed Parse it sends as it is
    conn.unnamed_owner = st.unnamed_token
    assert conn.unnamed_owner is st.unnamed_token
    other = server()
    out.clear()
    ents.clear()
    st.claim_unnamed(other, out, ents)  # on another connection: parsed again, its success swallowed
    assert out == [raw] and shape(ents) == [(K_PARSE, SWALLOW_OK)]
    assert other.unnamed_owner is st.unnamed_token
    st.answered_locally(m.parse("", "BEGIN", ()))  # a deferred BEGIN: no connection has it
    assert conn.unnamed_owner is not st.unnamed_token and st.unnamed == m.parse("", "BEGIN", ())


def test_eviction_closes_the_least_recently_used_beyond_the_limit() -> None:
    ctx = Ctx(max_statements=2)
    conn, st = server(), Statements(ctx)
    for name in ("a", "b", "c", "d"):
        conn.prepared[name] = None
    out: list[Piece] = []
    st.evict(conn, out)
    assert out == [m.close(b"S", "a"), m.close(b"S", "b")]
    assert [(e.kind, e.action) for e in conn.expect] == [(K_CLOSE, SWALLOW)] * 2
    assert list(conn.prepared) == ["c", "d"]
    assert ctx.statement_events == {("main", "evicted"): 2}


def test_forget_on_failure_only_forgets_on_failure() -> None:
    conn = server()
    conn.prepared["x"] = None
    done = forget_on_failure(conn, "x")
    done(True)
    assert "x" in conn.prepared
    done(False)
    assert "x" not in conn.prepared


@dataclass
class Batch:
    buf: bytes
    msgs: list[tuple[int, int, int]]
    end: int
    terminator: int


def batch(*messages: bytes) -> Batch:
    msgs = []
    pos = 0
    for msg in messages:
        msgs.append((msg[0], pos, pos + len(msg)))
        pos += len(msg)
    return Batch(b"".join(messages), msgs, pos, messages[-1][0])


BIND = m.bind_raw("", "", struct.pack("!hhI", 0, 1, 1) + b"7" + struct.pack("!h", 0))
EXECUTE = b"E" + struct.pack("!I", 9) + b"\0" + struct.pack("!I", 0)


def test_stale_plan_retry_applies_to_a_lone_bind_up_to_sync() -> None:
    parse = m.parse("", SQL, ())
    for msgs, bind_index, applies in (
        ((parse, BIND, m.describe(b"P", ""), EXECUTE, m.sync()), 1, True),
        ((BIND, EXECUTE, m.sync()), 0, True),
        ((BIND, EXECUTE, m.flush()), 0, False),  # no Sync: nothing to resend up to
        ((BIND, EXECUTE, BIND, EXECUTE, m.sync()), 0, False),  # a second Bind would run twice
        ((m.parse("named", SQL, ()), BIND, EXECUTE, m.sync()), 1, False),
    ):
        b = batch(*msgs)
        _, start, end = b.msgs[bind_index]
        retry = StalePlanRetry(server(), STMT, (start, end), b, {})
        assert retry.applies() is applies, msgs


def test_stale_plan_retry_prepares_afresh_and_sends_the_rest_of_the_batch() -> None:
    conn, events = server(), {}  # type: ignore[var-annotated]
    b = batch(BIND, EXECUTE, m.sync())
    _, start, end = b.msgs[0]
    StalePlanRetry(conn, STMT, (start, end), b, events)()
    name = STMT.upstream_name
    bind = bind_header(STMT, end - start) + STMT.name_field + BIND[7:]
    assert bind == m.bind_raw("", name, BIND[7:])
    wire = conn.transport
    assert isinstance(wire, Wire)
    assert wire.sent == [m.close(b"S", name) + m.parse(name, SQL, (23,)) + bind + EXECUTE + m.sync()]
    assert [(e.kind, e.action) for e in conn.expect] == [
        (K_CLOSE, SWALLOW),
        (K_PARSE, SWALLOW_OK),
        (K_BIND, FORWARD),
        (K_SYNC, FORWARD),
    ]
    assert conn.expect[-1].extended
    assert events == {("main", "prepared_again_after_ddl"): 1}
