"""Health of every configured upstream: asyncpg probes, an up/down state machine, and replica lag.

The state machine (``UpstreamState``) and the lag arithmetic are pure: they are fed ``ProbeResult``s and
never touch the network, so they are tested without servers. ``HealthMonitor`` runs one probe task per
upstream and is what the router, the data path, the admin endpoints and the metrics read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from proxy.config import Config
from proxy.config.dsn import Dsn
from proxy.config.model import HealthConfig, ReadReplicaConfig
from proxy.config.values import ROLES
from proxy.tls import asyncpg_ssl

log = logging.getLogger("parafort.health")

REPLICA_ROLE = "read_replica"
# Bytes behind main that still count as "caught up" when deciding whether the age of the last replayed
# transaction is real lag: main's position and the replica's are read by two probes a moment apart, and an
# idle primary still writes small records (standby snapshots, checkpoints) that carry no commit timestamp.
CAUGHT_UP_SLACK_BYTES = 8192
# Probes woken early by mark_suspect run at most this often (a storm of data-path failures is one probe).
MIN_PROBE_GAP = 0.05
MAX_ERROR_LENGTH = 200

MAIN_QUERY = (
    "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END"
)
PRIMARY_QUERY = "SELECT 1"
REPLICA_QUERY = (
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text, "
    "extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"
)


def parse_lsn(text: str | None) -> int | None:
    """A ``pg_lsn`` in its text form ``X/Y`` (two hex numbers) as an int, as ``pg_wal_lsn_diff`` sees it.

    None stays None; anything else that is not an LSN raises ValueError.
    """
    if text is None:
        return None
    high, sep, low = text.strip().partition("/")
    if not sep or not high or not low:
        raise ValueError(f"bad LSN {text!r}")
    hi, lo = int(high, 16), int(low, 16)
    if not (0 <= hi < 2**32 and 0 <= lo < 2**32):
        raise ValueError(f"bad LSN {text!r}")
    return (hi << 32) | lo


def replica_lag(
    main_lsn: int | None, replay_lsn: int | None, receive_lsn: int | None, replay_age: float | None
) -> tuple[float | None, int | None]:
    """(lag seconds, lag bytes) of a replica; None where it cannot be known.

    Bytes: main's current WAL position minus the replica's replay position (never negative: the two are
    read a moment apart). Seconds: 0 when the replica has replayed all it received and is (about) level
    with main; an idle primary commits nothing, so the age of the last replayed transaction grows forever
    and is no lag. Otherwise that age: the replica is at least that far behind.
    """
    lag_bytes = max(0, main_lsn - replay_lsn) if main_lsn is not None and replay_lsn is not None else None
    replayed_all = replay_lsn is not None and (receive_lsn is None or replay_lsn >= receive_lsn)
    if replayed_all and (lag_bytes is None or lag_bytes <= CAUGHT_UP_SLACK_BYTES):
        return 0.0, lag_bytes
    return (max(0.0, replay_age) if replay_age is not None else None), lag_bytes


@dataclass(frozen=True)
class ProbeResult:
    """One probe's outcome. ``ok`` False carries ``error``; replica fields are None for other roles."""

    ok: bool
    duration: float
    error: str | None = None
    in_recovery: bool | None = None
    current_lsn: int | None = None  # main only: pg_current_wal_lsn() when not in recovery
    replay_lsn: int | None = None
    receive_lsn: int | None = None
    replay_age: float | None = None  # seconds since the last replayed transaction's commit


@dataclass(frozen=True)
class Change:
    """A verdict reached by UpstreamState. ``initial``: the first verdict confirmed the optimistic start
    (unknown, routed as up) — the up/down value did not change, so it is no transition."""

    up: bool
    reason: str
    initial: bool = False


@dataclass(frozen=True)
class UpstreamHealth:
    """A snapshot of one upstream's health, for the endpoints, the metrics and the router."""

    label: str
    role: str
    up: bool
    usable: bool
    lag_seconds: float | None
    lag_bytes: int | None
    last_error: str | None
    last_probe_duration_seconds: float | None
    consecutive_failures: int
    transitions: int


