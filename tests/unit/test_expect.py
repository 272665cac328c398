"""The upstream reply queue without sockets: backend message bytes fed to ``ReplyQueue``, a recording sink.

Each case queues the entries the client would push for a batch (``send`` in send.py, ``flush_synth``,
``_StalePlanRetry``, ryw's ``Capture``) and feeds what PostgreSQL answers, then checks what the client
would receive (bytes, in order), the ReadyForQuery statuses reported and the ``on_done`` callbacks.
"""

from __future__ import annotations

import itertools
import logging
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.backend.connection import ServerConnection
from proxy.backend.expect import (
    K_BIND,
    K_CLOSE,
    K_DESCRIBE,
    K_EXECUTE,
    K_PARSE,
    K_SYNC,
    K_SYNTH,
    PLAIN_QUERY,
    PLAIN_SYNC,
    SWALLOW,
    SWALLOW_OK,
    SWALLOWED_BEGIN,
    Expect,
    ReplyQueue,
)
from proxy.config.dsn import parse_dsn
from proxy.errors import ProxyError
from proxy.frontend.ryw import CAPTURE_QUERY, Capture, Writes
from proxy.protocol import messages as m
from proxy.protocol.framing import COLLECT_FROM, collector

PARSE_1 = m.parse_complete()
BIND_2 = m.bind_complete()
CLOSE_3 = m.close_complete()
ROWS = m.row_description([("n", 23)]) + m.data_row(["1"]) + m.command_complete("SELECT 1")
IDLE, IN_TX, FAILED = m.ready_for_query(b"I"), m.ready_for_query(b"T"), m.ready_for_query(b"E")


def msg(mtype: bytes, payload: bytes) -> bytes:
    return mtype + struct.pack("!I", len(payload) + 4) + payload


def error(sqlstate: str, severity: str = "ERROR", routine: str | None = None) -> bytes:
    """An ErrorResponse as PostgreSQL sends it (with the routine field R when given)."""
    fields = [b"S", severity.encode(), b"\0V", severity.encode(), b"\0C", sqlstate.encode(), b"\0Mboom\0"]
    if routine is not None:
        fields += [b"R", routine.encode(), b"\0"]
    return msg(b"E", b"".join(fields) + b"\0")


STALE_PLAN = error("0A000", routine="RevalidateCachedQuery")
SYNTAX = error("42601")


class Sink:
    """Records what the reply queue tells the client, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.raw: list[bytes | bytearray | memoryview] = []
        self.heard: dict[str, str] = {}

    def upstream_data(self, data: bytes | bytearray | memoryview) -> None:
        self.raw.append(data)
        self.events.append(("data", bytes(data)))

    def upstream_ready(self, status: int) -> None:
        self.events.append(("ready", chr(status)))

    def upstream_batch_end(self) -> None:
        self.events.append(("batch_end", None))

    def upstream_error_seen(self, fields_payload: bytes) -> None:
        self.events.append(("error_seen", m.parse_fields(fields_payload)["C"]))

    def upstream_command_tag(self, tag: bytes) -> None:
        self.events.append(("tag", tag))

    def upstream_lost(self, exc: ProxyError) -> None:
        self.events.append(("lost", exc.sqlstate))

    def upstream_pause(self, paused: bool) -> None:
        self.events.append(("pause", paused))

    def client_names(self, error: bytes) -> bytes:
        return error

    @property
    def data(self) -> bytes:
        return b"".join(d for kind, d in self.events if kind == "data")

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


class Done:
    """An ``on_done`` callback that records its calls."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def __call__(self, ok: bool) -> None:
        self.calls.append(ok)


def queue(*entries: Expect, track: bool = False) -> tuple[ReplyQueue, Sink]:
    q = ReplyQueue("main")
    sink = Sink()
    q.sink = sink
    q.track_details(track)
    for entry in entries:
        q.push(entry)
    return q, sink


def feed_all(q: ReplyQueue, data: bytes) -> None:
    assert q.feed(data) == len(data)


# -- forwarding -------------------------------------------------------------------------------------------


def test_plain_sync_unit_is_forwarded_untouched_in_one_write() -> None:
    # An extended batch that needs nothing special (Parse/Bind/Describe/Execute/Sync): one entry, its Sync.
    q, sink = queue(Expect(K_SYNC, extended=True))
    replies = PARSE_1 + BIND_2 + ROWS + IDLE
    feed_all(q, replies)
    assert sink.kinds() == ["data", "ready"]
    assert sink.raw[0] is replies  # the buffer itself: no copy, no join
    assert sink.events[1] == ("ready", "I")
    assert not q.expect


BEGUN = m.command_complete("BEGIN") + IN_TX
NOTICE = msg(b"N", b"SWARNING\0C25001\0Mthere is already a transaction in progress\0\0")


