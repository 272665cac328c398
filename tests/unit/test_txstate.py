"""The transaction and lease state machine (proxy/frontend/txstate.py), driven without sockets.

Each row is a story: steps fed to a fresh ``TxState``, what each step returns, and the states it ends in.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.frontend.txstate import (
    BETWEEN,
    IN_FAILED,
    LEASE_TRANSITIONS,
    NOTHING,
    PROCEED,
    ROLLBACK_INSTEAD,
    STAY,
    SWITCH,
    TX_TRANSITIONS,
    Ev,
    IllegalTransition,
    Input,
    Lease,
    LeaseEv,
    Tx,
    TxState,
)
from proxy.protocol import messages as m

BEGIN_SQL = m.query("BEGIN")
BEGIN_OK = m.command_complete("BEGIN") + m.ready_for_query(b"T")
ALREADY = m.notice_response("WARNING", "25001", "there is already a transaction in progress")
NO_TX = m.notice_response("WARNING", "25P01", "there is no transaction in progress")
BATCH = "the waiting batch"


def run(state: TxState[str], step: tuple[Any, ...]) -> object:
    """Feed one step; returns what the state machine answered (None for a step that answers nothing)."""
    name, *args = step
    if name == "control":  # a lone simple-protocol BEGIN / COMMIT / ROLLBACK, no upstream in the transaction
        return state.transaction_control(args[0], BEGIN_SQL, read_only=args[0] == "begin read only")
    if name == "extended begin":  # Parse/Bind/Execute of BEGIN alone up to Sync
        return state.defer_begin(BEGIN_SQL, read_only=False)
    if name == "send":
        return state.unit_sent()
    if name == "refused":
        state.refused(in_transaction=args[0])
        return None
    if name == "failed unit":
        return state.failed_unit(rollback=args[0] == "rollback", commit_on_held=args[0] == "commit")
    if name == "ready":  # ReadyForQuery with status args[0]; args[1]: replies still expected after it
        return state.ready(ord(args[0]), [None] * args[1])
    if name == "wait":
        state.wait(BATCH, args[0])
        return None
    if name == "go on":
        state.go_on()
        return None
    if name == "skip":
        state.skip_until_sync()
        return None
    if name == "sync":
        state.synced()
        return None
    if name == "pin":
        state.pin(args[0])
        return None
    if name == "status":
        return state.status(None if args[0] is None else ord(args[0]))
    if name == "held stays":  # with a connection held: must the unit run on it? (status, needs_sync)
        return state.stays_on_held(ord(args[0]), args[1])
    if name == "between units":
        return state.between_units(None if args[0] is None else ord(args[0]), args[1])
    return state.lease_event(LeaseEv[name.upper()])


# (story, [(step, what it returns)], final transaction state, final lease, final input state)
ROWS: list[tuple[str, list[tuple[tuple[Any, ...], object]], Tx, Lease, Input]] = [
    (
        "deferred BEGIN: answered here, sent with the first statement on the upstream it picks",
        [
            (("control", "begin"), BEGIN_OK),
            (("status", None), b"T"),
            (("between units", None, False), False),
            (("attach",), Lease.HELD),
            (("send",), BEGIN_SQL),
            (("send",), None),  # the next unit of the transaction: nothing deferred any more
            (("ready", "T", 0), STAY),
            (("held stays", "T", False), True),
            (("ready", "I", 0), BETWEEN),
        ],
        Tx.UPSTREAM,
        Lease.HELD,
        Input.READING,
    ),
    (
        "BEGIN twice, then COMMIT: a warning, and the transaction that never reached an upstream ends here",
        [
            (("control", "begin read only"), BEGIN_OK),
            (("control", "begin"), ALREADY + BEGIN_OK),
            (("extended begin",), False),
            (("control", "commit"), m.command_complete("COMMIT") + m.ready_for_query(b"I")),
            (("status", None), b"I"),
        ],
        Tx.UPSTREAM,
        Lease.NONE,
        Input.READING,
    ),
    (
        "COMMIT and ROLLBACK with no transaction: PostgreSQL's warning, nothing sent",
        [
            (("control", "commit"), NO_TX + m.command_complete("COMMIT") + m.ready_for_query(b"I")),
            (("control", "rollback"), NO_TX + m.command_complete("ROLLBACK") + m.ready_for_query(b"I")),
            (("send",), None),
        ],
        Tx.UPSTREAM,
        Lease.NONE,
        Input.READING,
    ),
    (
        "extended BEGIN deferred like a simple one",
        [
            (("extended begin",), True),
            (("extended begin",), False),  # the client hears 25001; its modes would apply: sent too
            (("status", None), b"T"),
            (("attach",), Lease.HELD),
            (("send",), m.query("BEGIN\n;BEGIN")),
        ],
        Tx.UPSTREAM,
        Lease.HELD,
        Input.READING,
    ),
    (
        "failed transaction upstream: only ROLLBACK proceeds",
        [
            (("attach",), Lease.HELD),
            (("ready", "T", 0), STAY),
            (("refused", True), None),
            (("status", "T"), b"E"),
            (("held stays", "I", False), True),
            (("failed unit", "select"), IN_FAILED),
            (("failed unit", "rollback"), PROCEED),
            (("status", "T"), b"T"),
        ],
        Tx.UPSTREAM,
        Lease.HELD,
        Input.READING,
    ),
    (
        "failed transaction upstream: COMMIT becomes ROLLBACK, and its ReadyForQuery I ends it",
        [
            (("attach",), Lease.HELD),
            (("ready", "T", 0), STAY),
            (("refused", True), None),
            (("failed unit", "commit"), ROLLBACK_INSTEAD),
            (("ready", "I", 0), BETWEEN),
        ],
        Tx.UPSTREAM,
        Lease.HELD,
        Input.READING,
    ),
    (
        "a refusal outside a transaction fails nothing",
        [(("refused", False), None), (("status", None), b"I")],
        Tx.UPSTREAM,
        Lease.NONE,
        Input.READING,
    ),
    (
        "failed deferred transaction: its COMMIT is reported as ROLLBACK",
        [
            (("control", "begin"), BEGIN_OK),
            (("refused", True), None),
            (("status", None), b"E"),
            (("control", "begin"), ALREADY + BEGIN_OK),
            (("control", "commit"), m.command_complete("ROLLBACK") + m.ready_for_query(b"I")),
        ],
        Tx.UPSTREAM,
        Lease.NONE,
        Input.READING,
    ),
    (
        "failed deferred transaction: ROLLBACK TO SAVEPOINT makes it usable again",
        [
            (("control", "begin"), BEGIN_OK),
            (("refused", True), None),
            (("failed unit", "rollback"), PROCEED),
            (("status", None), b"T"),
        ],
        Tx.DEFERRED,
        Lease.NONE,
        Input.READING,
    ),
    (
        "switching upstreams between transactions: the next unit waits until the first is done with us",
        [
            (("attach",), Lease.HELD),
            (("held stays", "I", False), False),  # between units: routed afresh
            (("wait", Input.SWITCH), None),
            (("ready", "I", 1), STAY),  # a pipelined unit still in flight
            (("ready", "I", 0), SWITCH),
            (("go on",), None),
            (("release",), Lease.NONE),
            (("attach",), Lease.HELD),
            (("send",), None),
        ],
        Tx.UPSTREAM,
        Lease.HELD,
        Input.READING,
    ),
    (
        "a batch waiting for something else keeps the connection held",
        [
            (("attach",), Lease.HELD),
            (("wait", Input.CLASSIFY), None),
            (("ready", "I", 0), NOTHING),
            (("between units", "I", False), False),
            (("go on",), None),
        ],
        Tx.UPSTREAM,
        Lease.HELD,
        Input.READING,
    ),
    (
        "lingering: kept between transactions, taken up again by the client",
        [
            (("attach",), Lease.HELD),
            (("ready", "I", 0), BETWEEN),
            (("linger",), Lease.LINGERING),
            (("between units", "I", True), True),
            (("unlinger",), Lease.HELD),
            (("ready", "I", 0), BETWEEN),
            (("linger",), Lease.LINGERING),
            (("release",), Lease.NONE),
        ],
        Tx.UPSTREAM,
        Lease.NONE,
        Input.READING,
    ),
    (
        "lingering, reclaimed by the pool for another client",
        [
            (("attach",), Lease.HELD),
            (("linger",), Lease.LINGERING),
            (("control", "begin"), BEGIN_OK),
            (("reclaim",), Lease.NONE),
            (("attach",), Lease.HELD),
            (("send",), BEGIN_SQL),
        ],
        Tx.UPSTREAM,
        Lease.HELD,
        Input.READING,
    ),
    (
        "pinned: the connection stays, between transactions too",
        [
            (("attach",), Lease.HELD),
            (("pin", "LISTEN"), None),
            (("ready", "I", 0), STAY),
            (("held stays", "I", False), True),
            (("status", "I"), b"I"),
        ],
        Tx.UPSTREAM,
        Lease.PINNED,
        Input.READING,
    ),
    (
        "pause: a new transaction on a paused role waits (reading paused) until RESUME, then leases",
        [
            (("attach",), Lease.HELD),
            (("linger",), Lease.LINGERING),
            (("control", "begin"), BEGIN_OK),
            (("release",), Lease.NONE),  # the lingering connection goes back before the wait
            (("wait", Input.ACQUIRE), None),
            (("between units", None, False), False),
            (("go on",), None),  # RESUME: the pool hands a connection over
            (("attach",), Lease.HELD),
            (("send",), BEGIN_SQL),
        ],
        Tx.UPSTREAM,
        Lease.HELD,
        Input.READING,
    ),
    (
        "an error the proxy reported in an extended batch: skip to Sync",
        [
            (("skip",), None),
            (("sync",), None),
            (("wait", Input.ACQUIRE), None),
            (("go on",), None),
            (("skip",), None),  # the batch that waited failed (no connection): skip to its Sync
        ],
        Tx.UPSTREAM,
        Lease.NONE,
        Input.SKIPPING,
    ),
    (
        "the upstream's own transaction status is what the client hears otherwise",
        [
            (("status", "E"), b"E"),
            (("status", "T"), b"T"),
            (("held stays", "E", False), True),
            (("held stays", "I", True), True),  # extended messages without a Sync yet
        ],
        Tx.UPSTREAM,
        Lease.NONE,
        Input.READING,
    ),
]


@pytest.mark.parametrize(
    ("steps", "tx", "lease", "input_state"),
    [pytest.param(steps, tx, lease, inp, id=story) for story, steps, tx, lease, inp in ROWS],
)
def test_story(steps: list[tuple[tuple[Any, ...], object]], tx: Tx, lease: Lease, input_state: Input) -> None:
    state: TxState[str] = TxState()
    for i, (step, expected) in enumerate(steps):
        assert run(state, step) == expected, f"step {i}: {step}"
    assert (state.tx, state.lease, state.input) == (tx, lease, input_state)
    assert (state.begin is not None) == (state.tx in (Tx.DEFERRED, Tx.DEFERRED_FAILED))
    assert (state.waiting is not None) == (state.input not in (Input.READING, Input.SKIPPING))


ILLEGAL: list[tuple[str, list[tuple[Any, ...]], tuple[Any, ...]]] = [
    ("unlinger without lingering", [("attach",)], ("unlinger",)),
    ("attach twice", [("attach",)], ("attach",)),
    ("linger while pinned", [("attach",), ("pin", "temp table")], ("linger",)),
    ("pin without a connection", [], ("pin", "LISTEN")),
    ("reclaim while held", [("attach",)], ("reclaim",)),
    ("release without a connection", [], ("release",)),
    ("COMMIT becomes ROLLBACK outside a failed transaction", [], ("failed unit", "commit")),
    ("a second batch waits", [("wait", Input.ACQUIRE)], ("wait", Input.SWITCH)),
    ("a batch waits while skipping to Sync", [("skip",)], ("wait", Input.CLASSIFY)),
    ("the deferred BEGIN of a failed transaction sent", [("control", "begin"), ("refused", True)], ("send",)),
]


@pytest.mark.parametrize(("before", "step"), [pytest.param(b, s, id=n) for n, b, s in ILLEGAL])
def test_illegal_transitions_raise(before: list[tuple[Any, ...]], step: tuple[Any, ...]) -> None:
    state: TxState[str] = TxState()
    for earlier in before:
        run(state, earlier)
    with pytest.raises(IllegalTransition):
        run(state, step)


def test_tables_name_every_state_and_only_known_events() -> None:
    assert set(TX_TRANSITIONS) == set(Tx)
    assert set(LEASE_TRANSITIONS) == set(Lease)
    for table, events in ((TX_TRANSITIONS, Ev), (LEASE_TRANSITIONS, LeaseEv)):
        for moves in table.values():
            assert set(moves) <= set(events)  # type: ignore[arg-type]
    # Every event can happen somewhere, and every state can be reached.
    assert {e for moves in TX_TRANSITIONS.values() for e in moves} == set(Ev)
    assert {s for moves in TX_TRANSITIONS.values() for s in moves.values()} == set(Tx)
    assert {e for moves in LEASE_TRANSITIONS.values() for e in moves} == set(LeaseEv)
    assert {s for moves in LEASE_TRANSITIONS.values() for s in moves.values()} == set(Lease)