class UpstreamState:
    """Up/down hysteresis of one upstream, fed probe results; no I/O.

    Starts ``unknown`` (routed as up). ``failures_before_down`` consecutive failures make it down,
    ``successes_before_up`` consecutive successes make it up. A replica that is not in recovery, and a
    data-path connect failure (``suspect``), make it down at once; a data-path connect success
    (``connected``, primaries only) makes it up at once.
    """

    def __init__(self, label: str, role: str, failures_before_down: int, successes_before_up: int) -> None:
        self.label = label
        self.role = role
        self.failures_before_down = failures_before_down
        self.successes_before_up = successes_before_up
        self.status: Literal["unknown", "up", "down"] = "unknown"
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.transitions = 0
        self.last_error: str | None = None
        self.last_probe_duration: float | None = None
        self.lag_seconds: float | None = None
        self.lag_bytes: int | None = None

    @property
    def is_replica(self) -> bool:
        return self.role == REPLICA_ROLE

    @property
    def up(self) -> bool:
        return self.status != "down"

    def within_lag(self, max_lag: float, max_lag_bytes: int | None) -> bool:
        """Whether the replica's known lag is within the limits (unknown lag does not count against it)."""
        if self.lag_seconds is not None and self.lag_seconds > max_lag:
            return False
        return max_lag_bytes is None or self.lag_bytes is None or self.lag_bytes <= max_lag_bytes

    def record(self, result: ProbeResult, main_lsn: int | None = None) -> Change | None:
        """Take one probe result (``main_lsn``: main's latest WAL position, for replica lag)."""
        self.last_probe_duration = result.duration
        if not result.ok:
            return self._failure(result.error or "probe failed")
        if self.is_replica:
            if result.in_recovery is False:
                self.lag_seconds = self.lag_bytes = None
                reason = "not in recovery (promoted, or not a standby): takes no replica reads"
                self.consecutive_failures = max(self.consecutive_failures, self.failures_before_down - 1)
                return self._failure(reason)
            self.lag_seconds, self.lag_bytes = replica_lag(
                main_lsn, result.replay_lsn, result.receive_lsn, result.replay_age
            )
        return self._success()

    def suspect(self, reason: str) -> Change | None:
        """The data path failed to connect: down at once; up again only after a full run of successes."""
        self.consecutive_successes = 0
        self.last_error = f"suspect: {reason}"[:MAX_ERROR_LENGTH]
        return self._set("down", self.last_error)

    def connected(self) -> Change | None:
        """The data path connected (a primary): up at once, as a failed connect makes it down at once."""
        self.consecutive_failures = 0
        return self._set("up", "data path connected")

    def _failure(self, error: str) -> Change | None:
        self.consecutive_successes = 0
        self.consecutive_failures += 1
        self.last_error = error
        if self.consecutive_failures >= self.failures_before_down:
            return self._set("down", error)
        return None

    def _success(self) -> Change | None:
        self.consecutive_failures = 0
        self.consecutive_successes += 1
        if self.status != "up" and self.consecutive_successes >= self.successes_before_up:
            reason = f"{self.consecutive_successes} probe(s) ok"
            return self._set("up", reason)
        return None

    def _set(self, status: Literal["up", "down"], reason: str) -> Change | None:
        if status == self.status:
            return None
        was_up = self.up
        self.status = status
        if was_up == self.up:
            return Change(up=self.up, reason=reason, initial=True)
        self.transitions += 1
        return Change(up=self.up, reason=reason)


@dataclass(eq=False)
class _Upstream:
    """One probed upstream: its state, its probe connection and task."""

    state: UpstreamState
    dsn: Dsn
    wake: asyncio.Event
    conn: Any = None  # asyncpg.Connection (untyped)
    task: asyncio.Task[None] | None = None
    lagging: bool = False


