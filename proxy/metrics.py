"""Prometheus metrics (prefix ``parafort_proxy_``), in a registry of the proxy's own.

Counters that move on the hot path are plain Python ints on the objects that own them; they are read at
scrape time by a collector, so serving a statement costs no metric call. Labelled counters are published
at 0 for every label set they can take (from the roles served and the live configuration) before their
first event, so ``rate()`` and alerts see a series from the first scrape, and again after a reload.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy.config.values import DOMAINS, ROLES, table_label
from proxy.consistency import OUTCOMES
from proxy.consistency import WAIT_BUCKETS as RYW_WAIT_BUCKETS
from proxy.context import MetricsContext
from proxy.migration.shadow import DIVERGED
from proxy.migration.shadow import OUTCOMES as SHADOW_OUTCOMES
from proxy.migration.state import State
from proxy.migration.verbs import FOLLOWED
from proxy.pool.pool import WAIT_BUCKETS
from proxy.router.policy import MAIN, READ, WRITE

PREFIX = "parafort_proxy_"
# The events the data path counts in ProxyApp.statement_events (proxy/frontend/client.py).
STATEMENT_EVENTS = ("prepared", "reused", "evicted", "prepared_again_after_ddl")

K = TypeVar("K", str, tuple[str, str])


def labelled_counter(
    name: str, doc: str, labels: list[str], counts: Mapping[K, int], keys: Iterable[K]
) -> CounterMetricFamily:
    """A counter family with a series for every key of ``keys`` (at 0 until counted) plus whatever was
    counted, sorted; a key is one label value or a tuple of them."""
    family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
    out = dict.fromkeys(keys, 0)
    out.update(counts)
    for key, n in sorted(out.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [str(key)], n)
    return family


def served_roles(app: MetricsContext) -> list[str]:
    """The roles this process has pools for (fixed at start: a new URL needs a restart)."""
    served = set(app.pool_roles.values())
    return [role for role in ROLES if role in served]


def fallback_roles(app: MetricsContext) -> list[str]:
    """The roles whose statements main may serve under the live configuration: a domain role with no pool
    (not configured, so always served by main), and a served role other than main with a fallback set."""
    served = set(app.pool_roles.values())
    roles = app.config.roles

    def may_fall_back(role: str) -> bool:
        if role not in served:
            return role in DOMAINS
        return role != MAIN and roles.get(role).fallback is not None

    return [role for role in ROLES if may_fall_back(role)]


def refusable_roles(app: MetricsContext) -> list[str]:
    """The served domain roles without a fallback: while down, their statements get 57P03."""
    served = set(app.pool_roles.values())
    roles = app.config.roles
    return [role for role in DOMAINS if role in served and roles.get(role).fallback is None]


def fallback_write_tables(app: MetricsContext) -> list[tuple[str, str]]:
    """(role, table) for each table named in the domain map of a served role with a fallback: the writes
    main may take while it is down. A ``schema.*`` entry names no table: its tables appear when written."""
    served = set(app.pool_roles.values())
    config = app.config
    return [
        (role, table_label(ref.schema, ref.table))
        for role in DOMAINS
        if role in served and config.roles.get(role).fallback is not None
        for ref in getattr(config.domains, role)
        if not ref.is_wildcard
    ]


class ProxyCollector(Collector):
    """Reads the live state of one ProxyApp at scrape time."""

    def __init__(self, app: MetricsContext) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app = self.app
        served = served_roles(app)
        yield from _pool_metrics(app)
        yield from _client_metrics(app)
        yield labelled_counter(
            "routed_statements",
            "Units (statements, batches) routed, by role and kind.",
            ["role", "kind"],
            app.routed,
            ((r, k) for r in served for k in (READ, WRITE)),
        )
        yield from _ryw_metrics(app)
        yield from _fallback_metrics(app)
        events = ((r, e) for r in served for e in STATEMENT_EVENTS)
        yield labelled_counter(
            "upstream_statements",
            "Server-side prepared statements the proxy manages, by role and event: prepared, reused (a "
            "client's Parse not sent: the connection had it), evicted, prepared_again_after_ddl.",
            ["role", "event"],
            app.statement_events,
            events,
        )
        yield CounterMetricFamily(
            PREFIX + "cross_upstream_refusals",
            "Statements refused (0A000) because they need more than one upstream.",
            value=app.refusals,
        )
        yield CounterMetricFamily(
            PREFIX + "config_reloads", "Successful configuration reloads.", value=app.reloads
        )
        yield CounterMetricFamily(
            PREFIX + "config_reload_failures",
            "Reloads refused (bad configuration): the previous one keeps serving.",
            value=app.reload_failures,
        )
        yield from _login_metrics(app)
        yield from _classification_metrics(app)
        yield from _health_metrics(app)
        yield _migration_state(app)
        yield _migration_lag(app)
        yield from _migration_holds(app)
        yield from _shadow_metrics(app)


def _shadow_metrics(app: MetricsContext) -> Iterator[CounterMetricFamily]:
    """Shadow reads of migrating roles (proxy/migration/shadow.py): outcomes, divergences by statement."""
    shadow = app.migration.shadow
    yield labelled_counter(
        "migration_shadow_reads",
        "Reads of a streaming role's tables sampled (migration.shadow_sample) and run again on its own "
        "database, by outcome: match, diverged (rows differ with main unchanged meanwhile, twice), "
        "inconclusive (main's rows changed meanwhile, the target did not catch up in time, too many rows), "
        "error, dropped (queue full, or the same statement waiting in it), skipped (cannot be replayed: "
        "binary parameters, LIMIT without ORDER BY...).",
        ["role", "outcome"],
        shadow.counts,
        ((role, outcome) for role in sorted(shadow.streaming) for outcome in SHADOW_OUTCOMES),
    )
    divergences = {(s.role, s.fingerprint): s.outcomes.get(DIVERGED, 0) for s in shadow.stats.values()}
    yield labelled_counter(
        "migration_divergences",
        "Shadow reads whose rows differed between main and the role's own database, by statement "
        "fingerprint (pglast; at most 100 distinct, then other). SHOW SHADOW shows the statements.",
        ["role", "fingerprint"],
        divergences,
        (),
    )


def _migration_state(app: MetricsContext) -> GaugeMetricFamily:
    """Each domain role's migration state as a one-hot gauge (``none``: no migration recorded)."""
    family = GaugeMetricFamily(
        PREFIX + "migration_state",
        "Moving a domain role's tables to its own database: 1 for the role's stored state (planned, "
        "copying, streaming: main serves its tables; cutover, finished: its own database does; none: no "
        "migration recorded), 0 for the others.",
        labels=["role", "state"],
    )
    for role in DOMAINS:
        mig = app.migration.migrations.get(role)
        current = mig.state.value if mig is not None else "none"
        for state in ("none", *(s.value for s in State)):
            family.add_metric([role, state], 1 if state == current else 0)
    return family