@pytest.mark.parametrize(
    ("unit", "replies", "whole"),
    [
        (PLAIN_SYNC, BEGUN + PARSE_1 + BIND_2 + m.command_complete("UPDATE 1") + IN_TX, True),
        (PLAIN_QUERY, BEGUN + m.command_complete("UPDATE 1") + IN_TX, True),
        (PLAIN_QUERY, NOTICE + BEGUN + m.command_complete("UPDATE 1") + IN_TX, False),  # the notice: dropped
        (PLAIN_SYNC, error("25P02") + IN_TX + PARSE_1 + BIND_2 + ROWS + IN_TX, False),
        (PLAIN_SYNC, BEGUN + PARSE_1 + SYNTAX + FAILED, False),  # the unit's error: feed reads it
    ],
    ids=["extended", "simple", "notice", "begin failed", "unit failed"],
)
def test_a_unit_behind_the_proxys_begin_answers_as_feed_does(
    unit: Expect, replies: bytes, whole: bool
) -> None:
    """The first unit of a transaction whose BEGIN the proxy answered goes upstream behind that BEGIN
    (``SWALLOWED_BEGIN``): ``whole_unit`` drops the BEGIN's reply and forwards the unit's in one write when
    both are plain, else leaves all to ``feed``; the client hears the same either way."""
    fast, fast_sink = queue(SWALLOWED_BEGIN, unit)
    slow, slow_sink = queue(SWALLOWED_BEGIN, unit)
    assert fast.whole_unit(replies) is whole
    if not whole:
        feed_all(fast, replies)
    feed_all(slow, replies)
    assert fast_sink.data == slow_sink.data
    assert [e for e in fast_sink.events if e[0] == "ready"] == [
        e for e in slow_sink.events if e[0] == "ready"
    ]
    assert (fast.status, list(fast.expect), fast.needs_sync) == (
        slow.status,
        list(slow.expect),
        slow.needs_sync,
    )
    if whole:
        assert fast_sink.kinds() == ["data", "ready"] and not fast_sink.data.startswith(BEGUN)


def test_whole_unit_leaves_replies_nothing_awaits_to_feed() -> None:
    """A notification while nothing is expected (a LISTENing client between units), or a ReadyForQuery
    that no entry awaits: not a unit's reply, so ``whole_unit`` declines and ``feed`` reads it."""
    q, sink = queue()
    notification = msg(b"A", struct.pack("!I", 42) + b"chan\0hi\0")
    assert not q.whole_unit(notification)
    assert not q.whole_unit(m.command_complete("SELECT 1") + IDLE)
    feed_all(q, notification)
    assert sink.data == notification


def test_ready_for_query_status_is_reported_and_kept() -> None:
    q, sink = queue(Expect(K_SYNC), Expect(K_SYNC), Expect(K_SYNC))
    feed_all(q, m.command_complete("BEGIN") + IN_TX + error("22012") + FAILED)
    assert [e for e in sink.events if e[0] == "ready"] == [("ready", "T"), ("ready", "E")]
    assert q.status == ord("E")
    feed_all(q, m.command_complete("ROLLBACK") + IDLE)
    assert sink.events[-1] == ("ready", "I")
    assert q.status == ord("I")


def test_two_pipelined_units_each_end_with_their_own_ready() -> None:
    q, sink = queue(Expect(K_SYNC), Expect(K_SYNC))
    first, second = ROWS + IDLE, m.command_complete("SELECT 0") + IDLE
    feed_all(q, first + second)
    assert sink.events == [("data", first), ("ready", "I"), ("data", second), ("ready", "I")]


# -- injected statements ----------------------------------------------------------------------------------


def test_swallowed_session_replay_passes_only_its_parameter_status() -> None:
    # _send: the session replay (RESET/SET as one Query) goes first, swallowed; the client's query follows.
    q, sink = queue(Expect(K_SYNC, SWALLOW), Expect(K_SYNC))
    setting = m.parameter_status("DateStyle", "ISO, DMY")
    feed_all(q, m.command_complete("SET") + setting + IDLE + ROWS + IDLE)
    assert sink.data == setting + ROWS + IDLE
    assert sink.kinds().count("ready") == 1  # the injected unit's ReadyForQuery is not the client's
    assert q.parameters["DateStyle"] == "ISO, DMY"


