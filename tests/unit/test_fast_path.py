"""The fast path (``fast_unit`` in proxy/frontend/fast.py, ``ReplyQueue.whole_unit`` in
proxy/backend/expect.py) against the slow path it short-cuts: the same units and replies, driven through an
in-process client and upstream connection once as they are and once with the fast path switched off, must
give the same bytes upstream and to the client, and leave the same state behind. Each scenario also says
which of its units the fast path takes, so a change that quietly sends everything down the slow path (or
takes a unit it must not) fails here."""

from __future__ import annotations

import asyncio
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest

from proxy.backend.connection import ServerConnection
from proxy.backend.expect import ReplyQueue
from proxy.config import load_config
from proxy.dev.testing import MemoryTransport
from proxy.frontend import client as client_module
from proxy.frontend.client import READY, ClientConnection
from proxy.frontend.ryw import IDENTITY_QUERY
from proxy.frontend.session import PreparedStatement
from proxy.protocol import messages as m
from proxy.protocol.framing import startup_message
from proxy.server import ProxyApp

SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
ROWS = m.row_description([("abalance", 23)]) + b"D" + struct.pack("!IhI", 11, 1, 1) + b"0"


def _ready(status: bytes = b"I") -> bytes:
    return m.ready_for_query(status)


def _select(status: bytes = b"I") -> bytes:
    return ROWS + m.command_complete("SELECT 1") + _ready(status)


def _extended(sql: str = SQL, *, parse: bool = True, describe: bool = True, value: bytes = b"1") -> bytes:
    tail = struct.pack("!hhI", 0, 1, len(value)) + value + struct.pack("!h", 0)
    out = m.parse("", sql, ()) if parse else b""
    out += m.bind_raw("", "", tail)
    if describe:
        out += m.describe(b"P", "")
    return out + b"E" + struct.pack("!I", 9) + b"\0" + struct.pack("!I", 0) + m.sync()


def _extended_reply(*, parse: bool = True, describe: bool = True, status: bytes = b"I") -> bytes:
    out = (m.parse_complete() if parse else b"") + m.bind_complete()
    if describe:
        out += m.row_description([("abalance", 23)])
    return out + b"D" + struct.pack("!IhI", 11, 1, 1) + b"0" + m.command_complete("SELECT 1") + _ready(status)


def _error(status: bytes = b"I", code: str = "42P01") -> bytes:
    message = (
        b"cached plan must not change result type\0RRevalidateCachedQuery"
        if code == "0A000"
        else b"it failed"
    )
    fields = b"SERROR\0VERROR\0C" + code.encode() + b"\0M" + message + b"\0\0"
    return b"E" + struct.pack("!I", len(fields) + 4) + fields + _ready(status)


def _bind_complete_then_error(code: str) -> bytes:
    return m.bind_complete() + _error(code=code)


def _retried() -> bytes:
    """The replies to the stale-plan retry: the Close and Parse (swallowed), then the batch's own."""
    return m.close_complete() + m.parse_complete() + _extended_reply(parse=False)


def _notice() -> bytes:
    fields = b"SNOTICE\0VNOTICE\000C00000\0Mhello\0\0"
    return b"N" + struct.pack("!I", len(fields) + 4) + fields


def _update() -> bytes:
    return m.command_complete("UPDATE 1") + _ready()


def _capture() -> bytes:
    """The reply to the proxy's read of main's WAL position after a write (proxy/frontend/ryw.py)."""
    lsn = b"0/3000060"
    row = b"D" + struct.pack("!IhI", 4 + 2 + 4 + len(lsn), 1, len(lsn)) + lsn
    return (
        m.row_description([("pg_current_wal_insert_lsn", 3220)])
        + row
        + m.command_complete("SELECT 1")
        + _ready()
    )


def _ended() -> bytes:
    """The replies to an extended COMMIT (END) unit."""
    return m.parse_complete() + m.bind_complete() + m.command_complete("COMMIT") + _ready()


JOIN = "SELECT u.email, count(*) FROM users u JOIN user_activity a ON a.user_id = u.id GROUP BY u.email"