def _migration_lag(app: MetricsContext) -> GaugeMetricFamily:
    """Replication lag of each role being copied or streamed, as read at the migration monitor's last poll."""
    family = GaugeMetricFamily(
        PREFIX + "migration_lag_bytes",
        "Moving a domain role's tables: the publisher's WAL position minus what the subscription has "
        "confirmed, at the last poll (main -> the role's database while copying and streaming; back to "
        "main after cutover; only roles whose replication was read).",
        labels=["role"],
    )
    monitor = app.migration
    for role in DOMAINS:
        mig = monitor.migrations.get(role)
        found = monitor.progress.get(role)
        if mig is not None and mig.state in FOLLOWED and found is not None and found.lag_bytes is not None:
            family.add_metric([role], found.lag_bytes)
    return family


def _migration_holds(app: MetricsContext) -> Iterator[Metric]:
    """Transactions a cutover (or a rollback from one) holds now, and has held since start."""
    hold = app.migration.hold
    now = GaugeMetricFamily(
        PREFIX + "migration_transactions_waiting",
        "New transactions on a migrating role's tables waiting now while a cutover or a rollback switches "
        "the database that serves them.",
        labels=["role"],
    )
    for role in DOMAINS:
        now.add_metric([role], hold.waiting.get(role, 0) if role in hold.roles else 0)
    yield now
    yield labelled_counter(
        "migration_held_transactions",
        "New transactions on a migrating role's tables that waited for a cutover or a rollback.",
        ["role"],
        hold.held_total,
        DOMAINS,
    )


