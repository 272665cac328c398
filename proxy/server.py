"""The proxy process: pools per role, the client listener, cancel routing, and the run loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path

import uvloop

from proxy import sdnotify
from proxy.admin import AdminConsole
from proxy.audit import AuditLog
from proxy.backend.connection import ServerConnection
from proxy.config import Config, ConfigError, load_config
from proxy.config.dsn import Dsn
from proxy.config.model import ReadReplicaConfig, RoleConfig, TlsConfig
from proxy.config.values import ROLES
from proxy.consistency import Consistency
from proxy.errors import SQLCLIENT_UNABLE_TO_ESTABLISH, ProxyError
from proxy.fallback_writes import FallbackWrites
from proxy.frontend.client import ClientConnection
from proxy.frontend.login_failures import LoginFailureLog
from proxy.frontend.session import PreparedStatement
from proxy.health import HealthMonitor
from proxy.http import AdminServer
from proxy.lookups import FunctionCatalog, InvalidStartupParameter, LookupFailed, MainLookups
from proxy.main_recheck import MainRecheck
from proxy.migration.joins import SeenJoins
from proxy.migration.monitor import MigrationMonitor
from proxy.pause import Pauses
from proxy.pool import Pool
from proxy.protocol.auth import ScramKeys, ServerAuth, UserlistError, load_userlist
from proxy.protocol.framing import cancel_request, new_cancel_key
from proxy.router.classify import ClassificationCache
from proxy.router.policy import Router
from proxy.router.worker import ClassifierWorker

log = logging.getLogger("parafort.server")

MAX_MESSAGE_LENGTH = 256 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
REAP_INTERVAL = 5.0
CANCEL_TIMEOUT = 5.0  # a cancel not confirmed by then retires its connection


class ProxyApp:
    """Everything one proxy process serves: built from a Config, started and stopped as a unit."""

    def __init__(self, config: Config, config_path: Path | None = None) -> None:  # noqa: PLR0915
        self.config = config
        self.config_path = config_path
        self.reloads = 0  # successful SIGHUP reloads (a metric)
        self.reload_failures = 0
        self.max_message_length = config.limits.max_message_length
        self.ssl_context = client_tls_context(config.tls)
        self.audit = AuditLog(config.audit.path) if config.audit.path else None
        self.classifier = ClassificationCache()
        self.classifier_worker = ClassifierWorker()  # large statements: a child process, started on first use
        # Unnamed Parse payloads (SQL and parameter types) -> their content-addressed statement.
        self.unnamed_statements: dict[bytes, PreparedStatement] = {}
        self.cache_unnamed = config.statements.cache_unnamed
        self.max_statements = config.statements.max_per_connection
        self._build_pools(config)
        self.replica_pools = [label for label, role in self.pool_roles.items() if role == "read_replica"]
        self.lookups = MainLookups(self.upstreams["main"])
        self.functions = FunctionCatalog(self.lookups, self._functions_loaded)  # main's STABLE/IMMUTABLE
        self._parameters_failed = False  # the last startup-parameter look-up failed (logged once)
        # Migrations (proxy/migration/): stored states, polled from main; statements a move would refuse.
        self.joins = SeenJoins(self.classifier.fingerprint_of)
        self.migration = MigrationMonitor(
            self.lookups, lambda: self.config, lambda: self.config.health.interval, self._migration_changed
        )
        self.router = Router(config, self.usable, self.functions.names, frozenset(), self.joins)
        self.refusals = 0  # statements refused for needing two upstreams (a metric)
        self.routed: dict[tuple[str, str], int] = {}  # units sent upstream, by (role, read|write)
        self.fallbacks: dict[str, int] = {}  # units served by main for a down or unconfigured role, by role
        # Writes main took for a configured role that was down (fallback: main), by (role, table): rows
        # an operator must reconcile (proxy/fallback_writes.py: counted, and logged per outage).
        self.fallback = FallbackWrites()
        self.fallback_writes = self.fallback.totals
        self.count_fallback_writes = self.fallback.count
        self.down_refusals: dict[str, int] = {}  # statements refused (57P03) because their role is down
        # Server-side statements, by (role, prepared | reused | evicted | prepared_again_after_ddl).
        self.statement_events: dict[tuple[str, str], int] = {}
        self.userlist = self._load_users()
        self.scram_keys = ScramKeys()  # the userlist's derived SCRAM keys: replaced with it on reload
        self.scram_derivations_before = 0  # PBKDF2 runs of earlier loads (the metric is a running total)
        self.login_failures = LoginFailureLog(config.log.login_failure_interval)
        self.draining = False
        self._all_clients_gone = asyncio.Event()
        # PAUSE / RESUME (proxy/pause.py): the console pauses roles, clients wait before a lease.
        self.pauses = Pauses()
        self.is_paused, self.wait_resumed = self.pauses.is_paused, self.pauses.wait_resumed
        self.pause, self.resume = self.pauses.pause, self.pauses.resume
        self.console = AdminConsole(self)
        self.clients: set[ClientConnection] = set()
        self.cancel_keys: dict[tuple[int, int], ClientConnection] = {}
        self.pinned_total = 0
        self._parameters: dict[str, str] | None = None
        self._server: asyncio.Server | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.admin: AdminServer | None = None
        self.health = HealthMonitor(config)
        self.health.on_usable_change(self._health_changed)
        self.health.on_change(self._health_transition)
        # Main coming back (proxy/main_recheck.py): a connect before a write is refused for main down.
        self.main_reachable = MainRecheck(
            self.health, self.pools["main"], lambda: self.config.health
        ).reachable
        # Read-your-writes (proxy/consistency.py): tokens per scope, replay positions of the replicas.
        self.consistency = Consistency(
            config.routing.read_your_writes,
            lambda: self.replica_pools,
            self.health.usable,
            lambda label: self.pools[label].stats.active,
            {label: self.upstreams[label] for label in self.replica_pools},
        )
        self.health.on_replay(self.consistency.observe)

    def _build_pools(self, config: Config) -> None:
        """One pool per upstream server of each configured role (a replica role may have several)."""
        self.pools: dict[str, Pool[ServerConnection]] = {}
        self.upstreams: dict[str, Dsn] = {}
        self.pool_roles: dict[str, str] = {}  # pool label (role, or replica name) -> role
        for role in ROLES:
            rc = config.roles.get(role)
            if rc is None or not rc.configured:
                continue
            for label, dsn, size in _upstreams(role, rc):
                self.upstreams[label] = dsn
                self.pool_roles[label] = role
                self.pools[label] = Pool(
                    label,
                    _connector(
                        role, dsn, label, min(CONNECT_TIMEOUT, rc.acquire_timeout), self._data_path_connected
                    ),
                    size=size,
                    acquire_timeout=rc.acquire_timeout,
                    idle_timeout=rc.idle_timeout,
                    max_lifetime=rc.max_lifetime,
                )

    def _load_users(self, config: Config | None = None) -> dict[str, str]:
        auth = (config or self.config).auth
        if auth.users_file:
            try:
                return load_userlist(str(auth.users_file))
            except OSError as exc:
                raise UserlistError(f"{auth.users_file}: {exc.strerror or exc}") from None
        main = self.upstreams["main"]
        # No users file: clients log in with main's own user and password (one DSN for everyone).
        return {main.user: main.password} if main.user and main.password else {}

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        await self.migration.start()  # the first statements see the stored migration states
        self._server = await loop.create_server(
            lambda: ClientConnection(self), listen.host, listen.port, reuse_address=True, backlog=1024
        )
        self._reaper = loop.create_task(self._reap())
        admin = self.config.admin
        self.admin = AdminServer(self)
        try:
            await self.admin.start(admin.host, admin.port)
        except OSError:
            self._server.close()
            raise
        await self.health.start()
        self.functions.load()
        log.info("event=listening address=%s:%d roles=%s", listen.host, self.port, ",".join(self.pools))

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def drain(self, deadline: float) -> bool:
        """Stop accepting; idle clients go now, the others after their transaction; True if all left."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        log.info("event=draining clients=%d deadline_seconds=%g", len(self.clients), deadline)
        for client in list(self.clients):
            client.drain()
        if self.clients:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_clients_gone.wait(), deadline)
        if self.clients:
            log.warning("event=drain_deadline clients_left=%d", len(self.clients))
        return not self.clients

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._reaper is not None:
            self._reaper.cancel()
        for client in list(self.clients):
            client.fatal(ProxyError("57P01", "terminating connection: the proxy is shutting down"))
        for pool in self.pools.values():
            pool.close()
        self.fallback.close()
        self.login_failures.flush()  # the last window's summary, before the process goes
        await self.health.stop()
        await self.consistency.stop()
        await self.classifier_worker.stop()
        await self.migration.stop()
        await self.functions.stop()
        await self.lookups.close()
        if self.admin is not None:
            await self.admin.stop()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            for pool in self.pools.values():
                pool.reap()

    def reload(self, env: Mapping[str, str]) -> bool:
        """SIGHUP: re-read the configuration and apply it live; a bad one keeps the old (one log line).

        Applied live: pool sizes and timeouts, the domain map and routing settings, health settings, the
        users file. Listen/admin addresses and upstream URLs need a restart (a warning says so).
        """
        try:
            new = load_config(self.config_path, env)
            userlist = self._load_users(new)
        except ConfigError as exc:
            return self._reload_failed("; ".join(exc.problems))
        except UserlistError as exc:
            return self._reload_failed(f"auth.users_file: {exc}")
        old = self.config
        restart = [f"roles.{role}.url" for role in ROLES if _urls(new, role) != _urls(old, role)] + [
            key
            for key, new_value, old_value in (
                ("listen", new.listen, old.listen),
                ("admin", (new.admin.host, new.admin.port), (old.admin.host, old.admin.port)),
            )
            if new_value != old_value
        ]
        if restart:
            log.warning("event=reload_needs_restart keys=%s", ",".join(restart))
        self.config = new
        self.userlist = userlist
        self.scram_derivations_before += self.scram_keys.derivations
        self.scram_keys = ScramKeys()
        self.login_failures.interval = new.log.login_failure_interval
        self.max_message_length = new.limits.max_message_length
        self.cache_unnamed = new.statements.cache_unnamed
        self.max_statements = new.statements.max_per_connection
        if self.audit is not None and new.audit.path == self.audit.path:
            self.audit.reopen()  # logrotate moved the file away
        else:
            if self.audit is not None:
                self.audit.close()
            self.audit = AuditLog(new.audit.path) if new.audit.path else None
        self.router = Router(new, self.usable, self.functions.names, self.migration.held, self.joins)
        self.migration.refresh()
        self.consistency.settings = new.routing.read_your_writes
        self.functions.load()  # functions created or altered since: read main's catalog again
        for label, pool in self.pools.items():
            rc = new.roles.get(self.pool_roles[label])
            size = rc.pool_size
            if isinstance(rc, ReadReplicaConfig):
                size = next((r.pool_size or rc.pool_size for r in rc.upstreams if r.name == label), size)
            pool.resize(size)
            pool.acquire_timeout = rc.acquire_timeout
            pool.idle_timeout = rc.idle_timeout
            pool.max_lifetime = rc.max_lifetime
        self.health.update_settings(new.health)
        self.reloads += 1
        log.info("event=reloaded pools=%s", ",".join(f"{k}:{p.size}" for k, p in self.pools.items()))
        return True

    def admin_allowed(self, user: str) -> bool:
        return user in self.config.auth.admin_users

    def _reload_failed(self, problem: str) -> bool:
        self.reload_failures += 1
        log.error("event=reload_failed keeping=previous_config problem=%r", problem)
        return False

    # -- what clients ask of the process -----------------------------------------------------------------
    def usable(self, role: str) -> bool:
        """The health interface the router asks: is ``role`` configured, up, and (replicas) not lagging?"""
        if role == "read_replica":
            return any(self.health.usable(label) for label in self.replica_pools)
        return role in self.pools and self.health.usable(role)

    def pool_for(self, role: str) -> str:
        """The pool serving ``role``: the role's own, or for reads the replica with fewest active."""
        if role != "read_replica":
            return role
        if len(self.replica_pools) == 1:
            return self.replica_pools[0]
        replicas = [label for label in self.replica_pools if self.health.usable(label)] or self.replica_pools
        if len(replicas) == 1:
            return replicas[0]
        return min(replicas, key=lambda label: self.pools[label].stats.active)

    def _functions_loaded(self, names: frozenset[str]) -> None:
        self.router.set_catalog_read_only(names)  # the router in use: a reload replaces it

    def _migration_changed(self, held: frozenset[str]) -> None:
        """The stored migration states changed: these configured roles' tables are served by main."""
        self.router.set_held(held)

    def _health_changed(self, label: str) -> None:
        self.router.invalidate()  # cached decisions assumed the old health

    def _health_transition(self, label: str, up: bool) -> None:
        if up and label == "main" and self.functions.failed:
            self.functions.load()
        if up:
            self.fallback.outage_over(label, "role is up again")

    def _data_path_connected(self, label: str) -> None:
        self.health.mark_connected(label)

    # -- refusals of a down role (57P03) -------------------------------------------------------------------
    def count_down_refusal(self, role: str) -> None:
        self.down_refusals[role] = self.down_refusals.get(role, 0) + 1

    def server_auth(self, user: str) -> ServerAuth:
        return ServerAuth(self.config.auth.method, user, self.userlist.get(user), self.scram_keys)

    # -- main's catalog: function volatility, startup parameters (proxy/lookups.py) ------------------------
    async def startup_parameters(self, startup: Mapping[str, str]) -> dict[str, str]:
        """The ParameterStatus set for a client: main's, with the client's startup settings spelled as
        PostgreSQL reports them (``utf8`` -> ``UTF8``). Raises InvalidStartupParameter with PostgreSQL's own
        error for a value main rejects. If main cannot be asked, a value is reported as the client sent it."""
        reported = dict(await self.server_parameters())
        lower = {name.lower(): name for name in reported}
        ask = self.usable("main")  # main down: no look-up (and no wait on a connect) at each login
        for name, given in startup.items():
            if name not in lower:
                continue
            value = given
            if ask:
                try:
                    value = await self.lookups.parameter_value(name, given)
                except LookupFailed as exc:
                    if not self._parameters_failed:
                        log.warning("event=parameter_lookup_failed parameter=%s error=%r", name, str(exc))
                    self._parameters_failed = True
                except ProxyError as exc:
                    raise InvalidStartupParameter(exc.sqlstate, exc.message, detail=exc.detail) from None
                else:
                    self._parameters_failed = False
            reported[lower[name]] = value
        return reported

    async def server_parameters(self) -> dict[str, str]:
        """The ParameterStatus set clients see at login: main's (learned from one real connection)."""
        if self._parameters is not None:
            return self._parameters
        errors = []
        for label, pool in self.pools.items():
            try:
                conn = await pool.acquire()
            except ProxyError as exc:
                errors.append(f"{label}: {exc.message}")
                continue
            params = dict(conn.parameters)
            pool.release(conn)
            self._parameters = params
            return params
        raise ProxyError(SQLCLIENT_UNABLE_TO_ESTABLISH, "no upstream reachable: " + "; ".join(errors))

    def register_cancel_key(self, client: ClientConnection) -> tuple[int, int]:
        while True:
            key = new_cancel_key()
            if key not in self.cancel_keys:
                self.cancel_keys[key] = client
                client.key = key
                return key

    def cancel(self, pid: int, secret: int) -> None:
        """A CancelRequest: cancel that client's statement on the upstream it is using right now."""
        client = self.cancel_keys.get((pid, secret))
        if client is None or client.server is None or not client.server.expect:
            return
        self.cancel_upstream(client.server)

    def cancel_upstream(self, server: ServerConnection) -> None:
        if not server.backend_pid:
            return
        server.cancel_sent()
        self._spawn(_send_cancel(server))

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def client_opened(self, client: ClientConnection) -> None:
        self.clients.add(client)

    def client_closed(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        if self.draining and not self.clients:
            self._all_clients_gone.set()
        if self.cancel_keys.get(client.key) is client:
            del self.cancel_keys[client.key]

    def client_pinned(self, client: ClientConnection) -> None:
        self.pinned_total += 1


def _upstreams(role: str, rc: RoleConfig) -> list[tuple[str, Dsn, int]]:
    """(label, dsn, pool size) of each upstream server of a role (a replica role may have several)."""
    if isinstance(rc, ReadReplicaConfig):
        return [(r.name, r.dsn, r.pool_size or rc.pool_size) for r in rc.upstreams]
    assert rc.dsn is not None
    return [(role, rc.dsn, rc.pool_size)]


def _connector(
    role: str, dsn: Dsn, label: str, timeout: float, connected: Callable[[str], None]
) -> Callable[[], asyncio.Future[ServerConnection]]:
    """The pool's way to open a connection; ``connected(label)`` after each success (health: up now)."""

    async def open_one() -> ServerConnection:
        conn = await ServerConnection.connect(role, dsn, label, timeout)
        connected(label)
        return conn

    def connect() -> asyncio.Future[ServerConnection]:
        return asyncio.ensure_future(open_one())

    return connect


async def _send_cancel(server: ServerConnection) -> None:
    """Send a CancelRequest for ``server``'s backend and wait for the postmaster to close the cancel
    connection, which it does once it has signalled the backend. From then on the cancel can only hit what
    that backend runs now, or nothing (a backend waiting for a command ignores it), so the connection may
    serve another client again (the pool parks it until then). Not confirmed in time: it is discarded."""
    dsn = server.dsn
    landed = False
    try:
        async with asyncio.timeout(CANCEL_TIMEOUT):
            if dsn.host.startswith("/"):
                reader, writer = await asyncio.open_unix_connection(f"{dsn.host}/.s.PGSQL.{dsn.port}")
            else:
                reader, writer = await asyncio.open_connection(dsn.host, dsn.port)
            try:
                writer.write(cancel_request(server.backend_pid, server.backend_secret))
                await writer.drain()
                while await reader.read(256):
                    pass  # the postmaster sends nothing back: wait for it to close
                landed = True
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        log.warning("event=cancel_failed upstream=%s:%d error=%s", dsn.host, dsn.port, exc or "timed out")
    finally:
        server.cancel_ended(landed)


async def serve(
    config: Config, ready: Callable[[ProxyApp], None] | None = None, config_path: Path | None = None
) -> int:
    """Run the proxy until SIGTERM or SIGINT (SIGHUP reloads); returns the exit code.

    The first SIGTERM/SIGINT drains: no new connections, transactions in flight finish (up to
    ``limits.drain_timeout``), then exit 0. A second one exits at once.
    """
    app = ProxyApp(config, config_path)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: app.reload(os.environ))
    if ready is not None:
        ready(app)
    # systemd (Type=notify): READY=1 only now, listening and stoppable; WATCHDOG=1 while the loop turns.
    sdnotify.notify(f"READY=1\nSTATUS=serving on {config.listen.host}:{app.port}")
    watchdog_task = loop.create_task(sdnotify.watchdog(stop))
    stopping_sent = False
    try:
        await stop.wait()
        sdnotify.notify("STOPPING=1\nSTATUS=draining")  # systemd: stop begins now; it disarms its watchdog
        stopping_sent = True
        watchdog_task.cancel()
        now = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, now.set)
        drain = loop.create_task(app.drain(app.config.limits.drain_timeout))
        forced = loop.create_task(now.wait())
        await asyncio.wait({drain, forced}, return_when=asyncio.FIRST_COMPLETED)
        if forced.done():
            log.warning("event=stop_now reason=second_signal")
        drain.cancel()
        forced.cancel()
    finally:
        if not stopping_sent:
            sdnotify.notify("STOPPING=1\nSTATUS=stopping")
        watchdog_task.cancel()
        log.info("event=stopping")
        await app.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0


def run(config: Config, config_path: Path | None = None) -> int:
    """Blocking entry point for ``parafort-proxy run``: uvloop, then serve()."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config, config_path=config_path))


def client_tls_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The server-side TLS context for clients, or None when TLS is disabled."""
    if tls.mode == "disable" or tls.cert_file is None or tls.key_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


def _urls(config: Config, role: str) -> tuple[str | None, ...]:
    rc = config.roles.get(role)
    if isinstance(rc, ReadReplicaConfig):
        return tuple(r.url for r in rc.upstreams)
    return (rc.url,)
