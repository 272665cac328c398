"""One client's transaction and lease state, without I/O: what the proxy answers itself, and when the
upstream connection is kept, lent back or switched.

Everything that changes this state goes through ``TxState``: its three parts are explicit states (enums)
and each change is an event looked up in a transition table below (data, as h11's ``_state.py``; one door,
as PgBouncer's ``change_client_state``). An event the table does not allow raises ``IllegalTransition``.
``ClientConnection`` (proxy/frontend/client.py) asks this module what to do and performs the I/O: it
writes the replies returned here, sends, leases and releases connections.

The upstream connection's own transaction status (the last ReadyForQuery's I/T/E, ``ServerConnection.status``)
is not kept here: it changes with replies the proxy swallows too, so it is passed in where a decision
needs it.
"""

from __future__ import annotations

import enum
from collections.abc import Sized
from typing import Generic, TypeVar

from proxy.protocol import messages as m
from proxy.router.classify import TX_COMMIT, TX_ROLLBACK
from proxy.router.policy import TX_READ_ONLY, TX_READ_WRITE

_IDLE = ord("I")


class Tx(enum.Enum):
    """The part of the client's transaction the proxy answers for."""

    __hash__ = object.__hash__  # members are singletons: hashed by identity in C (see TX_TRANSITIONS)

    UPSTREAM = "upstream"  # nothing of the proxy's own: the upstream's ReadyForQuery status is the client's
    DEFERRED = "deferred"  # a BEGIN the proxy answered: sent with the next unit, which picks the upstream
    DEFERRED_FAILED = "deferred_failed"  # ... then a unit was refused: only ROLLBACK proceeds
    FAILED = "failed"  # the proxy refused a unit inside the upstream's transaction: only ROLLBACK proceeds


class Lease(enum.Enum):
    """The client's hold on an upstream connection."""

    __hash__ = object.__hash__  # as Tx's

    NONE = "none"
    HELD = "held"  # leased: a unit or a transaction runs on it
    LINGERING = "lingering"  # kept between transactions; the pool takes it back when another client asks
    PINNED = "pinned"  # session state only that connection has: held until the client leaves


class Input(enum.Enum):
    """What happens to the client's next batch. In the waiting states, reading from the client pauses
    once it sends more (``ClientCore.held_input``); their values are the pause reasons."""

    __hash__ = object.__hash__  # as Tx's

    READING = "reading"
    SKIPPING = "skipping"  # after an error the proxy reported in the extended protocol: ignore up to Sync
    CLASSIFY = "classify"  # a large statement is analysed by the classifier child
    ACQUIRE = "acquire"  # waiting for a pool's connection (or for RESUME of a paused role)
    SWITCH = "switch"  # the unit needs another upstream: once the connection held is done with this client
    CONSISTENCY = "consistency"  # read-your-writes: waiting for a replica to catch up
    RECHECK = "recheck"  # main marked down: waiting for one connect attempt into it
    CONSOLE = "console"  # the admin console: a command that asks a database (MIGRATE role PLAN)
    HOLD = "hold"  # a migration's cutover holds new transactions on the moving tables


class Ev(enum.Enum):
    """Transaction events."""

    __hash__ = object.__hash__  # as Tx's

    BEGIN = "BEGIN answered locally"
    END_LOCAL = "COMMIT/ROLLBACK of a deferred transaction answered locally"
    NO_TRANSACTION = "COMMIT/ROLLBACK with no transaction"
    UNIT_SENT = "unit sent (a deferred BEGIN goes with it)"
    REFUSED_IN_TX = "refusal inside a transaction"
    ROLLBACK = "ROLLBACK in a failed transaction proceeds"
    COMMIT_AS_ROLLBACK = "COMMIT in a failed transaction becomes ROLLBACK"
    READY_IDLE = "ReadyForQuery I"
    READY_IN_TX = "ReadyForQuery T or E"


class LeaseEv(enum.Enum):
    """Lease events."""

    __hash__ = object.__hash__  # as Tx's

    ATTACH = "attach"  # a connection from the pool
    PIN = "pin"
    LINGER = "linger"
    UNLINGER = "unlinger"  # the lingering client starts a unit on its connection again
    RECLAIM = "reclaim"  # the pool takes back a lingering connection
    RELEASE = "release"  # given back to the pool (or closed, when not reusable)