def _buckets(bounds: tuple[float, ...], counts: Iterable[int]) -> list[tuple[str, float]]:
    """Cumulative histogram buckets, ``+Inf`` last, from per-bucket counts."""
    cumulative = 0
    out: list[tuple[str, float]] = []
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        cumulative += n
        out.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
    return out


def _pool_metrics(app: MetricsContext) -> Iterator[Metric]:
    """Each upstream pool: connections by state, size, waiting clients, acquire timeouts and waits."""
    conns = GaugeMetricFamily(
        PREFIX + "pool_connections",
        "Upstream connections by state.",
        labels=["role", "upstream", "state"],
    )
    pool_max = GaugeMetricFamily(PREFIX + "pool_max_connections", "Pool size.", labels=["role", "upstream"])
    waiting = GaugeMetricFamily(
        PREFIX + "pool_waiting_clients", "Clients waiting for a connection.", labels=["role", "upstream"]
    )
    timeouts = CounterMetricFamily(
        PREFIX + "pool_acquire_timeouts",
        "Acquire timeouts (SQLSTATE 53300).",
        labels=["role", "upstream"],
    )
    waits = HistogramMetricFamily(
        PREFIX + "pool_acquire_wait_seconds",
        "Time clients waited for an upstream connection.",
        labels=["role", "upstream"],
    )
    for label, pool in app.pools.items():
        role = app.pool_roles[label]
        stats = pool.stats
        waits.add_metric([role, label], _buckets(WAIT_BUCKETS, pool.wait_counts), pool.wait_sum)
        conns.add_metric([role, label, "idle"], stats.idle)
        conns.add_metric([role, label, "active"], stats.active)
        pool_max.add_metric([role, label], stats.max)
        waiting.add_metric([role, label], stats.waiting)
        timeouts.add_metric([role, label], pool.timeouts)
    yield conns
    yield waits
    yield pool_max
    yield waiting
    yield timeouts


def _client_metrics(app: MetricsContext) -> Iterator[Metric]:
    """Connected clients, and those pinned to one upstream connection."""
    yield GaugeMetricFamily(PREFIX + "client_connections", "Connected clients.", value=len(app.clients))
    yield GaugeMetricFamily(
        PREFIX + "pinned_clients",
        "Connected clients pinned to one upstream connection (LISTEN, PREPARE, WITH HOLD, temp tables, "
        "session advisory locks).",
        value=sum(1 for c in app.clients if c.pinned is not None),
    )
    yield CounterMetricFamily(
        PREFIX + "client_pins", "Clients that became pinned, since start.", value=app.pinned_total
    )


def _ryw_metrics(app: MetricsContext) -> Iterator[Metric]:
    """Read-your-writes: where replica reads ran, how long they waited, the tokens held."""
    consistency = app.consistency
    yield labelled_counter(
        "replica_reads",
        "Reads of main's tables the router sent to a replica, by where read-your-writes let them run: "
        "replica (at once), replica_after_wait (a replica caught up within max_wait), "
        "main_for_consistency (no replica had replayed what the read must see).",
        ["outcome"],
        consistency.outcomes,
        OUTCOMES,
    )
    read_waits = HistogramMetricFamily(
        PREFIX + "read_wait_seconds",
        "Time reads waited for a replica to replay their scope's last write (read-your-writes).",
    )
    read_waits.add_metric([], _buckets(RYW_WAIT_BUCKETS, consistency.wait_buckets), consistency.wait_sum)
    yield read_waits
    yield GaugeMetricFamily(
        PREFIX + "ryw_tokens",
        "Read-your-writes tokens held: scopes whose last write some replica may not have replayed yet.",
        value=len(consistency.writes.tokens),
    )