def _begun_update() -> bytes:
    """The replies to a deferred BEGIN (swallowed) and the statement sent with it."""
    return m.command_complete("BEGIN") + _ready(b"T") + m.command_complete("UPDATE 1") + _ready(b"T")


WITH_REPLICA = frozenset({"read your writes"})
WITH_CACHE = frozenset({"statements.cache_unnamed"})
# Scenarios: (client bytes, the upstream reply or None when nothing goes upstream, fast path taken?).
Step = tuple[bytes, bytes | list[bytes] | None, bool]
# With several clients: which client sends (b"" for none: only the replies come).
Turn = tuple[int, bytes, bytes | list[bytes] | None, bool]
SCENARIOS: dict[str, list[Step]] = {
    "simple autocommit reads": [
        (m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 1"), _select(), True),  # leases
        (m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 2"), _select(), True),
        (m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 3"), _notice() + _select(), True),
    ],
    "extended unnamed statements": [
        (_extended(), _extended_reply(), True),  # leases
        (_extended(value=b"2"), _extended_reply(), True),
        (_extended(parse=False, describe=False), _extended_reply(parse=False, describe=False), True),
        (_extended("SELECT 1", describe=False), _extended_reply(describe=False), True),
        # An extended BEGIN, lingering: answered here (with and without a Describe), a second one warned
        # of (25001: the slow path), sent with the first statement, which picks the upstream.
        (_extended("BEGIN", value=b""), None, True),
        (_extended("BEGIN ISOLATION LEVEL REPEATABLE READ", describe=False, value=b""), None, False),
        (
            _extended(value=b"3"),
            m.command_complete("BEGIN") + _ready(b"T") + _extended_reply(status=b"T"),
            True,
        ),
        (_extended("END", describe=False, value=b""), _ended(), True),
        (_extended("BEGIN", describe=False, value=b""), None, True),
        (_extended("END", describe=False, value=b""), None, False),  # nothing ran: answered here
    ],
    "a transaction": [
        (m.query("SELECT 1"), _select(), True),
        (m.query("BEGIN"), None, True),  # answered by the proxy, sent with the next statement
        (
            m.query("UPDATE pgbench_accounts SET abalance = 1 WHERE aid = 1"),
            # the deferred BEGIN's reply (swallowed), then the UPDATE's
            m.command_complete("BEGIN") + _ready(b"T") + m.command_complete("UPDATE 1") + _ready(b"T"),
            True,
        ),
        (m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 1"), _select(b"T"), True),
        (_extended(), _extended_reply(status=b"T"), True),
        (m.query("SELECT nope FROM missing"), _error(b"E"), True),
        (m.query("SELECT 1"), _error(b"E"), True),  # 25P02 from the server, as on a direct connection
        (m.query("COMMIT"), m.command_complete("ROLLBACK") + _ready(), True),  # inside: as it is
        (m.query("SELECT 2"), _select(), True),
        (m.query("COMMIT"), None, False),  # no transaction: the proxy answers (a warning, then COMMIT)
        (m.query("BEGIN"), None, True),
        (m.query("UPDATE users SET email = email WHERE id = 1"), _begun_update(), True),
        (_extended("ROLLBACK", describe=False), _extended_reply(describe=False), True),
        (m.query("BEGIN READ ONLY"), None, True),
        (m.query("SELECT 1"), m.command_complete("BEGIN") + _ready(b"T") + _select(b"T"), True),
        (m.query("COMMIT"), m.command_complete("COMMIT") + _ready(), True),
    ],
    "settings and errors": [
        (m.query("SELECT 1"), _select(), True),
        (m.query("SET search_path TO public"), m.command_complete("SET") + _ready(), False),
        (m.query("SELECT 2"), _select(), True),
        (m.query("SELECT nope FROM missing"), _error(), True),  # the reply's error: feed, not whole_unit
        (m.query("/* route: main */ SELECT 3"), _select(), False),
        (m.query("SELECT 4"), _select(), True),
    ],
    "pipelines and messages in pieces": [
        (m.query("SELECT 1"), _select(), True),
        (m.query("SELECT 2") + m.query("SELECT 3"), _select() + _select(), False),  # two units: cut
        (m.query("SELECT 4")[:6], None, False),  # half a message: buffered
        (m.query("SELECT 4")[6:], _select(), False),  # the rest, joined on the slow path
        (_extended()[:-5], None, False),  # no Sync yet
        (m.sync(), _extended_reply(), False),
        (m.query("SELECT 5"), _select(), True),
    ],
    "read your writes": [  # a replica configured: reads go there, writes to main, then their capture
        (m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 1"), _select(), True),  # leases
        (m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 2"), _select(), True),  # no write yet
        (_extended(), _extended_reply(), True),
        (m.query("UPDATE pgbench_accounts SET abalance = 1 WHERE aid = 1"), [_update(), _capture()], False),
        (m.query("UPDATE pgbench_accounts SET abalance = 2 WHERE aid = 1"), [_update(), _capture()], True),
        (m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 3"), _select(), False),  # must see it
        # Main served that read (no replica known to have replayed the write, and max_wait 0): the next
        # read routes to the replica, not to the connection held: the slow path again.
        (m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 4"), _select(), False),
        # A write transaction's COMMIT, simple and extended: the capture goes in the same write on the
        # fast path (test_commit_and_capture_in_one_write), after the COMMIT's reply on the slow path.
        (m.query("BEGIN"), None, True),
        (m.query("UPDATE pgbench_accounts SET abalance = 3 WHERE aid = 1"), _begun_update(), True),
        (m.query("COMMIT"), [m.command_complete("COMMIT") + _ready(), _capture()], True),
        (m.query("BEGIN"), None, True),
        (m.query("UPDATE pgbench_accounts SET abalance = 4 WHERE aid = 1"), _begun_update(), True),
        (_extended("END", describe=False, value=b""), [_ended(), _capture()], True),
        # A read-only transaction routes to the replica, which must have replayed the writes first (the
        # slow path: Reads.route sends it to main, max_wait 0)
        (m.query("BEGIN READ ONLY"), None, True),
        (m.query("SELECT 1"), m.command_complete("BEGIN") + _ready(b"T") + _select(b"T"), False),
        (m.query("COMMIT"), m.command_complete("COMMIT") + _ready(), True),
    ],
    "a join a move would refuse": [  # analytics has no URL: main serves user_activity, joins are counted
        (m.query(JOIN), _select(), True),
        (m.query(JOIN), _select(), True),
        (_extended(JOIN, parse=True), _extended_reply(), True),
        (m.query("BEGIN"), None, True),
        (m.query("UPDATE users SET email = email WHERE id = 1"), _begun_update(), True),
        (m.query(JOIN), _select(b"T"), True),
        (m.query("COMMIT"), m.command_complete("COMMIT") + _ready(), True),
    ],
    "statements.cache_unnamed": [  # the unnamed statement kept prepared upstream
        (_extended(), m.close_complete() + _extended_reply(), True),  # leases; send prepares it there
        (_extended(value=b"2"), _extended_reply(parse=False), True),  # the proxy answers the Parse
        (_extended(parse=False, describe=False), _extended_reply(parse=False, describe=False), True),
        (_extended(value=b"3"), _bind_complete_then_error("22012"), True),  # Execute fails: kept
        (
            _extended(value=b"4"),
            [_error(code="0A000"), _retried()],
            True,
        ),  # stale plan: prepared again, unseen
        (_extended(value=b"x"), _error(code="22P02"), True),  # the Bind fails: forgotten on this connection
        (_extended(), m.close_complete() + _extended_reply(), False),  # prepared again: the slow path
        (_extended("SHOW work_mem", describe=False), _extended_reply(describe=False), True),  # not kept
        (m.query("BEGIN"), None, True),
        (m.query("UPDATE users SET email = email WHERE id = 1"), _begun_update(), True),
        (_extended(), _extended_reply(parse=False, status=b"T"), True),  # in a transaction: no retry
        (m.query("COMMIT"), m.command_complete("COMMIT") + _ready(), True),
        # Kept, behind a deferred BEGIN: the slow send (``send_kept`` sends no BEGIN)
        (m.query("BEGIN"), None, True),
        (
            _extended(value=b"6"),
            m.command_complete("BEGIN") + _ready(b"T") + _extended_reply(parse=False, status=b"T"),
            False,
        ),
        (m.query("COMMIT"), m.command_complete("COMMIT") + _ready(), True),
    ],
    "replies in pieces": [
        (m.query("SELECT 1"), _select(), True),
        (m.query("SELECT 2"), _select()[:7], True),  # the rest never comes in this scenario
    ],
}


def _app(replica: bool, cache: bool = False) -> ProxyApp:
    env = {"DATABASE_URL": "postgresql://bench@127.0.0.1:1/bench"}
    # analytics has no URL: main serves its tables, and counts the joins a move would refuse
    text = "auth:\n  method: trust\ndomains:\n  analytics: [user_activity]\n"
    if replica:  # read-your-writes on (scope user), never waiting: a read that must see a write goes to main
        env["READ_REPLICA_DATABASE_URL"] = "postgresql://bench@127.0.0.1:2/bench"
        text += "routing:\n  read_your_writes:\n    max_wait: 0\n"
    if cache:
        text += "statements:\n  cache_unnamed: true\n"
    with tempfile.TemporaryDirectory(prefix="parafort-fastpath-") as tmp:
        path = Path(tmp) / "proxy.yaml"
        path.write_text(text)
        config = load_config(path, env)
    app = ProxyApp(config)
    app._parameters = {"server_version": "15.0", "client_encoding": "UTF8"}
    return app


def _upstream(app: ProxyApp, label: str) -> tuple[ServerConnection, MemoryTransport]:
    """One idle connection in ``label``'s pool, writing to memory."""
    server = ServerConnection(app.pool_roles[label], app.upstreams[label], label)
    transport = MemoryTransport()
    server.connection_made(transport)  # type: ignore[arg-type]
    pool = app.pools[label]
    pool.size = pool._total = 1  # a second client waits for it (HANDOVERS)
    pool._idle.append(server)
    return server, transport


async def _login(app: ProxyApp) -> tuple[ClientConnection, MemoryTransport]:
    client = ClientConnection(app)
    downstream = MemoryTransport()
    client.connection_made(downstream)  # type: ignore[arg-type]
    client.data_received(startup_message({"user": "bench", "database": "bench"}))
    for _ in range(100):
        if client.phase == READY:
            break
        await asyncio.sleep(0)
    assert client.phase == READY
    downstream.writes.clear()
    return client, downstream


def _client_state(client: ClientConnection) -> dict[str, Any]:
    return {
        "lease": client.tx.lease,
        "tx": client.tx.tx,
        "input": client.tx.input,
        "begin": (client.tx.begin, client.tx.begin_mode),
        "server": client.server_pool if client.server is not None else None,
        "unnamed": client.statements.unnamed,
        "settings": dict(client.session.settings),
        "reads": (client.reads.wrote, client.app.consistency.writes.tokens.get(client.reads.key)),
        "kept": None
        if client.statements.unnamed_stmt is None
        else client.statements.unnamed_stmt.upstream_name,
    }


async def _run(  # noqa: PLR0917  (a test driver)
    turns: list[Turn],
    fast: bool,
    monkeypatch: pytest.MonkeyPatch,
    replica: bool,
    cache: bool = False,
    clients: int = 1,
) -> dict[str, Any]:
    """Drive ``turns`` with the fast path on or off: what went upstream and to each client per turn, and
    the state left."""
    taken: list[bool] = []
    with monkeypatch.context() as patch:
        real = client_module.fast_unit

        def counted(client: ClientConnection, data: bytes) -> bool:
            took = fast and real(client, data)
            taken.append(took)
            return took

        patch.setattr(client_module, "fast_unit", counted)
        if not fast:
            patch.setattr(ReplyQueue, "whole_unit", lambda self, buf: False)
        app = _app(replica, cache)
        upstreams = {label: _upstream(app, label) for label in app.pools}
        logged_in = [await _login(app) for _ in range(clients)]
        record: list[tuple[object, ...]] = []
        for who, request, replies, _ in turns:
            taken.clear()
            if request:
                logged_in[who][0].data_received(request)
            for reply in [replies] if isinstance(replies, bytes) else replies or []:
                # Each reply goes to the upstream connection that awaits one (a capture follows a write).
                server = next(conn for conn, _ in upstreams.values() if conn.expect)
                server.data_received(reply)
                for _ in range(3):  # a connection handed over (Pool.release: call_soon)
                    await asyncio.sleep(0)
            sent = {label: b"".join(transport.writes) for label, (_, transport) in upstreams.items()}
            for _, transport in upstreams.values():
                transport.writes.clear()
            answers = tuple(b"".join(downstream.writes) for _, downstream in logged_in)
            record.append((sent, answers, "fast" if any(taken) else "slow"))
            for _, downstream in logged_in:
                downstream.writes.clear()
        state: dict[str, Any] = {
            "clients": [_client_state(client) for client, _ in logged_in],
            "routed": dict(app.routed),
            "consistency": dict(app.consistency.outcomes),
            # statements a move of a role main serves would refuse, counted once per unit sent
            "joins": {key: seen.count for key, seen in app.joins.seen.items()},
            "fallbacks": dict(app.fallbacks),
            "statement events": dict(app.statement_events),
        }
        for label, (server, _) in upstreams.items():
            state[label] = (
                server.status,
                [(e.kind, e.action, e.extended) for e in server.expect],
                [server.unnamed_owner is client.statements.unnamed_token for client, _ in logged_in],
                len(app.pools[label]._lingering),
                len(app.pools[label]._waiters),
                dict(server.applied),
                list(server.prepared),
            )
        return {"record": record, "state": state}


def _compare(turns: list[Turn], monkeypatch: pytest.MonkeyPatch, **kw: Any) -> dict[str, Any]:
    slow = asyncio.run(_run(turns, False, monkeypatch, **kw))
    fast = asyncio.run(_run(turns, True, monkeypatch, **kw))
    assert [r[:2] for r in fast["record"]] == [r[:2] for r in slow["record"]]
    assert fast["state"] == slow["state"]
    assert [r[2] == "fast" for r in fast["record"]] == [took for *_, took in turns]
    return slow


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fast_path_sends_and_answers_what_the_slow_path_does(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    turns = [(0, *step) for step in SCENARIOS[name]]
    replica, cache = name in WITH_REPLICA, name in WITH_CACHE
    slow = _compare(turns, monkeypatch, replica=replica, cache=cache)
    if replica:
        assert slow["state"]["routed"].get(("read_replica", "read"), 0) > 0, "no read reached the replica"


Q1, Q2 = (m.query(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}") for aid in (1, 2))
# Two clients, one connection per pool: a unit of a client holding none takes an idle or lingering one,
# or waits for it and goes when the other client's reply hands it over.
HANDOVERS: dict[str, list[Turn]] = {
    "a lingering connection taken, then a hand-over": [
        (0, Q1, _select(), True),  # an idle connection
        (1, Q2, _select(), True),  # client 0's lingering one
        (0, Q1, None, True),  # takes it back; its reply comes later
        (1, _extended(), None, True),  # waits (reading paused)
        (0, b"", [_select(), _extended_reply()], False),  # client 0's reply hands it to client 1
        (1, _extended(value=b"2"), _extended_reply(), True),  # lingering
    ],
    "a hand-over to a client whose settings the connection lacks": [
        (0, m.query("SET search_path TO public"), m.command_complete("SET") + _ready(), False),
        (1, _extended(), None, True),  # takes it: RESET search_path first (the slow send)
        (0, Q1, None, True),  # waits
        # RESET's reply (swallowed), client 1's, then the hand-over: SET search_path sent before Q1
        (
            1,
            b"",
            [m.command_complete("RESET") + _ready(), _extended_reply(), m.command_complete("SET") + _ready()],
            False,
        ),
        (0, b"", _select(), False),
        (0, Q2, _select(), True),
    ],
    "a hand-over inside a transaction": [
        (0, m.query("BEGIN"), None, True),
        (0, m.query("UPDATE users SET email = email WHERE id = 1"), _begun_update(), True),
        (1, Q1, None, True),  # waits for the transaction's end
        (0, m.query("COMMIT"), [m.command_complete("COMMIT") + _ready(), _select()], True),
    ],
    "statements.cache_unnamed across clients": [
        (0, _extended(), m.close_complete() + _extended_reply(), True),  # prepared on the connection taken
        (1, _extended(value=b"2"), _extended_reply(parse=False), True),  # kept there: the proxy answers Parse
        (0, _extended(value=b"3"), None, True),
        (1, _extended(value=b"4"), None, True),  # waits
        (0, b"", [_extended_reply(parse=False), _extended_reply(parse=False)], False),  # kept: handed over
        # Lingering, a statement not kept there yet: prepared on the slow path
        (
            1,
            _extended("SELECT 1", describe=False),
            m.close_complete() + _extended_reply(describe=False),
            False,
        ),
        (0, _extended(value=b"5"), _extended_reply(parse=False), True),  # takes it: kept there
    ],
    "read-your-writes reads of clients holding no connection": [
        (0, Q1, _select(), True),  # the replica's connection: no write yet
        (1, m.query("UPDATE pgbench_accounts SET abalance = 1 WHERE aid = 1"), [_update(), _capture()], True),
        # Client 0 must see that write (no replica known to have replayed it, max_wait 0): main, taken
        # from client 1 (Reads.route); then client 1, holding none, must too: taken back.
        (0, Q2, _select(), False),
        (1, Q1, _select(), False),
    ],
}


@pytest.mark.parametrize("name", sorted(HANDOVERS))
def test_fast_lease_and_hand_over_match_the_slow_path(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    replica, cache = "read-your-writes" in name, "cache_unnamed" in name
    _compare(HANDOVERS[name], monkeypatch, replica=replica, cache=cache, clients=2)


@pytest.mark.parametrize("together", [False, True], ids=["replies apart", "replies together"])
@pytest.mark.parametrize(
    "commit", [m.query("COMMIT"), _extended("END", describe=False, value=b"")], ids=["simple", "extended"]
)
def test_commit_and_capture_in_one_write(commit: bytes, together: bool) -> None:
    """The COMMIT of a write transaction on main, on the fast path: read-your-writes' capture query goes
    upstream in the same write; the COMMIT's ReadyForQuery waits for the capture's reply, so the client
    hears its new position before it (in the same write when both replies come in one read), and the
    connection lingers only once the capture's reply is in."""

    async def run() -> None:
        app = _app(replica=True)
        server, upstream = _upstream(app, "main")
        client, downstream = await _login(app)
        client.data_received(m.query("BEGIN"))
        client.data_received(m.query("UPDATE pgbench_accounts SET abalance = 3 WHERE aid = 1"))
        server.data_received(_begun_update())
        upstream.writes.clear()
        downstream.writes.clear()
        client.data_received(commit)
        assert upstream.writes == [commit + IDENTITY_QUERY]  # the first capture reads main's identity too
        ended = _ended() if commit[0] == ord("P") else m.command_complete("COMMIT") + _ready()
        position = m.parameter_status("parafort.write_lsn", "0/3000060")
        if together:
            server.data_received(ended + _capture())
            assert downstream.writes == [ended[:-6] + position + _ready()]
        else:
            server.data_received(ended)
            assert downstream.writes == [ended[:-6]]  # its ReadyForQuery waits for the capture's reply
            assert client.app.consistency.writes.pending == {client.reads.key: 1}
            assert client.server is server and not client.lingering
            server.data_received(_capture())
            assert downstream.writes == [ended[:-6], position + _ready()]
        assert client.app.consistency.writes.tokens[client.reads.key] == 0x3000060
        assert client.lingering

    asyncio.run(run())


# CPython 3.11 shares a class's instance-dict keys among its instances for up to 30 names; an instance with
# more has a dict of its own, and every attribute access on it becomes a hash look-up (ServerConnection at
# 31 names cost bench hotpath's simple transaction 1,670 instructions). Objects read on every unit stay
# under it, or use slots.
SHARED_KEYS_MAX = 30


def test_data_path_objects_keep_attribute_access_specialised() -> None:
    async def run() -> None:
        app = _app(replica=False, cache=True)
        server, _ = _upstream(app, "main")
        client, _ = await _login(app)
        client.data_received(m.query("SELECT 1"))
        server.data_received(_select())
        assert client.lingering
        assert not hasattr(server, "__dict__")  # slots: ServerConnection and ReplyQueue
        objects = [client, client.tx, client.reads, client.session, client.statements, client.units]
        objects += [client.effects, client.leasing, app.router, app.classifier, app.pools["main"]]
        for obj in objects:
            if hasattr(obj, "__dict__"):
                assert len(vars(obj)) <= SHARED_KEYS_MAX, type(obj).__name__

    asyncio.run(run())


class _Pausable(MemoryTransport):
    """A client's transport that records whether reading from it is paused."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.pauses = 0

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


@pytest.mark.parametrize("pipelined", [False, True], ids=["sends nothing more", "sends more"])
def test_a_waiting_client_pauses_reading_only_when_it_sends_more(pipelined: bool) -> None:
    """A client whose unit waits for a connection is not paused (a pause and a resume per waiting
    transaction cost the event loop two changes of its epoll set); what it sends meanwhile is kept, reading
    paused, and goes upstream after its unit once the connection is handed over, reading resumed."""

    async def run() -> None:
        app = _app(replica=False)
        server, upstream = _upstream(app, "main")
        holder, _ = await _login(app)
        waiter, _ = await _login(app)
        transport = _Pausable()
        waiter.transport = transport  # type: ignore[assignment]
        holder.data_received(Q1)
        waiter.data_received(Q2)  # the pool's one connection is the holder's: waits
        assert waiter.tx.waiting is not None
        assert transport.pauses == 0
        if pipelined:
            waiter.data_received(Q1)
            assert (transport.paused, waiter.buf) == (True, Q1)
        upstream.writes.clear()
        server.data_received(_select())  # the holder's reply: the connection is handed over
        for _ in range(3):
            await asyncio.sleep(0)
        assert server.sink is waiter and not transport.paused
        assert b"".join(upstream.writes) == (Q2 + Q1 if pipelined else Q2)
        server.data_received(_select() + _select() if pipelined else _select())
        assert b"".join(transport.writes) == (_select() + _select() if pipelined else _select())
        assert transport.pauses == int(pipelined)

    asyncio.run(run())


def test_an_error_names_the_clients_statements_as_the_client_does() -> None:
    """``client_names``: a named statement by the client's name, the unnamed one the proxy kept by "", a
    table of the user's whose name starts with "pf_" left alone."""

    async def run() -> None:
        app = _app(replica=False, cache=True)
        client, _ = await _login(app)
        named = PreparedStatement.make("SELECT 1", ())
        kept = PreparedStatement.make("SELECT 2", ())
        client.session.statements["mine"] = named
        client.statements.unnamed_stmt = kept
        text = (
            f'statement "{named.upstream_name}", statement "{kept.upstream_name}", constraint "pf_diff_pkey"'
        )
        error = m.error_response("ERROR", "08P01", text)
        renamed = client.client_names(error)
        fields = m.parse_fields(renamed[5:])
        assert fields["M"] == 'statement "mine", statement "", constraint "pf_diff_pkey"'
        assert struct.unpack_from("!I", renamed, 1)[0] == len(renamed) - 1

    asyncio.run(run())
