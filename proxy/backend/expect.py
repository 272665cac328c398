"""The reply queue of one upstream connection (sans-IO): what to do with each response PostgreSQL sends.

While a connection is leased, every message the proxy sends upstream is matched by an ``Expect`` entry that
says what to do with its response: forward it to the client, swallow it (replies to statements the proxy
injected), or answer the client from the proxy itself (a synthesized ParseComplete/CloseComplete for a
statement this connection already has). A client batch that needs none of that costs one entry per Sync or
Query. ``ReplyQueue.feed`` reads message headers only (bodies only of errors, settings and captured rows);
the bytes go to the ``Sink`` (the leasing client) unchanged, in one call per read.

No transport, no asyncio, no socket: ``ServerConnection`` (connection.py) is the asyncio adapter built on
this core, as asyncpg's protocol is built on its ``CoreProtocol``.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from proxy.errors import PROTOCOL_VIOLATION, ProxyError
from proxy.protocol import messages as m
from proxy.protocol.scan import begun_reply, capture_row, captured_reply, whole_reply

log = logging.getLogger("parafort.backend")

_HEADER = struct.Struct("!BI")
MAX_BACKEND_MESSAGE = 1 << 30

# Response-unit kinds: which frontend message an expectation belongs to.
K_SYNC = 0  # Sync, Query or FunctionCall: everything up to and including ReadyForQuery
K_PARSE = 1
K_BIND = 2
K_DESCRIBE = 3
K_EXECUTE = 4
K_CLOSE = 5
K_SYNTH = 6  # no upstream message: emit ``data`` to the client when reached

# Actions.
FORWARD = 0  # the client's own message: its responses go to the client
SWALLOW = 1  # injected by the proxy: drop its responses, errors included (logged)
SWALLOW_OK = 2  # injected re-Parse: drop its success, but forward its error (the client's Bind will fail)

# The messages that end the unit of each kind (K_SYNC's ends at ReadyForQuery).
_END = {
    K_PARSE: frozenset(b"1E"),
    K_BIND: frozenset(b"2E"),
    K_DESCRIBE: frozenset(b"TnE"),
    K_EXECUTE: frozenset(b"CIsE"),
    K_CLOSE: frozenset(b"3E"),
}
_Z, _E, _C, _S, _N, _A, _G, _D = b"ZECSNAGD"
_UPSTREAM_NAME = b'"pf_'  # how an error names a prepared statement upstream (PreparedStatement.make)
_READ_WHEN_SWALLOWED = frozenset(b"SDE")  # what an injected message's reply is read for (see _injected)
_STOP = -1  # _error's answer for a FATAL error: the backend exits, nothing after it matters


@dataclass(slots=True)
class Expect:
    """What to do with the response to one message sent upstream (or a synthesized reply)."""

    kind: int
    action: int = FORWARD
    data: bytes = b""  # K_SYNTH: the bytes to send
    on_done: Callable[[bool], None] | None = None  # called with ok=True/False when the unit ends
    extended: bool = False  # K_SYNC: a Sync (not a Query): a COPY FROM STDIN makes the server ignore it
    # A Bind of a statement the proxy kept prepared: if PostgreSQL reports that its cached plan changed
    # result type, this re-prepares and re-sends the rest of the batch (the client sees no error).
    retry: Retry | None = None
    # A query the proxy injected whose result it reads (read-your-writes' WAL position after a write): its
    # DataRow payloads go here, and its ReadyForQuery ends the unit for the sink as the client's own would.
    on_row: Callable[[bytes], None] | None = None

    def extended_copy(self) -> bool:
        """Whether a CopyInResponse under this entry comes from an extended-protocol Execute."""
        return self.kind != K_SYNC or self.extended


# The expectation of a batch that needs nothing else (a Query or FunctionCall; a Sync), shared by every
# such batch: entries in the queue are never changed in place (``_copy_in_started`` and the stale-plan
# retry replace theirs), so one object can stand for all of them, allocated once.
PLAIN_QUERY = Expect(K_SYNC)
PLAIN_SYNC = Expect(K_SYNC, extended=True)
# The ParseComplete the proxy answers for an unnamed Parse of a statement the connection keeps (with
# statements.cache_unnamed), shared as the two above.
SYNTH_PARSE_COMPLETE = Expect(K_SYNTH, data=m.parse_complete())
# A BEGIN the proxy answered itself, sent in front of its transaction's first unit (``send_whole``,
# proxy/frontend/send.py): its reply is dropped. Shared as the ones above.
SWALLOWED_BEGIN = Expect(K_SYNC, SWALLOW)


class Retry(Protocol):
    """Sends a batch again after its first statement failed in a way the proxy can repair unseen."""

    def applies(self) -> bool: ...

    def __call__(self) -> None: ...


class Sink(Protocol):
    """The leasing client, as the upstream connection sees it."""

    def upstream_data(self, data: bytes | bytearray | memoryview) -> None: ...

    def upstream_ready(self, status: int) -> None: ...

    def upstream_batch_end(self) -> None: ...

    def upstream_error_seen(self, fields_payload: bytes) -> None: ...

    def upstream_command_tag(self, tag: bytes) -> None: ...

    def upstream_lost(self, exc: ProxyError) -> None: ...

    def upstream_pause(self, paused: bool) -> None: ...

    @property
    def heard(self) -> dict[str, str]: ...  # each reported parameter's value as the client last heard it

    def client_names(self, error: bytes) -> bytes: ...  # statements named as the client names them


class ReplyQueue:
    """The expectations of one upstream connection and the routing of its replies; see the module.

    ``push`` registers an entry per message sent; ``feed(buf)`` routes the complete messages in ``buf`` and
    returns how many bytes it consumed (the rest is an incomplete message, for the next call). What goes
    to the client (runs of ``buf`` and synthesized replies, in order) is gathered and given to
    ``sink.upstream_data`` once per call, or before the lease can end at ReadyForQuery
    (``sink.upstream_ready``). A bad length or a message nothing explains raises ProxyError 08P01; a
    FATAL error stops the routing and is kept as ``farewell`` (the backend is exiting).

    State the adapter and the client read: ``status`` (the last ReadyForQuery's transaction status),
    ``expect`` (the queue), ``sink`` (the leasing client, or None), ``needs_sync``, ``farewell`` and
    ``farewell_forwarded`` (the client got it as the reply to its own message), ``parameters`` (the
    backend's ParameterStatus values).
    """

    __slots__ = (
        "_held_ready",
        "_out",
        "_track_details",
        "expect",
        "farewell",
        "farewell_forwarded",
        "label",
        "needs_sync",
        "parameters",
        "sink",
        "status",
    )

    def __init__(self, label: str) -> None:
        self.label = label  # role name or replica name, for messages and metrics
        self.parameters: dict[str, str] = {}
        self.status = ord("I")
        self.expect: deque[Expect] = deque()
        self.sink: Sink | None = None
        self._track_details = False  # the sink wants ErrorResponse fields and CommandComplete tags
        # Extended-protocol messages were sent with no Sync after them: after an error the server would
        # ignore everything up to a Sync, so the connection must not serve anyone else in this state.
        # Cleared at a ReadyForQuery once no such messages remain queued.
        self.needs_sync = False
        # The backend's last word: an ErrorResponse (FATAL: it is exiting) that ended this connection, and
        # whether the leasing client already got it as the reply to its own message.
        self.farewell: bytes | None = None
        self.farewell_forwarded = False
        # The ReadyForQuery of a client's unit with read-your-writes' capture queued right behind it: it
        # goes to the client after the capture's reply, behind the position it reports (``emit``).
        self._held_ready = b""
        self._out: list[bytes | memoryview] | None = None  # what ``feed`` is gathering for the client

    def track_details(self, on: bool) -> None:
        self._track_details = on

    def push(self, entry: Expect) -> None:
        """Register the response expectation of a message about to be sent (or a synthesized reply).

        A synthesized reply at the head of the queue goes out with the first upstream reply that follows
        it (one write to the client); ``flush_synth()`` sends it at once when no upstream reply will come.
        """
        self.expect.append(entry)

    def flush_synth(self) -> None:
        """After a batch is sent: if only synthesized replies are queued, the client gets them now."""
        expect = self.expect
        if expect and expect[-1].kind == K_SYNTH and all(e.kind == K_SYNTH for e in expect):
            data = b"".join(e.data for e in expect)
            expect.clear()
            if self.sink is not None:
                self.sink.upstream_data(data)

    def emit(self, data: bytes) -> None:
        """Send ``data`` (a message the proxy makes) to the client, after the replies routed so far."""
        out = self._out
        if out is not None:
            out.append(data)
        elif self.sink is not None:
            self.sink.upstream_data(data)

    def lost(self, exc: ProxyError) -> None:
        """The connection ended: captures whose reply never comes hear it, the client its unit's
        ReadyForQuery held for one, then the sink (detached)."""
        for entry in self.expect:
            if entry.on_row is not None and entry.on_done is not None:
                entry.on_done(False)
        sink, self.sink = self.sink, None
        held, self._held_ready = self._held_ready, b""
        if sink is not None:
            if held:
                sink.upstream_data(held)
            sink.upstream_lost(exc)

    def whole_unit(self, buf: bytes) -> bool:
        """The fast path: ``buf`` is the whole reply to the one plain unit in flight (a batch sent as it
        was, with the shared expectation ``PLAIN_QUERY`` or ``PLAIN_SYNC``; or a kept statement's unit,
        ``_kept_unit``; or such a unit behind the BEGIN the proxy answered, ``SWALLOWED_BEGIN``; or a unit
        with read-your-writes' capture behind it, ``_captured_unit``), ending with its ReadyForQuery, and
        holds nothing the proxy must read (``whole_reply``, ``begun_reply``, ``captured_reply``: compiled,
        proxy/protocol/scan.pyx). Then it goes to the client as it is (the BEGIN's reply
        dropped), in one call; True when it did. Anything else is ``feed``'s, which does the same with these
        bytes."""
        expect = self.expect
        if self._track_details or (sink := self.sink) is None:
            return False
        done: Callable[[bool], None] | None = None
        before = b""  # replies the proxy makes, sent first
        n = len(expect)
        if n == 1:
            entry = expect[0]
            if entry is not PLAIN_QUERY and entry is not PLAIN_SYNC:  # read-your-writes' capture, or feed's
                return entry.on_row is not None and self._capture_done(buf, capture_row(buf), -1, sink)
            if not whole_reply(buf):
                return False
        elif n == 2 and expect[0] is SWALLOWED_BEGIN:
            if (entry := expect[1]) is not PLAIN_QUERY and entry is not PLAIN_SYNC:
                return False
            start = begun_reply(buf)
            if start < 0:
                return False
            buf = buf[start:]
        elif n == 2 and expect[1].on_row is not None:
            return self._captured_unit(buf, sink)
        else:
            kept = self._kept_unit()
            if kept is None or not whole_reply(buf):
                return False
            done, before = kept
        self.status = status = buf[-1]
        expect.clear()
        self.needs_sync = False
        if done is not None:
            done(True)  # a whole plain reply: the Bind succeeded
        sink.upstream_data(before + buf if before else buf)
        sink.upstream_ready(status)
        return True

    def _captured_unit(self, buf: bytes, sink: Sink) -> bool:
        """For ``whole_unit``: the queue is a plain unit (a COMMIT's) with read-your-writes' capture sent
        behind it (``Capture.send``). ``buf`` is the unit's whole reply (PostgreSQL flushes it before it
        runs the capture), or that and the capture's (``captured_reply``). As ``feed``: the unit's reply
        goes to the client but its ReadyForQuery, held for the position the capture reports (then
        ``_capture_done``)."""
        expect = self.expect
        if (expect[0] is not PLAIN_QUERY and expect[0] is not PLAIN_SYNC) or self._held_ready:
            return False
        if whole_reply(buf):
            self.status = buf[-1]
            expect.popleft()
            self.needs_sync = False
            self._held_ready = buf[-6:]
            if len(buf) > 6:
                sink.upstream_data(buf[:-6])
            return True
        found = captured_reply(buf)
        return found is not None and self._capture_done(buf, found[1], found[0], sink)

    def _capture_done(self, buf: bytes, row: bytes | None, ready: int, sink: Sink) -> bool:
        """For ``whole_unit``: ``buf`` ends with the reply to the capture last in the queue (its row:
        ``row``); ``ready``: where the ReadyForQuery of the unit queued before it starts, its reply in front
        (-1: none). As ``feed``: the row to the capture, whose end emits the position, the unit's
        ReadyForQuery after it, one write, then ``upstream_ready``. Nothing changed when it declines."""
        expect = self.expect
        capture = expect[-1]
        if row is None or capture.on_row is None or capture.on_done is None:
            return False
        if ready >= 0:
            expect.popleft()  # the unit's
            self._held_ready = buf[ready : ready + 6]
        self.status = status = buf[-1]
        expect.popleft()
        self.needs_sync = False
        capture.on_row(row)
        out: list[bytes | memoryview] = [buf[:ready]] if ready > 0 else []
        self._out = out
        try:
            capture.on_done(True)
        finally:
            self._out = None
        if self.sink is not None:
            held, self._held_ready = self._held_ready, b""
            if held:
                out.append(held)
            if out:
                _flush(sink, out)
            sink.upstream_ready(status)
        return True

    def _kept_unit(self) -> tuple[Callable[[bool], None] | None, bytes] | None:
        """For ``whole_unit``: when the queue is a unit of a statement the connection keeps
        (statements.cache_unnamed, sent by ``send_kept`` in proxy/frontend/send.py) — [the proxy's
        ParseComplete] the renamed Bind's entry, then ``PLAIN_SYNC`` — the Bind's ``on_done`` and the
        ParseComplete to send first (or b""); else None."""
        expect = self.expect
        n = len(expect)
        if not 2 <= n <= 3 or expect[-1] is not PLAIN_SYNC:
            return None
        bind = expect[n - 2]
        if bind.kind != K_BIND or bind.action != FORWARD:
            return None
        if n == 2:
            return bind.on_done, b""
        return (bind.on_done, SYNTH_PARSE_COMPLETE.data) if expect[0] is SYNTH_PARSE_COMPLETE else None

    def feed(self, buf: bytes) -> int:
        """Route the complete messages in ``buf`` (see the class); returns the bytes consumed."""
        out: list[bytes | memoryview] = []
        self._out = out  # what ``emit`` adds to, in order
        try:
            return self._route(buf, out)
        finally:
            self._out = None

    def _route(self, buf: bytes, out: list[bytes | memoryview]) -> int:  # noqa: PLR0915  (the hot loop)
        """``feed``'s loop, one frame on purpose: what goes to the client is gathered in ``out``."""
        expect = self.expect
        n = len(buf)
        pos = run = 0  # ``run``: where the bytes to forward that are not in ``out`` yet start
        view = memoryview(buf)
        unpack = _HEADER.unpack_from
        if expect and expect[0].kind == K_SYNTH:  # replies made by the proxy (a cached Parse) come first
            self._take_synth(out, view, 0, 0)
        while pos + 5 <= n:
            mtype, length = unpack(buf, pos)
            end = pos + 1 + length
            if length < 4 or length > MAX_BACKEND_MESSAGE:
                raise ProxyError(PROTOCOL_VIOLATION, f"invalid message length {length} from upstream")
            if end > n:
                break
            if not expect:
                if self._unsolicited(buf, pos, end, run, out):
                    run = pos = end
                    break
                pos = end
                continue
            entry = expect[0]
            if mtype == _Z and entry.kind != K_SYNC:
                entry = _skip_to_next_sync(expect)
            if entry.action != FORWARD:  # injected by the proxy: its replies are dropped
                if pos > run:
                    out.append(view[run:pos])
                run = end
                if mtype in _READ_WHEN_SWALLOWED:
                    _injected(self, entry, buf, pos, end, out)
            if mtype == _Z:
                self.status = buf[pos + 5]
                ready_at, pos = pos, end
                expect.popleft()
                if entry.on_done is not None:
                    entry.on_done(True)
                if self.needs_sync:
                    self.needs_sync = bool(expect) and expect[-1].kind != K_SYNC
                if expect and expect[0].kind == K_SYNTH:
                    run = self._take_synth(out, view, run, pos)
                if (entry.action == FORWARD or entry.on_row is not None) and self.sink is not None:
                    run = self._unit_end(entry, view, ready_at, pos, run, out)
                continue
            if mtype == _E:
                after = self._error(entry, buf, pos, end, run=run, out=out)
                pos = end
                if after == _STOP:
                    break
                run = after
                continue
            if mtype == _S:
                self._parameter_status(buf, pos, end)
            elif mtype == _C:
                if self._track_details and entry.action == FORWARD and self.sink is not None:
                    self.sink.upstream_command_tag(bytes(buf[pos + 5 : end - 1]))
            elif mtype == _G and entry.extended_copy():
                entry = _copy_in_started(expect)
            pos = end
            if entry.kind != K_SYNC and mtype in _END[entry.kind]:
                expect.popleft()
                if entry.on_done is not None:
                    entry.on_done(True)
                if expect and expect[0].kind == K_SYNTH:
                    run = self._take_synth(out, view, run, pos)
        if pos > run:
            out.append(view[run:pos])
        if out and (sink := self.sink) is not None:
            _flush(sink, out)
        return pos

    def _unit_end(  # noqa: PLR0917  (positional: called per ReadyForQuery in ``feed``'s loop)
        self,
        entry: Expect,
        view: memoryview,
        ready_at: int,
        pos: int,
        run: int,
        out: list[bytes | memoryview],
    ) -> int:
        """The ReadyForQuery at ``view[ready_at:pos]`` ends a unit of the client's (or a capture's): what is
        gathered goes to the client, then ``upstream_ready``. With read-your-writes' capture queued right
        behind a client's unit (a COMMIT's, proxy/frontend/ryw.py), the ReadyForQuery waits for the
        capture's reply, so the client hears its new position (``emit``) before it, in the same write.
        Returns where the run to forward now starts."""
        sink = self.sink
        assert sink is not None
        expect = self.expect
        if entry.on_row is None and expect and expect[0].on_row is not None:
            if ready_at > run:
                out.append(view[run:ready_at])
            self._held_ready = bytes(view[ready_at:pos])
            return pos
        if pos > run:
            out.append(cast(bytes, view.obj) if run == 0 and pos == len(view) else view[run:pos])
        if self._held_ready:
            out.append(self._held_ready)
            self._held_ready = b""
        if self._track_details:
            sink.upstream_batch_end()  # before the client's ReadyForQuery (audit line first)
        if out:
            _flush(sink, out)
        sink.upstream_ready(self.status)
        return pos

    def _unsolicited(self, buf: bytes, pos: int, end: int, run: int, out: list[bytes | memoryview]) -> bool:
        """A message while nothing is expected: only asynchronous ones may arrive (notices, notifications,
        settings: they stay in the run forwarded), or the FATAL of a backend that ends on its own
        (terminated, idle-in-transaction timeout). True for that FATAL: the run before it goes to ``out``,
        and it is kept as ``farewell``, not forwarded (whether the client hears of it is
        ``Sink.upstream_lost``'s decision)."""
        mtype = buf[pos]
        if mtype == _S:
            self._parameter_status(buf, pos, end)
        elif mtype == _E:
            if pos > run:
                out.append(memoryview(buf)[run:pos])
            self.farewell = bytes(buf[pos:end])
            return True
        elif mtype not in (_N, _A):
            raise ProxyError(PROTOCOL_VIOLATION, f"unexpected message {chr(mtype)!r} from upstream")
        return False

    def _error(
        self, entry: Expect, buf: bytes, pos: int, end: int, *, run: int, out: list[bytes | memoryview]
    ) -> int:
        """An ErrorResponse at ``buf[pos:end]`` under ``entry``: returns where the run to forward now
        starts, or ``_STOP`` after a FATAL one (the backend exits; ``farewell`` is set)."""
        if _fatal(buf, pos, end):
            # The backend exits after this: the client got it (unless the message was the proxy's).
            self.farewell = bytes(buf[pos:end])
            self.farewell_forwarded = entry.action != SWALLOW and self.sink is not None
            return _STOP
        expect = self.expect
        if (
            entry.retry is not None
            and _only_unit_queued(expect)
            and _stale_plan(buf, pos, end)
            and entry.retry.applies()
        ):
            # Drop this error and the ReadyForQuery of the Sync the server now skips to; the retry's
            # replies are what the client gets.
            if pos > run:
                out.append(memoryview(buf)[run:pos])
            retry = entry.retry
            _skip_to_sync(expect, entry)
            if expect:
                expect[0] = dataclasses.replace(expect[0], action=SWALLOW)
            retry()
            return end
        if self._track_details and entry.action == FORWARD and self.sink is not None:
            self.sink.upstream_error_seen(bytes(buf[pos + 5 : end]))
        if entry.kind != K_SYNC:
            # Extended protocol: the server now skips everything up to the next Sync (replies the proxy
            # would have synthesized for messages in between are dropped too, as the server's would be).
            _skip_to_sync(expect, entry)
        if entry.action == FORWARD and self.sink is not None and buf.find(_UPSTREAM_NAME, pos, end) >= 0:
            # (after the skip: a Close the proxy answered, now skipped, has given the client its name back)
            run = _renamed(self.sink, buf, pos, end, run, out)
        return run

    def _take_synth(self, out: list[bytes | memoryview], view: memoryview, run: int, pos: int) -> int:
        """Emit synthesized replies now at the head of the queue, after the bytes forwarded so far."""
        if pos > run:
            out.append(view[run:pos])
        expect = self.expect
        while expect and expect[0].kind == K_SYNTH:
            out.append(expect.popleft().data)
        return pos

    def _parameter_status(self, buf: bytes, pos: int, end: int) -> None:
        name, value = m.decode_parameter_status(memoryview(buf)[pos + 5 : end])
        self.parameters[name] = value
        if self.sink is not None:  # forwarded, or (``_injected``) what the client already heard
            self.sink.heard[name] = value


def _injected(  # noqa: PLR0917  (positional: called per message in ``feed``'s loop)
    queue: ReplyQueue, entry: Expect, buf: bytes, pos: int, end: int, out: list[bytes | memoryview]
) -> None:
    """A reply to a message the proxy injected, dropped but for what the client must still see: the
    new value of a setting the proxy replayed, where the client has not heard that value, and the error
    of a re-prepare (its own Bind will be skipped). A captured row goes to ``on_row``; other errors are
    logged."""
    mtype = buf[pos]
    if mtype == _S:  # the client hears it where its value is news to the client
        name, value = m.decode_parameter_status(memoryview(buf)[pos + 5 : end])
        if queue.sink is None or queue.sink.heard.get(name) != value:
            out.append(memoryview(buf)[pos:end])
    elif mtype == _D and entry.on_row is not None:
        entry.on_row(bytes(buf[pos + 5 : end]))
    elif mtype == _E:
        if entry.action == SWALLOW_OK:
            error = bytes(buf[pos:end])
            out.append(error if queue.sink is None else queue.sink.client_names(error))
        else:
            log.warning(
                "event=injected_statement_failed upstream=%s sqlstate=%s",
                queue.label,
                sqlstate(buf, pos, end),
            )


def _renamed(  # noqa: PLR0917
    sink: Sink, buf: bytes, pos: int, end: int, run: int, out: list[bytes | memoryview]
) -> int:
    """The ErrorResponse at ``buf[pos:end]`` names a statement by its upstream name (a Bind's parameter
    count, say): forwarded with the client's name for it, as PostgreSQL would have named it. Returns
    where the run to forward now starts."""
    if pos > run:
        out.append(memoryview(buf)[run:pos])
    out.append(sink.client_names(bytes(buf[pos:end])))
    return end


def _only_unit_queued(expect: deque[Expect]) -> bool:
    """Whether the expectations queued end at the first Sync (no later batch is in flight)."""
    return sum(1 for e in expect if e.kind == K_SYNC) == 1 and expect[-1].kind == K_SYNC


def _skip_to_next_sync(expect: deque[Expect]) -> Expect:
    """A ReadyForQuery under an entry that is not a Sync's: the server skipped those messages (it was
    still skipping after an earlier error, which a Flush-terminated batch reported), so their replies
    never come. Returns the Sync's entry; ProxyError 08P01 when there is none."""
    _drop_until_sync(expect)
    if not expect:
        raise ProxyError(PROTOCOL_VIOLATION, "ReadyForQuery out of turn from upstream")
    return expect[0]


def _copy_in_started(expect: deque[Expect]) -> Expect:
    """COPY FROM STDIN started by an extended-protocol Execute: the server ignores the Sync already
    sent after it, so that Sync's ReadyForQuery never comes; the Execute's unit now ends at
    CommandComplete (or an error), and the client's next Sync gets the ReadyForQuery. Returns the
    entry now at the head."""
    head = expect[0]
    if head.kind == K_SYNC:
        expect[0] = head = dataclasses.replace(head, kind=K_EXECUTE)
        return head
    for i, entry in enumerate(expect):
        if entry.kind == K_SYNC:
            del expect[i]
            break
    return expect[0]


def _skip_to_sync(expect: deque[Expect], failed: Expect) -> None:
    """After an error the server ignores messages up to Sync: drop their expectations too."""
    expect.popleft()
    if failed.on_done is not None:
        failed.on_done(False)
    _drop_until_sync(expect)


def _drop_until_sync(expect: deque[Expect]) -> None:
    """Drop the expectations before the next Sync's, whose replies never come (``on_done(False)``)."""
    while expect and expect[0].kind != K_SYNC:
        dropped = expect.popleft()
        if dropped.on_done is not None:
            dropped.on_done(False)


def _flush(sink: Sink, out: list[bytes | memoryview]) -> None:
    sink.upstream_data(out[0] if len(out) == 1 else b"".join(out))
    out.clear()


def _stale_plan(buf: bytes, pos: int, end: int) -> bool:
    """Whether the ErrorResponse at ``pos`` is "cached plan must not change result type" (SQLSTATE 0A000
    raised by RevalidateCachedQuery: the routine name, unlike the message, is never translated)."""
    try:
        fields = m.parse_fields(buf[pos + 5 : end])
    except ProxyError:
        return False
    return fields.get("C") == "0A000" and fields.get("R") == "RevalidateCachedQuery"


def _fatal(buf: bytes, pos: int, end: int) -> bool:
    """Whether the ErrorResponse at ``pos`` is FATAL or PANIC: the backend ends the connection after it."""
    try:
        fields = m.parse_fields(bytes(buf[pos + 5 : end]))
    except ProxyError:
        return False
    return fields.get("V", fields.get("S")) in ("FATAL", "PANIC")


def sqlstate(buf: bytes, pos: int, end: int) -> str:
    """The SQLSTATE of the ErrorResponse at ``buf[pos:end]`` only (for logs: its message may quote values,
    a replayed SET's, say); "unreadable" when its fields are malformed."""
    try:
        fields = m.parse_fields(bytes(buf[pos + 5 : end]))
    except ProxyError:
        return "unreadable"
    return fields.get("C", "unknown")


__all__ = [
    "FORWARD",
    "K_BIND",
    "K_CLOSE",
    "K_DESCRIBE",
    "K_EXECUTE",
    "K_PARSE",
    "K_SYNC",
    "K_SYNTH",
    "MAX_BACKEND_MESSAGE",
    "PLAIN_QUERY",
    "PLAIN_SYNC",
    "SWALLOW",
    "SWALLOWED_BEGIN",
    "SWALLOW_OK",
    "Expect",
    "ReplyQueue",
    "Retry",
    "Sink",
    "sqlstate",
]