def test_a_replayed_setting_the_client_has_heard_is_not_reported_again() -> None:
    """The replay puts the connection's settings back to the client's: where a value reported is the one
    the client last heard, it hears nothing (as on its own server); a new value it hears, and it is noted."""
    q, sink = queue(Expect(K_SYNC, SWALLOW), Expect(K_SYNC))
    sink.heard.update({"application_name": "", "TimeZone": "UTC"})
    known = m.parameter_status("application_name", "")
    news = m.parameter_status("TimeZone", "Europe/Paris")
    feed_all(q, m.command_complete("RESET") + known + news + IDLE + ROWS + IDLE)
    assert sink.data == news + ROWS + IDLE
    assert sink.heard == {"application_name": "", "TimeZone": "Europe/Paris"}
    assert q.parameters == sink.heard


def test_a_setting_in_the_clients_own_reply_is_noted_as_heard() -> None:
    q, sink = queue(Expect(K_SYNC))
    setting = m.parameter_status("application_name", "app")
    feed_all(q, m.command_complete("SET") + setting + IDLE)
    assert sink.data == m.command_complete("SET") + setting + IDLE
    assert sink.heard == {"application_name": "app"}


class Renaming(Sink):
    def client_names(self, error: bytes) -> bytes:
        payload = error[5:].replace(b'"pf_0123"', b'"p1"')
        return error[:1] + struct.pack("!I", len(payload) + 4) + payload


def test_an_error_naming_an_upstream_statement_names_the_clients() -> None:
    """An error that names a statement as upstream ("pf_...") reaches the client with its own name for it
    (``Sink.client_names``); the replies around it are forwarded as they are."""
    q = ReplyQueue("main")
    q.sink = sink = Renaming()
    q.push(Expect(K_BIND))
    q.push(Expect(K_SYNC, extended=True))
    wrong = msg(b"E", b'SERROR\0C08P01\0Mprepared statement "pf_0123" requires 0\0\0')
    feed_all(q, wrong + FAILED)
    assert sink.data == msg(b"E", b'SERROR\0C08P01\0Mprepared statement "p1" requires 0\0\0') + FAILED


def test_error_of_a_swallowed_query_is_logged_not_forwarded(caplog: pytest.LogCaptureFixture) -> None:
    q, sink = queue(Expect(K_SYNC, SWALLOW), Expect(K_SYNC))
    with caplog.at_level(logging.WARNING, logger="parafort.backend"):
        feed_all(q, error("22023") + IDLE + ROWS + IDLE)
    assert sink.data == ROWS + IDLE
    assert "event=injected_statement_failed upstream=main sqlstate=22023" in caplog.text
    assert "boom" not in caplog.text  # the message may quote values: only the SQLSTATE is logged


def test_re_parse_that_succeeds_is_swallowed() -> None:
    # _ensure_prepared before a Bind of a statement this connection lacks: Close + Parse, then the Bind.
    parse_done, bind_done = Done(), Done()
    q, sink = queue(
        Expect(K_CLOSE, SWALLOW),
        Expect(K_PARSE, SWALLOW_OK, on_done=parse_done),
        Expect(K_BIND, on_done=bind_done),
        Expect(K_SYNC, extended=True),
    )
    feed_all(q, CLOSE_3 + PARSE_1 + BIND_2 + ROWS + IDLE)
    assert sink.data == BIND_2 + ROWS + IDLE
    assert (parse_done.calls, bind_done.calls) == ([True], [True])


def test_re_parse_that_fails_forwards_its_error() -> None:
    # The client's own Bind is then skipped by the server: the client sees the Parse's error and Sync's Z.
    parse_done, bind_done = Done(), Done()
    q, sink = queue(
        Expect(K_CLOSE, SWALLOW),
        Expect(K_PARSE, SWALLOW_OK, on_done=parse_done),
        Expect(K_BIND, on_done=bind_done),
        Expect(K_SYNC, extended=True),
        track=True,
    )
    missing = error("42P01")
    feed_all(q, CLOSE_3 + missing + IDLE)
    assert sink.data == missing + IDLE
    assert (parse_done.calls, bind_done.calls) == ([False], [False])
    assert "error_seen" not in sink.kinds()  # not the client's own message's error
    assert not q.expect


# -- errors in the extended protocol ----------------------------------------------------------------------


def test_pipelined_error_skips_to_the_next_sync() -> None:
    # A driver's Parse/Describe/Flush (not collapsed: no Sync), then Bind/Execute/Sync as another batch.
    parse_done, describe_done, sync_done = Done(), Done(), Done()
    q, sink = queue(Expect(K_PARSE, on_done=parse_done), Expect(K_DESCRIBE, on_done=describe_done))
    q.needs_sync = True
    feed_all(q, SYNTAX)
    assert sink.data == SYNTAX
    assert not q.expect  # the Describe's reply never comes: the server skips to the Sync
    assert (parse_done.calls, describe_done.calls) == ([False], [False])
    q.push(Expect(K_SYNC, extended=True, on_done=sync_done))
    feed_all(q, IDLE)
    assert sink.events[-1] == ("ready", "I")
    assert sync_done.calls == [True]
    assert not q.needs_sync