class HealthMonitor:
    """Probes every configured upstream (main, analytics, documents, compliance, each replica by label)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = config.health
        self._upstreams: dict[str, _Upstream] = {}
        self._callbacks: list[Callable[[str, bool], None]] = []
        self._usable_callbacks: list[Callable[[str], None]] = []
        self._main_lsn: int | None = None
        self._replay_callbacks: list[Callable[..., None]] = []
        h = self.settings
        for role in ROLES:
            rc = config.roles.get(role)
            if not rc.configured:
                continue
            if isinstance(rc, ReadReplicaConfig):
                targets = [(r.name, r.dsn) for r in rc.upstreams]
            else:
                assert rc.dsn is not None
                targets = [(role, rc.dsn)]
            for label, dsn in targets:
                state = UpstreamState(label, role, h.failures_before_down, h.successes_before_up)
                self._upstreams[label] = _Upstream(state, dsn, asyncio.Event())

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start one probe task per upstream; each probes at once, then every ``interval``."""
        loop = asyncio.get_running_loop()
        for up in self._upstreams.values():
            if up.task is None:
                up.task = loop.create_task(self._run(up), name=f"health-{up.state.label}")

    async def stop(self) -> None:
        """Cancel the probe tasks and close the probe connections."""
        tasks = [up.task for up in self._upstreams.values() if up.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for up in self._upstreams.values():
            up.task = None
            conn, up.conn = up.conn, None
            await close(conn)

    # -- what the router, the data path and the endpoints ask -----------------------------------------------
    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self._upstreams)

    def replica_labels(self) -> tuple[str, ...]:
        return tuple(label for label, up in self._upstreams.items() if up.state.is_replica)

    def up(self, label: str) -> bool:
        """The raw up/down state (unknown counts as up); False for an unconfigured label."""
        up = self._upstreams.get(label)
        return up is not None and up.state.up

    def usable(self, label: str) -> bool:
        """Configured, up, and for a replica within ``max_replica_lag`` and ``max_replica_lag_bytes``."""
        up = self._upstreams.get(label)
        if up is None or not up.state.up:
            return False
        return not up.state.is_replica or self._within_lag(up.state)

    def mark_suspect(self, label: str, reason: str) -> None:
        """The data path could not connect to ``label``: down now, and probe it at once."""
        up = self._upstreams.get(label)
        if up is None:
            return
        self._announce(up.state, up.state.suspect(reason))
        up.wake.set()

    def mark_connected(self, label: str) -> None:
        """The data path opened a connection to ``label``: a primary marked down is up now, without
        waiting for ``successes_before_up`` probes (this ends main's degraded read-only mode at once).
        A replica waits for its probes: a connection says nothing of its recovery state or lag."""
        up = self._upstreams.get(label)
        if up is None or up.state.status != "down" or up.state.is_replica:
            return
        self._announce(up.state, up.state.connected())

    def update_settings(self, settings: HealthConfig) -> None:
        """A reload: new interval, timeout, thresholds and lag limits apply from the next probe."""
        self.settings = settings
        for up in self._upstreams.values():
            up.state.failures_before_down = settings.failures_before_down
            up.state.successes_before_up = settings.successes_before_up
            up.wake.set()
        for label in self._upstreams:
            self._usable_changed(label)

    def on_usable_change(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(label)`` whenever ``usable(label)`` may have changed (up/down, first verdict,
        lag over or back under the limit): the router's cached decisions are stale then."""
        self._usable_callbacks.append(callback)

    def _usable_changed(self, label: str) -> None:
        for callback in self._usable_callbacks:
            try:
                callback(label)
            except Exception:
                log.exception("event=health_callback_error upstream=%s", label)

    def on_replay(self, callback: Callable[..., None]) -> None:
        """Call ``callback(label, replay_lsn, sweep=True)`` with each replica probe's replay position."""
        self._replay_callbacks.append(callback)

    def on_change(self, callback: Callable[[str, bool], None]) -> None:
        """Call ``callback(label, up)`` on every up/down transition."""
        self._callbacks.append(callback)

    def snapshot(self) -> dict[str, UpstreamHealth]:
        """Every configured upstream's health, by label (main first, replicas last)."""
        return {label: self._health(up.state) for label, up in self._upstreams.items()}

    def _health(self, s: UpstreamState) -> UpstreamHealth:
        return UpstreamHealth(
            label=s.label,
            role=s.role,
            up=s.up,
            usable=self.usable(s.label),
            lag_seconds=s.lag_seconds,
            lag_bytes=s.lag_bytes,
            last_error=s.last_error,
            last_probe_duration_seconds=s.last_probe_duration,
            consecutive_failures=s.consecutive_failures,
            transitions=s.transitions,
        )

    # -- probing --------------------------------------------------------------------------------------------
    def _within_lag(self, state: UpstreamState) -> bool:
        return state.within_lag(self.settings.max_replica_lag, self.settings.max_replica_lag_bytes)

    async def _run(self, up: _Upstream) -> None:
        loop = asyncio.get_running_loop()
        while True:
            up.wake.clear()  # a suspect raised while this probe runs earns another probe right after
            started = loop.time()
            try:
                self.record(up.state.label, await self._probe(up))
            except Exception:  # a bug here must not end probing of this upstream
                log.exception("event=health_probe_error upstream=%s", up.state.label)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, started + self.settings.interval - loop.time())):
                    await up.wake.wait()
            gap = started + min(MIN_PROBE_GAP, self.settings.interval) - loop.time()
            if gap > 0:
                await asyncio.sleep(gap)

    async def _probe(self, up: _Upstream) -> ProbeResult:
        state, timeout = up.state, self.settings.timeout
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                if up.conn is None or up.conn.is_closed():
                    up.conn = None
                    up.conn = await self._connect(up.dsn, timeout)
                if state.is_replica:
                    row = await up.conn.fetchrow(REPLICA_QUERY)
                elif state.role == "main":
                    row = await up.conn.fetchrow(MAIN_QUERY)
                else:
                    row = await up.conn.fetchrow(PRIMARY_QUERY)
        except asyncio.CancelledError:
            self._drop(up)  # stopped mid-probe: a half-used connection is not worth closing politely
            raise
        except Exception as exc:
            self._drop(up)  # after a timeout mid-query it is unusable; reconnect next time
            return ProbeResult(
                ok=False, duration=time.monotonic() - t0, error=describe_error(exc, up.dsn, timeout)
            )
        duration = time.monotonic() - t0
        if state.is_replica:
            return ProbeResult(
                ok=True,
                duration=duration,
                in_recovery=row[0],
                replay_lsn=parse_lsn(row[1]),
                receive_lsn=parse_lsn(row[2]),
                replay_age=row[3],
            )
        if state.role == "main":
            return ProbeResult(ok=True, duration=duration, in_recovery=row[0], current_lsn=parse_lsn(row[1]))
        return ProbeResult(ok=True, duration=duration)

    @staticmethod
    def _drop(up: _Upstream) -> None:
        conn, up.conn = up.conn, None
        if conn is not None:
            conn.terminate()

    @staticmethod
    async def _connect(dsn: Dsn, connect_timeout: float) -> Any:
        return await connect(dsn, connect_timeout, "health")

    def record(self, label: str, result: ProbeResult) -> None:
        """Feed one probe result for ``label`` (what its probe task does after each probe)."""
        up = self._upstreams[label]
        state = up.state
        if state.role == "main" and result.ok and result.current_lsn is not None:
            self._main_lsn = result.current_lsn
        self._announce(state, state.record(result, self._main_lsn))
        if state.is_replica and result.ok and result.replay_lsn is not None:
            for callback in self._replay_callbacks:
                callback(label, result.replay_lsn, sweep=True)
        if state.is_replica:
            lagging = state.up and not self._within_lag(state)
            if lagging != up.lagging:
                up.lagging = lagging
                self._usable_changed(state.label)
                level = logging.WARNING if lagging else logging.INFO
                log.log(
                    level,
                    "event=replica_lag upstream=%s lagging=%s lag_seconds=%s lag_bytes=%s",
                    state.label,
                    "true" if lagging else "false",
                    "unknown" if state.lag_seconds is None else f"{state.lag_seconds:.3f}",
                    "unknown" if state.lag_bytes is None else state.lag_bytes,
                )

    def _announce(self, state: UpstreamState, change: Change | None) -> None:
        if change is None:
            return
        level = logging.INFO if change.up else logging.WARNING
        event = "health_initial" if change.initial else "health_change"
        log.log(
            level,
            "event=%s upstream=%s role=%s up=%s reason=%r",
            event,
            state.label,
            state.role,
            "true" if change.up else "false",
            change.reason,
        )
        self._usable_changed(state.label)
        if change.initial:
            return
        for callback in self._callbacks:
            try:
                callback(state.label, change.up)
            except Exception:
                log.exception("event=health_callback_error upstream=%s", state.label)


