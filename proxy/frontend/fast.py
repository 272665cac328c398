"""The fast path of one client connection: the common unit sent as it arrived, not cut into a ``Batch``.

A client's whole unit that needs nothing of the proxy but its route — a simple Query, or an unnamed
statement's [Parse] Bind [Describe portal] Execute Sync; no setting, savepoint, pin or ``/* route: */``
comment in it, and no transaction control but a COMMIT or ROLLBACK inside the upstream's transaction;
nothing paused, held by a migration, audited, replayed or waited for — from a client lingering on a
connection of the role it routes to, or inside a transaction on the connection it holds, goes upstream as
it is with one expectation. A read-your-writes read takes it when the replica lingered on may serve it
now. With ``statements.cache_unnamed``, a unit whose unnamed statement the connection keeps prepared
(``Statements.parse_unnamed_cached``) takes it too: its Bind renamed to the kept statement, the Parse
answered by the proxy (``send_kept``, send.py). A client holding no connection takes it as well
(``_fast_lease``): its unit is routed and counted as the slow path would, then goes on an idle connection,
or waits for one as a ``Batch`` marked whole, which ``send`` sends as it is when the connection handed
over needs nothing first. Its whole reply comes back through ``ReplyQueue.whole_unit``
(proxy/backend/expect.py). The message walks are compiled (proxy/protocol/scan.pyx).

A transaction's edges take it too. A lone BEGIN between transactions is answered here and deferred
(``_fast_begin``, as ``answer_control`` does in control.py); the unit after it is routed in the
transaction's mode and goes upstream behind that BEGIN (``send_whole``). The lone COMMIT or ROLLBACK of a
transaction that wrote on main carries read-your-writes' capture query in the same write (proxy/frontend/
ryw.py).

Everything the slow path (``ClientCore._messages`` ... ``send``, proxy/frontend/core.py and send.py) would
do for those bytes is done here too, books and counters included; tests/unit/test_fast_path.py runs the
same units both ways and compares. Anything else, and anything these functions are unsure of, returns
False having changed nothing, and takes the slow path.
"""

from __future__ import annotations

import struct

from proxy.backend.connection import ServerConnection
from proxy.consistency import REPLICA as ON_REPLICA
from proxy.consistency import Verdict
from proxy.frontend.control import unnamed_answered
from proxy.frontend.core import ClientCore
from proxy.frontend.leases import count_fallback, count_fallback_writes
from proxy.frontend.send import kept_statement, send_kept, send_whole, unnamed_destroyed
from proxy.frontend.session import PreparedStatement
from proxy.frontend.startup import READY
from proxy.frontend.txstate import BEGUN, Input, Lease, LeaseEv, Tx
from proxy.frontend.units import Batch
from proxy.protocol import messages as m
from proxy.protocol.framing import scan_messages
from proxy.protocol.scan import extended_unit
from proxy.router.classify import (
    INLINE_BYTES,
    TX_BEGIN,
    TX_BEGIN_READ_ONLY,
    Classification,
)
from proxy.router.policy import MAIN, WRITE, Decision
from proxy.router.policy import REPLICA as REPLICA_ROLE

_Q, _S, _P, _D, _B = b"QSPDB"
_IDLE = ord("I")
_OVERRIDE_START = (b"/", b" ", b"\t", b"\r", b"\n")
# States of TxState read on every unit, as module constants (a global is the cheapest look-up).
_READING = Input.READING
_LINGERING = Lease.LINGERING
_HELD = Lease.HELD
_NONE = Lease.NONE
_UPSTREAM_TX = Tx.UPSTREAM
_DEFERRED_FAILED = Tx.DEFERRED_FAILED
_UNLINGER = LeaseEv.UNLINGER
_LENGTH = struct.Struct("!I")
# The replies to an extended BEGIN the proxy answers, without and with a Describe of the portal.
_BEGUN_EXTENDED = m.parse_complete() + m.bind_complete() + BEGUN
_BEGUN_DESCRIBED = m.parse_complete() + m.bind_complete() + m.no_data() + BEGUN