def test_ready_for_query_under_skipped_entries_ends_them() -> None:
    # The error came after a Flush; the client pipelined Bind/Execute/Flush and then a Sync: the server
    # skipped the Bind and Execute, so the ReadyForQuery belongs to the Sync.
    bind_done, execute_done = Done(), Done()
    q, sink = queue(
        Expect(K_BIND, on_done=bind_done),
        Expect(K_EXECUTE, on_done=execute_done),
        Expect(K_SYNC, extended=True),
    )
    feed_all(q, IDLE)
    assert sink.events == [("data", IDLE), ("ready", "I")]
    assert (bind_done.calls, execute_done.calls) == ([False], [False])

    q, _ = queue(Expect(K_BIND))
    with pytest.raises(ProxyError) as exc:
        q.feed(IDLE)  # no Sync queued at all: the server is out of turn
    assert exc.value.sqlstate == "08P01"


def test_error_details_and_tags_reach_a_tracking_sink_before_ready() -> None:
    q, sink = queue(Expect(K_SYNC), Expect(K_SYNC), track=True)
    feed_all(q, m.command_complete("SET") + IDLE + error("42P01") + IDLE)
    assert sink.kinds() == ["tag", "batch_end", "data", "ready", "error_seen", "batch_end", "data", "ready"]
    assert sink.events[0] == ("tag", b"SET")
    assert sink.events[4] == ("error_seen", "42P01")


# -- synthesized replies ----------------------------------------------------------------------------------


def test_synthesized_parse_complete_goes_first_in_the_same_write() -> None:
    # statements.cache_unnamed: the connection has the statement, the Parse is not sent (_parse_unnamed).
    q, sink = queue(Expect(K_SYNTH, data=PARSE_1), Expect(K_BIND), Expect(K_SYNC, extended=True))
    feed_all(q, BIND_2 + ROWS + IDLE)
    assert sink.events == [("data", PARSE_1 + BIND_2 + ROWS + IDLE), ("ready", "I")]


def test_synthesized_replies_between_upstream_replies_keep_their_order() -> None:
    # Parse (sent), Close of a client name (answered by the proxy), Parse (cached), Bind, Execute, Sync.
    q, sink = queue(
        Expect(K_PARSE),
        Expect(K_SYNTH, data=CLOSE_3),
        Expect(K_SYNTH, data=PARSE_1),
        Expect(K_BIND),
        Expect(K_SYNC, extended=True),
    )
    feed_all(q, PARSE_1 + BIND_2 + ROWS + IDLE)
    assert sink.data == PARSE_1 + CLOSE_3 + PARSE_1 + BIND_2 + ROWS + IDLE
    # A synthesized reply behind a pipelined unit goes out right after that unit's ReadyForQuery.
    q, sink = queue(Expect(K_SYNC), Expect(K_SYNTH, data=PARSE_1), Expect(K_BIND))
    feed_all(q, ROWS + IDLE + BIND_2)
    assert sink.data == ROWS + IDLE + PARSE_1 + BIND_2
    assert sink.kinds().count("ready") == 1


def test_synthesized_reply_after_a_skipping_error_and_flush_synth() -> None:
    q, sink = queue(Expect(K_PARSE), Expect(K_BIND), Expect(K_SYNTH, data=CLOSE_3), Expect(K_SYNC))
    feed_all(q, SYNTAX + IDLE)
    # The server skips the Bind and the Close up to the Sync: the Close the proxy answers is skipped too.
    assert sink.data == SYNTAX + IDLE
    # Only synthesized replies queued (a batch of cached Parses and a Flush): no upstream reply will come.
    q, sink = queue()
    q.push(Expect(K_SYNTH, data=PARSE_1))
    q.push(Expect(K_SYNTH, data=CLOSE_3))
    q.flush_synth()
    assert sink.events == [("data", PARSE_1 + CLOSE_3)]
    assert not q.expect


# -- COPY -------------------------------------------------------------------------------------------------

COPY_IN = msg(b"G", b"\0" + struct.pack("!h", 0))
COPY_OUT = msg(b"H", b"\0" + struct.pack("!h", 0))
COPIED = m.command_complete("COPY 2")


def test_copy_in_from_an_extended_execute_ends_at_command_complete() -> None:
    # Parse/Bind/Execute/Sync of COPY ... FROM STDIN: the server ignores that Sync while copying, so the
    # unit ends at CommandComplete and the Sync the client sends after CopyDone gets the ReadyForQuery.
    q, sink = queue(Expect(K_SYNC, extended=True))
    feed_all(q, PARSE_1 + BIND_2 + COPY_IN)
    assert [e.kind for e in q.expect] == [K_EXECUTE]
    feed_all(q, COPIED)
    assert not q.expect
    q.push(Expect(K_SYNC, extended=True))
    feed_all(q, IDLE)
    assert sink.data == PARSE_1 + BIND_2 + COPY_IN + COPIED + IDLE
    assert sink.kinds().count("ready") == 1