async def connect(dsn: Dsn, connect_timeout: float, purpose: str) -> Any:
    """An asyncpg connection of the proxy's own (health probes, replay polling, catalog look-ups): no
    statement cache, ``application_name`` parafort-proxy-<purpose>."""
    return await asyncpg.connect(
        host=dsn.host,
        port=dsn.port,
        user=dsn.user,
        password=dsn.password,
        database=dsn.database,
        timeout=connect_timeout,
        ssl=asyncpg_ssl(dsn),
        statement_cache_size=0,
        server_settings={"application_name": f"parafort-proxy-{purpose}"},
    )


async def close(conn: Any) -> None:
    """Close a connection from ``connect`` politely (Terminate, at most 1 s), else drop it."""
    if conn is not None and not conn.is_closed():
        try:
            await asyncio.wait_for(conn.close(), 1)
        except Exception:
            conn.terminate()


def describe_error(exc: BaseException, dsn: Dsn, timeout: float) -> str:
    """A short, one-line reason for a failed probe, with the password (if it ever appears) masked."""
    if isinstance(exc, TimeoutError):
        text = f"timed out after {timeout:g}s"
    elif isinstance(exc, asyncpg.PostgresError):
        text = f"{exc.sqlstate}: {exc}"
    elif isinstance(exc, OSError):
        text = f"cannot connect to {dsn.host}:{dsn.port}: {exc.strerror or exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    if dsn.password:
        text = text.replace(dsn.password, "***")
    text = " ".join(text.split())
    return text[:MAX_ERROR_LENGTH]