class IllegalTransition(RuntimeError):
    """An event the transition tables do not allow in the current state: a bug in the caller."""


_S = TypeVar("_S", bound=enum.Enum)
_E = TypeVar("_E", bound=enum.Enum)


class _Moves(dict[_E, _S]):
    """The transitions out of one state: looking up an event it has none for raises IllegalTransition
    (a dict, so that the lookup on every transaction stays a dict's)."""

    __slots__ = ("machine", "state")

    def __init__(self, machine: str, state: enum.Enum, moves: dict[_E, _S]) -> None:
        super().__init__(moves)
        self.machine = machine
        self.state = state

    def __missing__(self, event: _E) -> _S:
        raise IllegalTransition(f"{self.machine}: {event.value} in state {self.state.name}")


def _machine(name: str, table: dict[_S, dict[_E, _S]]) -> dict[_S, dict[_E, _S]]:
    return {state: _Moves(name, state, moves) for state, moves in table.items()}


D, DF, F, U = Tx.DEFERRED, Tx.DEFERRED_FAILED, Tx.FAILED, Tx.UPSTREAM
_LINGERING, _PINNED = Lease.LINGERING, Lease.PINNED

# The tables are looked up on every transaction: the states' and events' hash is object's (an Enum's
# own hashes its name in Python, ten times dearer).
TX_TRANSITIONS: dict[Tx, dict[Ev, Tx]] = _machine(
    "transaction",
    {
        U: {
            Ev.BEGIN: D,
            Ev.NO_TRANSACTION: U,
            Ev.UNIT_SENT: U,
            Ev.REFUSED_IN_TX: F,
            Ev.READY_IDLE: U,
            Ev.READY_IN_TX: U,
        },
        D: {
            Ev.BEGIN: D,  # "there is already a transaction in progress"
            Ev.END_LOCAL: U,
            Ev.UNIT_SENT: U,
            Ev.REFUSED_IN_TX: DF,
            Ev.READY_IDLE: D,
            Ev.READY_IN_TX: D,
        },
        DF: {
            Ev.BEGIN: DF,
            Ev.END_LOCAL: U,  # reported as ROLLBACK
            Ev.REFUSED_IN_TX: DF,
            Ev.ROLLBACK: D,
            Ev.COMMIT_AS_ROLLBACK: D,
            Ev.READY_IDLE: D,
            Ev.READY_IN_TX: DF,
        },
        F: {
            Ev.UNIT_SENT: F,
            Ev.REFUSED_IN_TX: F,
            Ev.ROLLBACK: U,
            Ev.COMMIT_AS_ROLLBACK: U,
            Ev.READY_IDLE: U,
            Ev.READY_IN_TX: F,
        },
    },
)

LEASE_TRANSITIONS: dict[Lease, dict[LeaseEv, Lease]] = _machine(
    "lease",
    {
        Lease.NONE: {LeaseEv.ATTACH: Lease.HELD},
        Lease.HELD: {LeaseEv.PIN: Lease.PINNED, LeaseEv.LINGER: Lease.LINGERING, LeaseEv.RELEASE: Lease.NONE},
        Lease.LINGERING: {
            LeaseEv.UNLINGER: Lease.HELD,
            LeaseEv.RECLAIM: Lease.NONE,
            LeaseEv.RELEASE: Lease.NONE,
        },
        Lease.PINNED: {LeaseEv.RELEASE: Lease.NONE},
    },
)

# ``TxState.ready``'s verdicts: what the client does with its lease after the upstream's ReadyForQuery.
STAY = "stay"  # keep the connection: a transaction is open, the client is pinned, or replies are in flight
NOTHING = "nothing"  # keep it for now: a batch waits, but not for this connection (classify, acquire...)
SWITCH = "switch"  # the waiting batch needs another upstream: release this one, dispatch the batch
BETWEEN = "between"  # between transactions: linger on it if the pool lets the client (else release it)

# ``TxState.failed_unit``'s verdicts.
PROCEED = "proceed"
ROLLBACK_INSTEAD = "rollback_instead"
IN_FAILED = "in_failed"