def test_copy_in_after_a_flush_drops_the_pipelined_sync() -> None:
    q, _ = queue(Expect(K_BIND), Expect(K_EXECUTE), Expect(K_SYNC, extended=True))
    feed_all(q, BIND_2 + COPY_IN)
    assert [e.kind for e in q.expect] == [K_EXECUTE]  # that Sync's ReadyForQuery never comes


def test_copy_in_from_a_simple_query_keeps_its_unit() -> None:
    q, sink = queue(Expect(K_SYNC))
    feed_all(q, COPY_IN)
    assert [(e.kind, e.extended) for e in q.expect] == [(K_SYNC, False)]
    feed_all(q, COPIED + IDLE)
    assert sink.data == COPY_IN + COPIED + IDLE
    assert sink.events[-1] == ("ready", "I")


def test_copy_out_data_is_forwarded() -> None:
    q, sink = queue(Expect(K_SYNC))
    rows = msg(b"d", b"1\tone\n") + msg(b"d", b"2\ttwo\n") + msg(b"c", b"")
    feed_all(q, COPY_OUT + rows + COPIED + IDLE)
    assert sink.data == COPY_OUT + rows + COPIED + IDLE


# -- stale plans ------------------------------------------------------------------------------------------


class Retry:
    """Mirrors client.py's _StalePlanRetry: queues Close + Parse + Bind + Sync again when called."""

    def __init__(self, q: ReplyQueue, applies: bool = True) -> None:
        self.q = q
        self.ok = applies
        self.calls = 0

    def applies(self) -> bool:
        return self.ok

    def __call__(self) -> None:
        self.calls += 1
        self.q.push(Expect(K_CLOSE, SWALLOW))
        self.q.push(Expect(K_PARSE, SWALLOW_OK))
        self.q.push(Expect(K_BIND))
        self.q.push(Expect(K_SYNC, extended=True))


def stale_batch(applies: bool = True) -> tuple[ReplyQueue, Sink, Retry, Done]:
    q, sink = queue()
    retry, bind_done = Retry(q, applies), Done()
    q.push(Expect(K_SYNTH, data=PARSE_1))
    q.push(Expect(K_BIND, on_done=bind_done, retry=retry))
    q.push(Expect(K_SYNC, extended=True))
    return q, sink, retry, bind_done


def test_stale_plan_error_is_swallowed_and_the_batch_retried() -> None:
    q, sink, retry, bind_done = stale_batch()
    feed_all(q, STALE_PLAN)
    assert retry.calls == 1
    assert bind_done.calls == [False]
    assert q.expect[0].kind == K_SYNC and q.expect[0].action == SWALLOW  # the failed batch's Sync
    # The failed Sync's ReadyForQuery, then the retry's replies.
    feed_all(q, IDLE + CLOSE_3 + PARSE_1 + BIND_2 + ROWS + IDLE)
    assert sink.data == PARSE_1 + BIND_2 + ROWS + IDLE  # no error; the client's ParseComplete was ours
    assert sink.kinds().count("ready") == 1
    assert not q.expect


def test_stale_plan_error_is_forwarded_when_the_retry_does_not_apply() -> None:
    q, sink, retry, _ = stale_batch(applies=False)
    feed_all(q, STALE_PLAN + IDLE)
    assert retry.calls == 0
    assert sink.data == PARSE_1 + STALE_PLAN + IDLE
    # Another batch in flight behind this one: it must not be re-sent ahead of it.
    q, sink, retry, _ = stale_batch()
    q.push(Expect(K_SYNC))
    feed_all(q, STALE_PLAN + IDLE)
    assert retry.calls == 0
    assert sink.data == PARSE_1 + STALE_PLAN + IDLE
    # The same SQLSTATE from elsewhere (not RevalidateCachedQuery) is the client's error.
    q, sink, retry, _ = stale_batch()
    feed_all(q, error("0A000") + IDLE)
    assert retry.calls == 0
    assert sink.data == PARSE_1 + error("0A000") + IDLE


# -- the backend going away -------------------------------------------------------------------------------


def test_fatal_reply_is_forwarded_and_kept_as_farewell() -> None:
    q, sink = queue(Expect(K_SYNC))
    fatal = error("57P01", severity="FATAL")
    feed_all(q, m.row_description([("n", 23)]) + fatal)
    assert sink.data == m.row_description([("n", 23)]) + fatal
    assert q.farewell == fatal and q.farewell_forwarded
    assert "ready" not in sink.kinds()


