"""Health: the up/down state machine, replica lag arithmetic, LSN parsing and the monitor's view, without
servers (one test probes a closed local port to drive the real probe loop)."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.config.dsn import parse_dsn
from proxy.dev.cluster import free_port
from proxy.health import (
    CAUGHT_UP_SLACK_BYTES,
    Change,
    HealthMonitor,
    ProbeResult,
    UpstreamState,
    describe_error,
    parse_lsn,
    replica_lag,
)

FIVE = {
    "DATABASE_URL": "postgresql://app:main-secret@db-main:5432/parafort_main",
    "ANALYTICS_DATABASE_URL": "postgresql://an:an-secret@db-an:5433/parafort_analytics",
    "DOCUMENTS_DATABASE_URL": "postgresql://doc:doc-secret@db-doc/parafort_documents",
    "COMPLIANCE_DATABASE_URL": "postgres://co:co-secret@db-co:6000/parafort_compliance",
    "READ_REPLICA_DATABASE_URL": "postgresql://app:rep-secret@db-rep:5432/parafort_main",
}
OK = ProbeResult(ok=True, duration=0.01)
FAIL = ProbeResult(ok=False, duration=0.5, error="timed out after 0.5s")
GIB = 1 << 32


def replica_ok(replay: int, receive: int | None = None, age: float | None = 5.0) -> ProbeResult:
    return ProbeResult(
        ok=True,
        duration=0.01,
        in_recovery=True,
        replay_lsn=replay,
        receive_lsn=replay if receive is None else receive,
        replay_age=age,
    )


def main_ok(lsn: int) -> ProbeResult:
    return ProbeResult(ok=True, duration=0.01, in_recovery=False, current_lsn=lsn)


# -- LSNs and lag --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/16B3748", 0x16B3748),
        ("1/0", GIB),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
        ("a/b", (0xA << 32) | 0xB),
        (None, None),
    ],
)
def test_parse_lsn(text: str | None, value: int | None) -> None:
    assert parse_lsn(text) == value


@pytest.mark.parametrize("text", ["", "0", "0/", "/0", "x/1", "1/2/3", "100000000/0", "-1/0"])
def test_parse_lsn_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_lsn(text)


def test_lsn_difference_matches_pg_wal_lsn_diff() -> None:
    # SELECT pg_wal_lsn_diff('1/0', '0/FFFFFF00') = 256
    assert parse_lsn("1/0") - parse_lsn("0/FFFFFF00") == 256  # type: ignore[operator]


def test_idle_primary_is_no_lag_however_old_the_last_transaction() -> None:
    # Replayed all it received, level with main: the hour-old last commit is an idle primary, not lag.
    assert replica_lag(5000, 5000, 5000, 3600.0) == (0.0, 0)
    # A few small records (standby snapshot, checkpoint) read a moment apart are still "level".
    assert replica_lag(5000 + CAUGHT_UP_SLACK_BYTES, 5000, 5000, 3600.0) == (0.0, CAUGHT_UP_SLACK_BYTES)
    # Replica probed after main wrote more than main's probe saw: never negative.
    assert replica_lag(5000, 6000, 6000, 3600.0) == (0.0, 0)


def test_replay_behind_receive_is_lag_of_the_last_replayed_transaction() -> None:
    assert replica_lag(9000, 5000, 9000, 12.5) == (12.5, 4000)
    # Replay paused with main idle since: lag bytes known from the receive position even without main.
    assert replica_lag(None, 5000, 9000, 3.0) == (3.0, None)


def test_receiver_behind_main_is_lag_even_when_replay_is_level_with_receive() -> None:
    # The walreceiver stopped: replay == receive, but main is far ahead.
    assert replica_lag(GIB, 5000, 5000, 40.0) == (40.0, GIB - 5000)


def test_lag_unknown_parts() -> None:
    assert replica_lag(None, 5000, 5000, 99.0) == (0.0, None)  # main never probed: nothing to compare
    assert replica_lag(9000, 5000, 9000, None) == (None, 4000)  # nothing replayed since start
    assert replica_lag(None, None, None, None) == (None, None)


# -- the state machine ---------------------------------------------------------------------------------------


def test_unknown_counts_as_up_and_the_first_verdict_is_not_a_transition() -> None:
    s = UpstreamState("main", "main", failures_before_down=3, successes_before_up=2)
    assert s.status == "unknown" and s.up
    assert s.record(OK) is None  # 1 of 2
    assert s.record(OK) == Change(up=True, reason="2 probe(s) ok", initial=True)
    assert s.status == "up" and s.transitions == 0


def test_down_after_failures_before_down_consecutive_failures() -> None:
    s = UpstreamState("analytics", "analytics", failures_before_down=3, successes_before_up=2)
    s.record(OK)
    s.record(OK)
    assert s.record(FAIL) is None
    assert s.record(FAIL) is None
    assert s.up and s.consecutive_failures == 2
    change = s.record(FAIL)
    assert change == Change(up=False, reason="timed out after 0.5s")
    assert not s.up and s.transitions == 1 and s.last_error == "timed out after 0.5s"
    assert s.record(FAIL) is None  # stays down, no new transition
    assert s.consecutive_failures == 4 and s.transitions == 1


def test_a_success_resets_the_failure_run() -> None:
    s = UpstreamState("analytics", "analytics", failures_before_down=2, successes_before_up=1)
    for _ in range(5):
        assert s.record(FAIL) is None
        assert s.record(OK) in (None, Change(up=True, reason="1 probe(s) ok", initial=True))
    assert s.up and s.transitions == 0


def test_up_again_after_successes_before_up_consecutive_successes() -> None:
    s = UpstreamState("documents", "documents", failures_before_down=1, successes_before_up=3)
    assert s.record(FAIL) == Change(up=False, reason="timed out after 0.5s")  # unknown -> down counts
    assert s.record(OK) is None
    assert s.record(OK) is None
    assert s.record(FAIL) is None  # the success run starts over
    assert s.record(OK) is None
    assert s.record(OK) is None
    assert not s.up
    assert s.record(OK) == Change(up=True, reason="3 probe(s) ok")
    assert s.up and s.transitions == 2 and s.consecutive_failures == 0


def test_suspect_is_down_at_once_and_needs_a_full_run_of_successes() -> None:
    s = UpstreamState("compliance", "compliance", failures_before_down=3, successes_before_up=2)
    s.record(OK)
    s.record(OK)
    change = s.suspect("connection refused")
    assert change == Change(up=False, reason="suspect: connection refused")
    assert not s.up and s.transitions == 1 and s.last_error == "suspect: connection refused"
    assert s.suspect("again") is None  # already down: no new transition
    assert s.record(OK) is None
    assert s.suspect("once more") is None  # resets the success run
    assert s.record(OK) is None
    assert s.record(OK) == Change(up=True, reason="2 probe(s) ok")
    assert s.transitions == 2


def test_suspect_while_unknown_is_a_transition() -> None:
    s = UpstreamState("main", "main", failures_before_down=3, successes_before_up=1)
    assert s.suspect("refused") == Change(up=False, reason="suspect: refused")
    assert s.transitions == 1


def test_replica_not_in_recovery_is_down_at_once() -> None:
    s = UpstreamState("replica-a", "read_replica", failures_before_down=3, successes_before_up=1)
    s.record(replica_ok(100))
    promoted = ProbeResult(ok=True, duration=0.01, in_recovery=False)
    change = s.record(promoted)
    assert change is not None and not change.up and "not in recovery" in change.reason
    assert not s.up and s.lag_seconds is None and s.lag_bytes is None
    assert s.record(replica_ok(100)) == Change(up=True, reason="1 probe(s) ok")  # demoted back


def test_replica_lag_is_recorded_against_mains_position() -> None:
    s = UpstreamState("read_replica", "read_replica", failures_before_down=3, successes_before_up=1)
    s.record(replica_ok(5000, receive=9000, age=2.5), main_lsn=9000)
    assert (s.lag_seconds, s.lag_bytes) == (2.5, 4000)
    assert not s.within_lag(max_lag=1.0, max_lag_bytes=None)
    assert s.within_lag(max_lag=10.0, max_lag_bytes=None)
    assert not s.within_lag(max_lag=10.0, max_lag_bytes=3999)
    assert s.within_lag(max_lag=10.0, max_lag_bytes=4000)
    s.record(replica_ok(9000, age=3600.0), main_lsn=9000)  # caught up, main idle for an hour
    assert (s.lag_seconds, s.lag_bytes) == (0.0, 0)
    assert s.within_lag(max_lag=1.0, max_lag_bytes=0)


# -- the monitor (fed results, no probes running) ------------------------------------------------------------


def replicas_config(tmp_path: Path, extra: str = "") -> HealthMonitor:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        textwrap.dedent(
            """
            roles:
              read_replica:
                replicas:
                  - {name: replica-a, url: "postgresql://app:ra-secret@db-ra/parafort_main"}
                  - {name: replica-b, url: "postgresql://app:rb-secret@db-rb/parafort_main"}
            health:
              failures_before_down: 2
              successes_before_up: 1
              max_replica_lag: 5s
            """
        )
        + extra
    )
    env = {k: v for k, v in FIVE.items() if k != "READ_REPLICA_DATABASE_URL"}
    return HealthMonitor(load_config(path, env))


def test_monitor_knows_every_configured_upstream_by_label(tmp_path: Path) -> None:
    monitor = HealthMonitor(load_config(None, {"DATABASE_URL": FIVE["DATABASE_URL"]}))
    assert monitor.labels == ("main",)
    assert monitor.replica_labels() == ()
    assert not monitor.usable("analytics") and not monitor.up("analytics")  # not configured
    assert monitor.usable("main") and monitor.up("main")  # unknown: routed as up
    five = HealthMonitor(load_config(None, FIVE))
    assert five.labels == ("main", "analytics", "documents", "compliance", "read_replica")
    assert five.replica_labels() == ("read_replica",)
    many = replicas_config(tmp_path)
    assert many.replica_labels() == ("replica-a", "replica-b")
    assert set(many.snapshot()) == {"main", "analytics", "documents", "compliance", "replica-a", "replica-b"}


def test_monitor_usable_takes_replica_lag_into_account(tmp_path: Path) -> None:
    monitor = replicas_config(tmp_path)
    monitor.record("main", main_ok(10 * GIB))
    monitor.record("replica-a", replica_ok(10 * GIB, age=900.0))  # idle primary: usable
    monitor.record("replica-b", replica_ok(10 * GIB - 50_000, receive=10 * GIB, age=7.0))
    assert monitor.usable("replica-a") and monitor.up("replica-a")
    assert not monitor.usable("replica-b") and monitor.up("replica-b")  # up, but 7 s > 5 s behind
    snap = monitor.snapshot()["replica-b"]
    assert (snap.up, snap.usable, snap.lag_seconds, snap.lag_bytes) == (True, False, 7.0, 50_000)
    assert snap.role == "read_replica" and snap.last_probe_duration_seconds == 0.01
    monitor.record("replica-b", replica_ok(10 * GIB, age=7.0))
    assert monitor.usable("replica-b")


def test_monitor_lag_bytes_limit(tmp_path: Path) -> None:
    monitor = replicas_config(tmp_path, "  max_replica_lag_bytes: 1000\n")
    monitor.record("main", main_ok(GIB + 1500))
    monitor.record("replica-a", replica_ok(GIB, age=0.1))
    assert not monitor.usable("replica-a")  # 1500 bytes behind
    monitor.record("main", main_ok(GIB + 900))
    monitor.record("replica-a", replica_ok(GIB, age=0.1))
    assert monitor.usable("replica-a")


def test_monitor_transitions_call_back_and_log(caplog: pytest.LogCaptureFixture) -> None:
    monitor = HealthMonitor(load_config(None, FIVE))
    seen: list[tuple[str, bool]] = []
    monitor.on_change(lambda label, up: seen.append((label, up)))
    monitor.on_change(lambda label, up: 1 / 0)  # a broken callback does not stop the others
    caplog.set_level(logging.INFO, logger="parafort.health")
    monitor.record("analytics", OK)  # first verdict: up, no transition
    assert seen == []
    for _ in range(3):
        monitor.record("analytics", FAIL)
    assert seen == [("analytics", False)]
    monitor.mark_suspect("documents", "connection refused")
    monitor.mark_suspect("nope", "unknown labels are ignored")
    for _ in range(2):
        monitor.record("analytics", OK)
    assert seen == [("analytics", False), ("documents", False), ("analytics", True)]
    assert monitor.snapshot()["analytics"].transitions == 2
    lines = [r.getMessage() for r in caplog.records if "health_change" in r.getMessage()]
    assert lines == [
        "event=health_change upstream=analytics role=analytics up=false reason='timed out after 0.5s'",
        "event=health_change upstream=documents role=documents up=false reason='suspect: connection refused'",
        "event=health_change upstream=analytics role=analytics up=true reason='2 probe(s) ok'",
    ]
    levels = [r.levelno for r in caplog.records if "health_change" in r.getMessage()]
    assert levels == [logging.WARNING, logging.WARNING, logging.INFO]


def test_describe_error_is_short_and_masks_the_password() -> None:
    dsn = parse_dsn("postgresql://app:hunter2-pw@db:5432/x")
    assert describe_error(TimeoutError(), dsn, 0.5) == "timed out after 0.5s"
    refused = ConnectionRefusedError(111, "Connect call failed")
    assert describe_error(refused, dsn, 1) == "cannot connect to db:5432: Connect call failed"
    text = describe_error(RuntimeError("bad\nthing hunter2-pw " + "x" * 500), dsn, 1)
    assert "hunter2-pw" not in text and "\n" not in text and len(text) <= 200
    assert text.startswith("RuntimeError: bad thing *** xxx")


# -- the probe loop against a closed port --------------------------------------------------------------------


async def eventually(predicate: Callable[[], bool]) -> None:
    """Poll until true; bound it with ``asyncio.timeout`` around the call."""
    while True:
        if predicate():
            return
        await asyncio.sleep(0.01)


def test_probe_loop_marks_an_unreachable_upstream_down_and_stops_cleanly() -> None:
    port = free_port()  # nothing listens there
    env = {"DATABASE_URL": f"postgresql://app:loop-secret@127.0.0.1:{port}/x"}
    config = load_config(None, env)
    config = config.model_copy(
        update={"health": config.health.model_copy(update={"interval": 60.0, "failures_before_down": 1})}
    )

    async def scenario() -> None:
        monitor = HealthMonitor(config)
        went_down = asyncio.Event()
        monitor.on_change(lambda label, up: went_down.set())
        await monitor.start()
        try:
            async with asyncio.timeout(5):  # the first probe runs at once, not after the 60 s interval
                await went_down.wait()
            assert not monitor.up("main") and not monitor.usable("main")
            snap = monitor.snapshot()["main"]
            assert snap.consecutive_failures == 1 and snap.transitions == 1
            assert snap.last_error is not None and "loop-secret" not in snap.last_error
            assert snap.last_error.startswith(f"cannot connect to 127.0.0.1:{port}")
            monitor.mark_suspect("main", "data path refused")  # probes again at once
            async with asyncio.timeout(5):  # well before the 60 s interval
                await eventually(lambda: monitor.snapshot()["main"].consecutive_failures >= 2)
        finally:
            await monitor.stop()
        assert all(t.done() for t in asyncio.all_tasks() if t.get_name().startswith("health-"))

    asyncio.run(scenario())


def test_data_path_connect_marks_a_primary_up_at_once_never_a_replica(tmp_path: Path) -> None:
    monitor = replicas_config(tmp_path)
    changes: list[tuple[str, bool]] = []
    monitor.on_change(lambda label, up: changes.append((label, up)))
    monitor.mark_suspect("main", "connection refused")
    monitor.mark_suspect("replica-a", "connection refused")
    assert not monitor.usable("main") and not monitor.usable("replica-a")
    monitor.mark_connected("main")
    monitor.mark_connected("replica-a")  # says nothing of recovery or lag: waits for its probes
    assert monitor.usable("main") and not monitor.usable("replica-a")
    assert changes == [("main", False), ("replica-a", False), ("main", True)]
    monitor.mark_connected("main")  # already up: no transition
    assert monitor.snapshot()["main"].transitions == 2