_ALREADY = m.notice_response("WARNING", "25001", "there is already a transaction in progress")
_NO_TRANSACTION = m.notice_response("WARNING", "25P01", "there is no transaction in progress")
BEGUN = m.command_complete("BEGIN") + m.ready_for_query(b"T")  # a BEGIN the proxy answered

B = TypeVar("B")


class TxState(Generic[B]):
    """See the module docstring. ``B`` is the caller's batch type (held, never looked into)."""

    __slots__ = ("begin", "begin_mode", "input", "lease", "pin_reason", "tx", "waiting")

    def __init__(self) -> None:
        self.tx = Tx.UPSTREAM
        self.lease = Lease.NONE
        self.input = Input.READING
        self.begin: bytes | None = None  # the deferred BEGIN's Query, sent with the next unit
        self.begin_mode: str | None = None  # TX_READ_WRITE or TX_READ_ONLY while a BEGIN is deferred
        self.pin_reason: str | None = None  # why the client was pinned (kept after the lease ends)
        self.waiting: B | None = None  # the batch the client waits with (Input's waiting states)

    # -- the doors ------------------------------------------------------------------------------------------
    def _go(self, event: Ev) -> Tx:
        self.tx = new = TX_TRANSITIONS[self.tx][event]  # IllegalTransition where the table has none
        return new

    def lease_event(self, event: LeaseEv) -> Lease:
        self.lease = new = LEASE_TRANSITIONS[self.lease][event]  # as _go
        return new

    # -- questions ------------------------------------------------------------------------------------------
    @property
    def failed(self) -> bool:
        """The proxy refused a unit in this transaction: to the client it is aborted."""
        return self.tx is F or self.tx is DF

    @property
    def lingering(self) -> bool:
        return self.lease is _LINGERING

    def status(self, upstream: int | None) -> bytes:
        """The transaction status for a ReadyForQuery the proxy makes itself (``upstream``: the held
        connection's status, None without one)."""
        tx = self.tx
        if tx is F or tx is DF:
            return b"E"
        if tx is D:
            return b"T"
        return b"I" if upstream is None else bytes([upstream])

    def stays_on_held(self, upstream: int, needs_sync: bool) -> bool:
        """With a connection held (not lingering): must the next unit run on it whatever it is? Inside a
        transaction, pinned, after a refusal, or after extended messages no Sync has ended yet."""
        return self.lease is _PINNED or upstream != _IDLE or self.tx is F or self.tx is DF or needs_sync

    def between_units(self, upstream: int | None, in_flight: bool) -> bool:
        """Nothing of the client's transaction is anywhere: no batch waits, no BEGIN deferred, and the
        connection (if any) lingers or is idle with nothing in flight."""
        if self.waiting is not None or self.begin is not None:
            return False
        return upstream is None or self.lease is _LINGERING or (upstream == _IDLE and not in_flight)

    # -- transaction events ---------------------------------------------------------------------------------
    def transaction_control(self, tx: str, begin: bytes, read_only: bool, tag: str = "BEGIN") -> bytes:
        """A lone simple-protocol BEGIN/COMMIT/ROLLBACK (``tx``: its TX_* kind) with no upstream in the
        transaction: the reply the proxy gives itself (``tag``: a BEGIN's command tag, "START TRANSACTION"
        for that statement). BEGIN is deferred: ``begin`` is sent with the next unit."""
        if tx in (TX_COMMIT, TX_ROLLBACK):
            if self.begin is None:
                self._go(Ev.NO_TRANSACTION)
                return _NO_TRANSACTION + m.command_complete(tx.upper()) + m.ready_for_query(b"I")
            return m.command_complete(self.end_deferred(tx)) + m.ready_for_query(b"I")
        begun = BEGUN if tag == "BEGIN" else m.command_complete(tag) + m.ready_for_query(b"T")
        return begun if self.defer_begin(begin, read_only) else _ALREADY + begun

    def end_deferred(self, tx: str) -> str:
        """COMMIT or ROLLBACK (``tx``) of a transaction whose BEGIN was deferred and never sent: it ends here.
        Returns the command tag (COMMIT of a failed transaction reports ROLLBACK, as PostgreSQL does)."""
        tag = "ROLLBACK" if self.failed else tx.upper()
        self._go(Ev.END_LOCAL)
        self.begin = self.begin_mode = None
        return tag

    def defer_begin(self, begin: bytes, read_only: bool) -> bool:
        """A BEGIN the proxy answers; False when one was deferred already (the client hears 25001): this one
        then goes upstream behind it, in the same Query, so that its transaction modes take effect as on
        PostgreSQL (a BEGIN READ ONLY inside a transaction makes it read only)."""
        self._go(Ev.BEGIN)
        if self.begin is not None:
            # (a line comment in the first ends at the newline)
            self.begin = m.query_bytes(self.begin[5:-1] + b"\n;" + begin[5:-1])
            if read_only:
                self.begin_mode = TX_READ_ONLY
            return False
        self.begin = begin
        self.begin_mode = TX_READ_ONLY if read_only else TX_READ_WRITE
        return True

    def unit_sent(self) -> bytes | None:
        """A unit goes upstream: the deferred BEGIN to send before it, if any (the transaction starts
        there)."""
        if self.tx is U and self.begin is None:
            return None  # the common case, without a table look-up
        self._go(Ev.UNIT_SENT)
        begin, self.begin, self.begin_mode = self.begin, None, None
        return begin

    def refused(self, in_transaction: bool) -> None:
        """A unit could not run (a refusal, or no connection); inside a transaction that aborts it."""
        if in_transaction:
            self._go(Ev.REFUSED_IN_TX)

    def failed_unit(self, rollback: bool, commit_on_held: bool) -> str:
        """A unit in a failed transaction: ``PROCEED`` (ROLLBACK or ROLLBACK TO SAVEPOINT: the transaction
        is usable again), ``ROLLBACK_INSTEAD`` (a lone simple COMMIT with a connection held: send ROLLBACK,
        as PostgreSQL turns COMMIT of a failed transaction into one) or ``IN_FAILED`` (25P02)."""
        if rollback:
            self._go(Ev.ROLLBACK)
            return PROCEED
        if commit_on_held:
            self._go(Ev.COMMIT_AS_ROLLBACK)
            return ROLLBACK_INSTEAD
        return IN_FAILED

    def ready(self, status: int, in_flight: Sized) -> str:
        """The held connection's ReadyForQuery reached the client (``status``: its I/T/E; ``in_flight``:
        the replies still expected on it). Returns what the client does with the lease: ``STAY``,
        ``NOTHING``, ``SWITCH`` or ``BETWEEN``."""
        if status != _IDLE:
            self._go(Ev.READY_IN_TX)
            return STAY
        if self.tx is not U:
            self._go(Ev.READY_IDLE)
        if self.lease is _PINNED or in_flight:
            return STAY
        if self.waiting is not None:
            return SWITCH if self.input is Input.SWITCH else NOTHING
        return BETWEEN

    # -- input ----------------------------------------------------------------------------------------------
    def wait(self, batch: B, reason: Input) -> None:
        """``batch`` waits (reading from the client paused for ``reason.value`` once it sends more)."""
        if self.input is not Input.READING:
            raise IllegalTransition(f"input: a batch waits for {reason.name} in state {self.input.name}")
        self.waiting = batch
        self.input = reason

    def go_on(self) -> None:
        """The waiting batch goes on (dispatched again, or answered with an error)."""
        self.waiting = None
        self.input = Input.READING

    def skip_until_sync(self) -> None:
        self.input = Input.SKIPPING

    def synced(self) -> None:
        self.input = Input.READING

    # -- lease events ---------------------------------------------------------------------------------------
    def pin(self, reason: str) -> None:
        self.lease_event(LeaseEv.PIN)
        self.pin_reason = reason


__all__ = [
    "BEGUN",
    "BETWEEN",
    "IN_FAILED",
    "LEASE_TRANSITIONS",
    "NOTHING",
    "PROCEED",
    "ROLLBACK_INSTEAD",
    "STAY",
    "SWITCH",
    "TX_TRANSITIONS",
    "Ev",
    "IllegalTransition",
    "Input",
    "Lease",
    "LeaseEv",
    "Tx",
    "TxState",
]