def test_fatal_under_an_injected_query_is_not_the_clients() -> None:
    q, sink = queue(Expect(K_SYNC, SWALLOW), Expect(K_SYNC))
    fatal = error("57P01", severity="FATAL")
    assert q.feed(fatal + IDLE) == len(fatal)  # nothing after it is routed
    assert sink.events == []
    assert q.farewell == fatal and not q.farewell_forwarded


def test_fatal_while_idle_is_kept_not_forwarded() -> None:
    q, sink = queue()
    notice = m.notice_response("WARNING", "01000", "about to go")
    fatal = error("25P03", severity="FATAL")
    feed_all(q, notice + fatal)
    assert sink.data == notice  # upstream_lost decides whether the client hears of it
    assert q.farewell == fatal and not q.farewell_forwarded


def test_lost_connection_fails_captures_then_tells_the_sink() -> None:
    capture_done, other_done = Done(), Done()
    q, sink = queue(
        Expect(K_SYNC, on_done=other_done),
        Expect(K_SYNC, SWALLOW, on_done=capture_done, on_row=lambda row: None),
    )
    q.lost(ProxyError("08006", "gone"))
    assert capture_done.calls == [False]  # its reply never comes
    assert other_done.calls == []
    assert sink.events == [("lost", "08006")]
    assert q.sink is None


# -- asynchronous messages --------------------------------------------------------------------------------


def test_asynchronous_messages_pass_through() -> None:
    notification = msg(b"A", struct.pack("!I", 4242) + b"jobs\0payload\0")
    notice = m.notice_response("NOTICE", "00000", "hello")
    setting = m.parameter_status("TimeZone", "UTC")
    q, sink = queue()
    feed_all(q, notification + notice + setting)  # nothing in flight (a LISTENing pinned client)
    assert sink.events == [("data", notification + notice + setting)]
    assert q.parameters == {"TimeZone": "UTC"}
    q.push(Expect(K_SYNC))
    feed_all(q, notice + m.parameter_status("TimeZone", "CET") + ROWS + notification + IDLE)
    assert sink.data.endswith(notice + m.parameter_status("TimeZone", "CET") + ROWS + notification + IDLE)
    assert q.parameters == {"TimeZone": "CET"}
    with pytest.raises(ProxyError) as exc:
        q.feed(m.data_row(["1"]))  # a row nobody asked for
    assert exc.value.sqlstate == "08P01"


# -- framing ----------------------------------------------------------------------------------------------


def test_message_split_across_two_reads() -> None:
    replies = ROWS + IDLE
    for cut in (3, len(m.row_description([("n", 23)])) + 7):  # inside a header, inside a body
        q, sink = queue(Expect(K_SYNC))
        used = q.feed(replies[:cut])
        assert used < cut
        assert replies[:used] == sink.data
        feed_all(q, replies[used:])
        assert sink.data == replies
        assert sink.events[-1] == ("ready", "I")


def test_bad_length_is_a_protocol_violation() -> None:
    q, _ = queue(Expect(K_SYNC))
    with pytest.raises(ProxyError) as exc:
        q.feed(b"D" + struct.pack("!I", 3))
    assert exc.value.sqlstate == "08P01"


class MemoryTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...

    def abort(self) -> None: ...


def memory_connection() -> tuple[ServerConnection, MemoryTransport, Sink]:
    conn = ServerConnection("main", parse_dsn("postgresql://app@127.0.0.1:5432/app"), "main")
    transport = MemoryTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    sink = Sink()
    conn.attach(sink)
    return conn, transport, sink


def test_large_message_is_collected_in_chunks_and_joined_once() -> None:
    conn, _, sink = memory_connection()
    conn.push(Expect(K_SYNC))
    big = m.data_row(["x" * (4 * COLLECT_FROM)])
    replies = m.row_description([("x", 25)]) + big + m.command_complete("SELECT 1") + IDLE
    chunk = 16 * 1024
    pieces = [replies[i : i + chunk] for i in range(0, len(replies), chunk)]
    conn.data_received(pieces[0])
    assert conn._parts is not None  # collecting, not concatenating each read onto the buffer
    for piece in pieces[1:]:
        conn.data_received(piece)
    assert sink.data == replies
    assert sink.events[-1] == ("ready", "I")
    assert conn.clean
    # Nothing is collected for a message that is nearly there, and the offset of its header counts.
    assert collector(big[: len(big) - COLLECT_FROM], 0) is None
    assert collector(b"\0" * 10 + big[:100], 10) is not None


# -- read-your-writes' capture ----------------------------------------------------------------------------


class Client:
    def __init__(self) -> None:
        self.lsns: list[int | None] = []

    def captured(self, capture: Capture, lsn: int | None) -> None:
        self.lsns.append(lsn)