def fast_unit(client: ClientCore, data: bytes) -> bool:
    """Send ``data`` as it is when it is one whole unit the fast path takes (see the module): True when it
    was sent (or waits for a connection, ``_fast_lease``), False (nothing changed) for the slow path."""
    tx = client.tx
    effects = client.effects
    if (  # the client's side: what no unit on the fast path may have (the slow path's business)
        client.buf
        or not 6 <= len(data) <= INLINE_BYTES
        or tx.tx is _DEFERRED_FAILED  # a deferred transaction a refusal failed
        or tx.input is not _READING
        or client.phase != READY
        or client.admin
        or client.reads.forced is not None  # a read routed after a wait: Reads.route
        or client.session.staged
        or effects.unnamed_changes
        or effects.stmt_changes
        or effects.portal_changes
    ):
        return False
    server = client.server
    if server is None:
        return _fast_lease(client, data)
    lease = tx.lease
    if (lease is not _LINGERING and (lease is not _HELD or server.status == _IDLE)) or server.expect:
        return False
    begin = tx.begin  # a BEGIN the proxy answered, to send with this unit
    if begin is not None and (lease is not _LINGERING or data[0] == _B):
        return False  # a Bind of the unnamed statement, which the deferred BEGIN would destroy first
    app = client.app
    role = client.server_role
    classifier = app.classifier
    counts = classifier.hits, classifier.misses  # a unit left to the slow path is counted there
    info: Classification | None = None
    kept: PreparedStatement | None = None
    decision: Decision | None = None
    try:  # whatever these raise, the slow path meets again and reports (``_guarded``)
        found = _fast_info(client, data, server)
        if found is not None:
            info, kept = found
            if lease is not _LINGERING:
                decision = _in_transaction(client, info, server)
            elif info.tx is not None:  # between transactions a lone BEGIN is answered here (the rest of
                if _fast_begin(client, data, info):  # transaction control by control.py: the slow path)
                    return True
            elif begin is None:
                decision = app.router.decide_plain(info)
            else:  # the first statement of a transaction whose BEGIN the proxy answered: sent with it
                decision = app.router.decide_uncounted(info, None, tx.begin_mode)
    except Exception:
        decision = None
    if (
        info is None
        or decision is None
        or decision.role != role
        # _held_back's four conditions, inline: a call here costs 0.04-0.08 us of the ~4.2 (bench hotpath)
        or (role == "compliance" and app.audit is not None)
        or app.migration.hold.roles
        or app.migration.shadow.active  # a read may be offered to the shadow reads: _count_route
        or app.is_paused(role)
        or len(server.prepared) > app.max_statements
        or server.applied != client.session.settings
        or (begin is not None and kept is not None)  # ``send_kept`` sends no deferred BEGIN
        or (lease is _LINGERING and role == REPLICA_ROLE and not _replica_now(client))  # (so last)
    ):
        classifier.hits, classifier.misses = counts
        return False
    _count(client, info, role, decision)
    if lease is _LINGERING:
        tx.lease_event(_UNLINGER)
        app.pools[client.server_pool].unlinger(server)
    if kept is not None:
        send_kept(client, server, data, kept, info)
    elif begin is not None:  # the BEGIN the proxy answered goes first
        send_whole(client, server, data, info, begin=tx.unit_sent() or b"")
    elif info.tx is not None and client.capture_behind(info):  # in the same write (see the module)
        send_whole(client, server, data, info, capture=client.new_capture(server))
    else:
        send_whole(client, server, data, info)
    return True


def _replica_now(client: ClientCore) -> bool:
    """For a read on the replica the client lingers on: read-your-writes lets it run there at once,
    counted as ``Reads.route`` counts it; else (a wait, main, another replica) it is the slow path's."""
    reads = client.reads
    if reads.key is None and reads.min_lsn is None:
        return True
    return reads.replica_now(client.app.consistency, client.server_pool)