def _fallback_metrics(app: MetricsContext) -> Iterator[Metric]:
    """Units main served for a down or unconfigured role, its writes for one, and refusals for a down one."""
    yield labelled_counter(
        "fallbacks",
        "Units served by the fallback (main) for a down or unconfigured role.",
        ["role"],
        app.fallbacks,
        fallback_roles(app),
    )
    yield labelled_counter(
        "fallback_writes",
        "Writes main took for a configured role that was down (fallback: main), by role and table: rows "
        "in main's copy of the table that the proxy does not show once the role is back, to reconcile.",
        ["role", "table"],
        app.fallback_writes,
        fallback_write_tables(app),
    )
    yield labelled_counter(
        "down_refusals",
        "Statements refused with 57P03 because their role is configured, down and has no fallback.",
        ["role"],
        app.down_refusals,
        refusable_roles(app),
    )


def _classification_metrics(app: MetricsContext) -> Iterator[CounterMetricFamily]:
    """The classification cache, and the classifier child that takes statements above 4 KB."""
    cache = app.classifier
    yield CounterMetricFamily(
        PREFIX + "classification_cache_hits", "Classification cache hits.", value=cache.hits
    )
    yield CounterMetricFamily(
        PREFIX + "classification_cache_misses", "Classification cache misses.", value=cache.misses
    )
    worker = app.classifier_worker
    events = CounterMetricFamily(
        PREFIX + "classifier_worker_events",
        "Large statements classified in the classifier child process, and its starts, deaths (a "
        "statement it crashed on goes to main unclassified) and deadlines missed.",
        labels=["event"],
    )
    for event, n in (
        ("classified", worker.requests),
        ("started", worker.starts),
        ("died", worker.crashes),
        ("timeout", worker.timeouts),
    ):
        events.add_metric([event], n)
    yield events


def _login_metrics(app: MetricsContext) -> Iterator[CounterMetricFamily]:
    """Failed logins by reason, and the PBKDF2 runs behind plain-text users-file passwords."""
    yield labelled_counter(
        "login_failures",
        "Failed client logins by reason (unknown_user, wrong_password, empty_password, method_mismatch, "
        "unsupported_mechanism, malformed_auth_message, client_disconnected, login_timeout, "
        "admin_not_allowed, upstream_unavailable, aborted).",
        ["reason"],
        app.login_failures.counts,
        (),
    )
    yield CounterMetricFamily(
        PREFIX + "scram_key_derivations",
        "PBKDF2 runs deriving SCRAM keys from plain-text users-file passwords: at most one per user per "
        "users-file load, however many logins fail.",
        value=app.scram_derivations_before + app.scram_keys.derivations,
    )


def _health_metrics(app: MetricsContext) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Upstream up/down, replica lag, probe duration and up/down transitions, from the health monitor."""
    up = GaugeMetricFamily(
        PREFIX + "upstream_up", "1 while the upstream passes its health probes.", labels=["role", "upstream"]
    )
    lag_seconds = GaugeMetricFamily(
        PREFIX + "replica_lag_seconds", "Replica replay lag behind main, in seconds.", labels=["upstream"]
    )
    lag_bytes = GaugeMetricFamily(
        PREFIX + "replica_lag_bytes",
        "Replica replay position behind main's WAL, in bytes.",
        labels=["upstream"],
    )
    duration = GaugeMetricFamily(
        PREFIX + "probe_duration_seconds", "Duration of the last health probe.", labels=["role", "upstream"]
    )
    transitions = CounterMetricFamily(
        PREFIX + "health_transitions", "Up/down transitions of the upstream.", labels=["role", "upstream"]
    )
    for label, h in app.health.snapshot().items():
        up.add_metric([h.role, label], 1 if h.up else 0)
        if h.lag_seconds is not None:
            lag_seconds.add_metric([label], h.lag_seconds)
        if h.lag_bytes is not None:
            lag_bytes.add_metric([label], h.lag_bytes)
        if h.last_probe_duration_seconds is not None:
            duration.add_metric([h.role, label], h.last_probe_duration_seconds)
        transitions.add_metric([h.role, label], h.transitions)
    yield up
    yield lag_seconds
    yield lag_bytes
    yield duration
    yield transitions


def make_registry(app: MetricsContext) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ProxyCollector(app))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