def test_capture_reads_its_row_swallows_the_reply_and_ends_the_unit() -> None:
    conn, transport, sink = memory_connection()
    conn.identity = ("7000000000000000001", "00000001", "2026-12-06 22:00:00+00")
    writes, client = Writes(), Client()
    Capture(writes, ("user", "app"), conn, client).send()
    assert transport.writes == [CAPTURE_QUERY]
    row = m.row_description([("lsn", 3220)]) + m.data_row(["0/3000060"]) + m.command_complete("SELECT 1")
    conn.data_received(row + IDLE)
    assert client.lsns == [0x3000060]
    assert writes.tokens[("user", "app")] == 0x3000060
    assert sink.events == [("ready", "I")]  # nothing for the client to read, but its lease may end now


def test_on_row_entry_sees_data_rows_only() -> None:
    rows: list[bytes] = []
    done = Done()
    q, sink = queue(Expect(K_SYNC, SWALLOW, on_done=done, on_row=rows.append))
    feed_all(q, m.row_description([("a", 25)]) + m.data_row(["1"]) + m.data_row([None]) + IDLE)
    assert rows == [m.data_row(["1"])[5:], m.data_row([None])[5:]]
    assert done.calls == [True]
    assert sink.events == [("ready", "I")]


def _commit_then_capture() -> tuple[ReplyQueue, Sink, list[bytes]]:
    """A COMMIT's entry with a capture queued right behind it; the capture emits its position."""
    rows: list[bytes] = []
    q, sink = queue(Expect(K_SYNC))
    q.push(Expect(K_SYNC, SWALLOW, on_done=lambda ok: ok and q.emit(b"S-position"), on_row=rows.append))
    return q, sink, rows


CAPTURED = m.row_description([("lsn", 3220)]) + m.data_row(["0/3000060"]) + m.command_complete("SELECT 1")


def test_ready_for_query_waits_for_the_capture_behind_it() -> None:
    """The COMMIT's reply goes at once but its ReadyForQuery waits for the capture's reply: the client
    hears the position first, and its unit ends (``upstream_ready``) once, after both."""
    q, sink, rows = _commit_then_capture()
    feed_all(q, m.command_complete("COMMIT") + IDLE)
    assert sink.events == [("data", m.command_complete("COMMIT"))]
    feed_all(q, CAPTURED + IDLE)
    assert sink.events[1:] == [("data", b"S-position" + IDLE), ("ready", "I")]
    assert rows == [m.data_row(["0/3000060"])[5:]]
    assert not q.expect and not q._held_ready


def test_commit_and_capture_replies_in_one_read_are_one_write() -> None:
    q, sink, _ = _commit_then_capture()
    feed_all(q, m.command_complete("COMMIT") + IDLE + CAPTURED + IDLE)
    assert sink.events == [("data", m.command_complete("COMMIT") + b"S-position" + IDLE), ("ready", "I")]


COMMITTED = PARSE_1 + BIND_2 + m.no_data() + m.command_complete("COMMIT") + IDLE


COMMIT_Q = m.command_complete("COMMIT") + IDLE


def _behind_capture(
    unit: Expect | None, reads: list[bytes], fast: bool, expected: list[bool] | None = None
) -> tuple[Any, ...]:
    """Feed ``reads`` to a queue of ``unit`` (None: none) with read-your-writes' capture behind it, whose
    end emits a position; ``fast``: each read offered to ``whole_unit`` first (``expected``: what it must
    answer), ``feed`` taking what it declines. What the client, the capture and the queue end with."""
    rows: list[bytes] = []
    done = Done()
    q, sink = queue() if unit is None else queue(unit)

    def emitted(ok: bool) -> None:
        done(ok)
        if ok:
            q.emit(b"S-position")

    q.push(Expect(K_SYNC, SWALLOW, on_done=emitted, on_row=rows.append))
    for i, data in enumerate(reads):
        taken = fast and q.whole_unit(data)
        assert expected is None or taken is expected[i], data
        if not taken:
            feed_all(q, data)
    queued = [(e.kind, e.action) for e in q.expect]
    return sink.events, rows, done.calls, q.status, queued, q.needs_sync, q._held_ready, q.parameters