def _held_back(client: ClientCore, role: str) -> bool:
    """A unit routed to ``role`` is the slow path's: audited, held or shadowed by a migration, paused."""
    app = client.app
    return bool(
        (role == "compliance" and app.audit is not None)
        or app.migration.hold.roles
        or app.migration.shadow.active  # a read may be offered to the shadow reads: _count_route
        or app.is_paused(role)
    )


def _fast_lease(client: ClientCore, data: bytes) -> bool:
    """For ``fast_unit``, past its client-side checks: a whole unit of a client holding no connection
    (``_dispatch_unit``'s case, core.py), routed and counted as there, then sent on an idle connection of
    its pool, or waiting for one (``Leasing``) as a ``Batch`` marked whole, which ``send`` sends as it is
    when the connection is handed over."""
    if client.tx.lease is not _NONE:
        return False
    app = client.app
    classifier = app.classifier
    counts = classifier.hits, classifier.misses
    try:
        found = _fast_info(client, data, None)
        if found is not None and found[0].tx is not None:
            if _fast_begin(client, data, found[0]):
                return True
            decision = None
        elif found is None:
            decision = None
        elif (mode := client.tx.begin_mode) is None:
            decision = app.router.decide_plain(found[0])
        else:  # the first statement of a transaction whose BEGIN the proxy answered: sent with it
            decision = app.router.decide_uncounted(found[0], None, mode)
    except Exception:
        found = decision = None
    role = None if decision is None else decision.role
    reads = client.reads
    verdict: Verdict | None = None
    if role == REPLICA_ROLE and (reads.key is not None or reads.min_lsn is not None):
        verdict = reads.replica_at_once(app.consistency)  # else a wait, or main: Reads.route's
        if verdict is None:
            role = None
    if found is None or decision is None or role is None or _held_back(client, role):
        classifier.hits, classifier.misses = counts
        return False
    info = found[0]
    if verdict is not None:
        app.consistency.count(ON_REPLICA)
    _count(client, info, role, decision)
    label = (verdict.label if verdict is not None else None) or app.pool_for(role)
    if data[0] == _Q:
        batch = Batch(data, [(_Q, 0, len(data))], 0, len(data), _Q)
    else:
        batch = Batch(data, scan_messages(data, 0, len(data))[0], 0, len(data), _S)
    batch.info = info
    batch.whole = True
    conn = app.pools[label].try_acquire()
    if conn is None:
        client.leasing.wait_for_pool(batch, role, label)
        return True
    client.leasing.send_on(batch, conn, role, label)
    return True


def _fast_begin(client: ClientCore, data: bytes, info: Classification) -> bool:
    """A lone BEGIN of a client between transactions (holding no connection, or lingering on one), as a
    Query or as an unnamed statement's Parse Bind [Describe] Execute Sync: answered here and deferred, as
    ``answer_control`` does (control.py), so that the transaction's first statement picks its upstream.
    False, nothing changed, for anything else (another unit, COMMIT or ROLLBACK outside a transaction, a
    pin)."""
    kind = info.tx
    tx = client.tx
    if (kind is not TX_BEGIN and kind is not TX_BEGIN_READ_ONLY) or tx.pin_reason is not None:
        return False
    if tx.tx is not _UPSTREAM_TX:
        return False  # a transaction of the proxy's already (then the client hears 25001): the slow path's
    first = data[0]
    if first == _Q:
        client.write(tx.transaction_control(kind, data, kind is TX_BEGIN_READ_ONLY, info.begin_tag))
        return True
    if first != _P or info.begin_tag != "BEGIN":
        return False  # a Bind of an earlier unnamed BEGIN, or a START TRANSACTION: the slow path's
    bind = _LENGTH.unpack_from(data, 1)[0] + 1
    sql_end = data.find(0, 6, bind)
    after_bind = bind + 1 + _LENGTH.unpack_from(data, bind + 1)[0]
    tx.defer_begin(m.query_bytes(data[6:sql_end]), kind is TX_BEGIN_READ_ONLY)  # (bounds checked by
    # extended_unit: the text is not decoded and encoded again)
    unnamed_answered(client, data[:bind], info, [])
    client.write(_BEGUN_DESCRIBED if data[after_bind] == _D else _BEGUN_EXTENDED)
    return True