@pytest.mark.parametrize(
    ("unit", "reads", "whole"),
    [
        (PLAIN_SYNC, [COMMITTED + CAPTURED + IDLE], [True]),
        (PLAIN_QUERY, [COMMIT_Q + CAPTURED + IDLE], [True]),
        (PLAIN_QUERY, [NOTICE + COMMIT_Q + CAPTURED + IDLE], [True]),  # the client's notice
        (PLAIN_SYNC, [COMMITTED, CAPTURED + IDLE], [True, True]),  # as PostgreSQL mostly sends them
        (PLAIN_QUERY, [COMMIT_Q, CAPTURED + IDLE], [True, True]),
        (None, [CAPTURED + IDLE], [True]),  # the capture after an autocommit write
        (PLAIN_SYNC, [COMMITTED + CAPTURED, IDLE], [False, False]),
        (PLAIN_SYNC, [COMMITTED, NOTICE + CAPTURED + IDLE], [True, False]),  # the capture's notice: dropped
        (PLAIN_SYNC, [COMMITTED, error("57014") + IDLE], [True, False]),  # the capture failed
        (PLAIN_SYNC, [COMMITTED + error("57014") + IDLE], [False]),
        (PLAIN_SYNC, [PARSE_1 + BIND_2 + SYNTAX + IDLE, CAPTURED + IDLE], [False, True]),  # the COMMIT failed
        (PLAIN_QUERY, [COMMIT_Q + ROWS + m.data_row(["1"]) + IDLE], [False]),  # two rows
        (PLAIN_QUERY, [COMMIT_Q, ROWS + m.data_row(["1"]) + IDLE], [True, False]),
    ],
)
def test_a_unit_with_the_capture_behind_it_answers_as_feed_does(
    unit: Expect | None, reads: list[bytes], whole: list[bool]
) -> None:
    """A COMMIT with read-your-writes' capture sent behind it in one write (``Capture.send``), its replies
    in one read or two: where they are whole and plain, ``whole_unit`` holds the COMMIT's ReadyForQuery,
    gives the capture its row and the client the position before that ReadyForQuery, in one write; the
    rest is ``feed``'s. The client, the capture and the queue end the same either way."""
    runs = [_behind_capture(unit, reads, True, whole), _behind_capture(unit, reads, False)]
    assert runs[0] == runs[1]
    if all(whole):  # the position, then the COMMIT's ReadyForQuery (the client had it already without one)
        ending = b"S-position" + (IDLE if unit is not None else b"")
        assert runs[0][0][-2][1].endswith(ending) and runs[0][0][-1] == ("ready", "I")


_UNIT_PARTS = [PARSE_1, BIND_2, m.no_data(), m.command_complete("COMMIT"), NOTICE, error("40001")]
_CAPTURE_PARTS = [
    m.row_description([("lsn", 3220)]),
    m.data_row(["0/3000060"]),
    m.command_complete("SELECT 1"),
]
_CAPTURE_ODD = [NOTICE, error("57014"), m.data_row(["1/2"]), msg(b"S", b"TimeZone\0UTC\0")]


@st.composite
def _commit_and_capture(draw: st.DrawFn) -> tuple[Expect | None, list[bytes]]:
    """A plain unit's reply (or none: a lone capture), the capture's (mostly as PostgreSQL sends it,
    sometimes with a notice, an error, a row more or a setting), cut into reads at message boundaries."""
    unit = draw(st.sampled_from([PLAIN_SYNC, PLAIN_QUERY, None]))
    messages: list[bytes] = []
    if unit is not None:
        messages += draw(st.lists(st.sampled_from(_UNIT_PARTS), max_size=5))
        messages.append(draw(st.sampled_from([IDLE, FAILED])))
    capture = list(_CAPTURE_PARTS)
    for _ in range(draw(st.integers(0, 2))):
        capture.insert(draw(st.integers(0, len(capture))), draw(st.sampled_from(_CAPTURE_ODD)))
    messages += [*capture, IDLE]
    cuts = sorted(draw(st.sets(st.integers(1, len(messages) - 1), max_size=3)))
    bounds = [0, *cuts, len(messages)]
    return unit, [b"".join(messages[a:b]) for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(_commit_and_capture())
def test_whole_unit_and_feed_agree_on_any_capture_reply(case: tuple[Expect | None, list[bytes]]) -> None:
    """Whatever the replies to a unit with the capture behind it hold and however they are cut into reads,
    ``whole_unit`` (falling back to ``feed`` read by read) leaves the client, the capture and the queue
    as ``feed`` alone does."""
    unit, reads = case
    runs = [_behind_capture(unit, reads, True), _behind_capture(unit, reads, False)]
    assert runs[0] == runs[1]


def test_a_held_ready_for_query_reaches_the_client_when_the_connection_is_lost() -> None:
    """The backend ends before the capture's reply: the client still gets its COMMIT's ReadyForQuery
    (the COMMIT succeeded), then hears of the loss."""
    q, sink, _ = _commit_then_capture()
    feed_all(q, m.command_complete("COMMIT") + IDLE)
    q.lost(ProxyError("57P01", "terminating connection due to administrator command"))
    assert sink.events[1:] == [("data", IDLE), ("lost", "57P01")]