def _count(client: ClientCore, info: Classification, role: str, decision: Decision) -> None:
    """What ``decide``, ``_dispatch_unit`` and ``_count_route`` (core.py) count for a unit sent to
    ``role``."""
    app = client.app
    kind = decision.kind
    app.router.note_joins(info)
    if decision.fallback_from:  # main serves these roles' tables (unconfigured, or down with fallback: main)
        count_fallback(app, decision.fallback_from)
        count_fallback_writes(app, decision.fallback_writes)
    routed = app.routed
    routed[role, kind] = routed.get((role, kind), 0) + 1
    if kind == WRITE and role == MAIN and client.reads.key is not None:
        client.reads.wrote = True  # its WAL position is captured when the unit (or its transaction) ends


def _in_transaction(client: ClientCore, info: Classification, server: ServerConnection) -> Decision | None:
    """For a unit inside the upstream's transaction on the connection the client holds, where
    ``check_in_transaction`` lets it run (a COMMIT or ROLLBACK goes as it is, as _dispatch_held sends it):
    the decision to count; None when it would be refused or go elsewhere."""
    router = client.app.router
    if client.tx.tx is not _UPSTREAM_TX or server.needs_sync or router.on_fallback:
        return None
    refusal, sent = router.in_transaction_cached(info, client.server_role)
    return sent if refusal is None else None


def _fast_info(
    client: ClientCore, data: bytes, server: ServerConnection | None
) -> tuple[Classification, PreparedStatement | None] | None:
    """For ``fast_unit``: the classification of a Query or of an unnamed statement's [Parse] Bind
    [Describe] Execute Sync that the fast path can send (on ``server``; None: a connection to lease, so
    no Bind without its Parse), and with ``statements.cache_unnamed`` the statement kept upstream that
    stands for the unnamed one (then on this connection already); None for anything else."""
    kept = None
    if data[0] == _Q:
        if _LENGTH.unpack_from(data, 1)[0] != len(data) - 1:
            return None
        st = client.statements
        if st.unnamed_token is not None or st.unnamed_stmt is not None:
            unnamed_destroyed(client)  # as ``dispatch`` does: a Query destroys it (the slow path's too)
        sql = data[5:-1]
        info = client.app.classifier.classify_bytes(sql)
    else:
        bind = extended_unit(data)
        if bind < 0:
            return None
        st = client.statements
        if bind:
            sql_end = data.find(0, 6, bind)
            if sql_end < 0:
                return None
            sql = data[6:sql_end]
            info = client.app.classifier.classify_bytes(sql)
            if info.plannable and client.app.cache_unnamed and server is not None:
                # as send and Statements.parse_unnamed_cached; with no connection yet, ``send`` decides
                # on the one handed over
                kept = kept_statement(client, server, data, bind)
                if kept is None:
                    return None  # to be prepared there: the slow path's
        else:
            if server is None:
                return None
            sql = b""
            unnamed = client.units.unnamed_info
            kept = st.unnamed_stmt
            if unnamed is None or (
                kept.upstream_name not in server.prepared
                if kept is not None
                else server.unnamed_owner is not st.unnamed_token
            ):
                return None
            info = unnamed
    if info.bits or sql[:1] in _OVERRIDE_START:
        return None  # session state, a savepoint, a pin, or a /* route: */ comment
    return info, kept
