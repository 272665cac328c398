"""The configuration model: immutable, validated once, swapped whole on reload."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.config.dsn import Dsn, parse_dsn
from proxy.config.values import DOMAINS, PUBLIC, Duration, RoleName, TableEntry, TableRef

Port = Annotated[int, Field(ge=1, le=65535)]
PoolSize = Annotated[int, Field(ge=1, le=10_000)]
PositiveDuration = Annotated[Duration, Field(gt=0)]
# The admin console's database name by default: not the product's name, which an application may use.
ADMIN_DATABASE = "parafort_admin"


class Frozen(BaseModel):
    """Base for every config section: unknown keys refused, instances immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_url(url: str | None) -> str | None:
    if url is None or url.strip() == "":
        return None
    parse_dsn(url)  # raises DsnError (a ValueError) with a redacted message
    return url.strip()


class ListenConfig(Frozen):
    """Where applications connect."""

    host: str = "127.0.0.1"
    port: Port = 6432


class AdminConfig(Frozen):
    """The admin HTTP listener (health, metrics), loopback by default; and the psql admin console's
    database name, one that no application uses (an application's own database is never the console)."""

    host: str = "127.0.0.1"
    port: Port = 9930
    database: str = Field(default=ADMIN_DATABASE, min_length=1, max_length=63)


class AuthConfig(Frozen):
    """Client authentication towards the proxy."""

    method: Literal["scram-sha-256", "md5", "trust"] = "scram-sha-256"
    users_file: Path | None = None
    admin_users: tuple[str, ...] = ()


class RoleConfig(Frozen):
    """One role's upstream and pool. ``url`` None means the role is not configured.

    ``migration_url`` (main and the domain roles): a login to the same database that may set up logical
    replication (PostgreSQL 15: a superuser), used only by ``migrate ROLE start|rollback|finish`` for the
    publication, the subscription and their slots; never for clients' statements. None: those verbs say
    it is missing.
    """

    url: str | None = Field(default=None, repr=False)
    migration_url: str | None = Field(default=None, repr=False)
    pool_size: PoolSize
    acquire_timeout: PositiveDuration
    idle_timeout: Duration = 600.0
    max_lifetime: Duration = 3600.0
    fallback: RoleName | None = None

    @field_validator("url", "migration_url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        return _check_url(value)

    @property
    def configured(self) -> bool:
        return self.url is not None

    @cached_property
    def dsn(self) -> Dsn | None:
        return parse_dsn(self.url) if self.url is not None else None

    @cached_property
    def migration_dsn(self) -> Dsn | None:
        return parse_dsn(self.migration_url) if self.migration_url is not None else None


class ReplicaConfig(Frozen):
    """One read replica; ``pool_size`` None means the read_replica role's size."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    url: str = Field(repr=False)
    pool_size: PoolSize | None = None

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        url = _check_url(value)
        if url is None:
            raise ValueError("missing URL")
        return url

    @cached_property
    def dsn(self) -> Dsn:
        return parse_dsn(self.url)


class ReadReplicaConfig(RoleConfig):
    """The read_replica role: one ``url`` or a list of ``replicas`` sharing the role's settings."""

    replicas: tuple[ReplicaConfig, ...] = ()

    @model_validator(mode="after")
    def _one_form(self) -> ReadReplicaConfig:
        if self.url is not None and self.replicas:
            raise ValueError("give either url or replicas, not both")
        if self.migration_url is not None:
            raise ValueError("migration_url: a replica is never a migration's source or target")
        names = [r.name for r in self.replicas]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"replica name {dupes[0]!r} is used twice")
        return self

    @property
    def configured(self) -> bool:
        return self.url is not None or bool(self.replicas)

    @property
    def upstreams(self) -> tuple[ReplicaConfig, ...]:
        """Every replica, the single-``url`` form included (named ``read_replica``)."""
        if self.url is not None:
            return (ReplicaConfig(name="read_replica", url=self.url),)
        return self.replicas


class RolesConfig(Frozen):
    """The five roles; defaults are the seed's pool sizes and timeouts (filled in by the loader)."""

    main: RoleConfig
    analytics: RoleConfig
    documents: RoleConfig
    compliance: RoleConfig
    read_replica: ReadReplicaConfig

    def get(self, role: str) -> RoleConfig:
        value = getattr(self, role)
        assert isinstance(value, RoleConfig)
        return value

    @model_validator(mode="after")
    def _fallbacks(self) -> RolesConfig:
        if self.main.url is None:
            raise ValueError("main.url: missing; set DATABASE_URL or roles.main.url")
        if self.main.fallback is not None:
            raise ValueError("main.fallback: main cannot fall back to another role")
        # Only main holds every table (the seed's single database), so only main can stand in for a role.
        for role in ("analytics", "documents", "compliance", "read_replica"):
            fallback = self.get(role).fallback
            if fallback not in (None, "main"):
                raise ValueError(
                    f"{role}.fallback: must be main or null, not {fallback} (only main holds {role}'s tables)"
                )
        return self


class DomainsConfig(Frozen):
    """Which tables belong to the analytics, documents and compliance domains."""

    analytics: tuple[TableEntry, ...] = ()
    documents: tuple[TableEntry, ...] = ()
    compliance: tuple[TableEntry, ...] = ()

    @model_validator(mode="after")
    def _no_table_twice(self) -> DomainsConfig:
        owner: dict[TableRef, str] = {}
        for domain in DOMAINS:
            for ref in getattr(self, domain):
                other = owner.setdefault(ref.qualified, domain)  # user_activity is public.user_activity
                if other != domain:
                    raise ValueError(f"table {str(ref)!r} is in two domains: {other} and {domain}")
        return self

    @cached_property
    def _index(self) -> dict[TableRef, str]:
        return {ref.qualified: domain for domain in DOMAINS for ref in getattr(self, domain)}

    def domain_of(self, schema: str | None, table: str) -> str | None:
        """The domain a table reference belongs to, or None for main.

        A bare entry ``table`` means ``public.table``, exactly as if it were written so: it does not match a
        table of that name in another schema (list ``schema.table`` or ``schema.*`` for those). An unqualified
        reference in SQL is taken to be ``public.table`` (the proxy does not follow search_path). Precedence:
        ``schema.table``, then ``schema.*``.
        """
        index = self._index
        schema = schema or PUBLIC
        return index.get(TableRef(schema, table)) or index.get(TableRef(schema, "*"))

    @property
    def bare_entries(self) -> dict[str, str]:
        """Entries written without a schema (table name -> domain): the ones ``check`` compares with main's
        catalog, since a table of the same name in another schema does not belong to the domain."""
        refs = ((ref, domain) for domain in DOMAINS for ref in getattr(self, domain))
        return {ref.table: domain for ref, domain in refs if ref.schema is None}


def default_domains() -> DomainsConfig:
    """With no map: tables in schema analytics/documents/compliance belong to that domain."""
    return DomainsConfig(**{d: (TableRef(d, "*"),) for d in DOMAINS})


class TlsConfig(Frozen):
    """TLS towards clients. Upstream TLS comes from each URL's sslmode (and sslrootcert)."""

    # disable: answer SSLRequest 'N'; allow: TLS when the client asks; require: refuse plaintext clients.
    mode: Literal["disable", "allow", "require"] = "disable"
    cert_file: Path | None = None
    key_file: Path | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TlsConfig:
        if self.mode != "disable" and (self.cert_file is None or self.key_file is None):
            raise ValueError(f"tls.mode {self.mode} needs tls.cert_file and tls.key_file")
        return self


class LimitsConfig(Frozen):
    """Protection against misbehaving or hostile clients."""

    # More clients than this get FATAL 53300 "too many clients" (the file-descriptor limit must allow it).
    max_client_connections: Annotated[int, Field(ge=1)] = 10_000
    # A frontend message longer than this closes that client with 08P01 (PostgreSQL's own limit is 1 GB).
    max_message_length: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    # Startup and authentication must finish within this, or the client is dropped.
    login_timeout: PositiveDuration = 30.0
    # SIGTERM: stop accepting, let transactions in flight finish for up to this long, then exit.
    drain_timeout: PositiveDuration = 30.0


class AuditConfig(Frozen):
    """Compliance audit log: statements routed to the compliance role, as JSON lines, literals removed."""

    path: Path | None = None  # unset: no audit log


class LogConfig(Frozen):
    """Logs go to stderr (journald under systemd), one line per event."""

    format: Literal["keyvalue", "json"] = "keyvalue"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # Failed logins: the first per (user, client host, reason) in this window is logged, the rest summed into
    # one `login_failures_suppressed` line per reason when the window ends.
    login_failure_interval: PositiveDuration = 60.0


class HealthConfig(Frozen):
    """Health probing of every configured upstream."""

    interval: PositiveDuration = 2.0
    timeout: PositiveDuration = 1.0
    failures_before_down: Annotated[int, Field(ge=1)] = 3
    successes_before_up: Annotated[int, Field(ge=1)] = 2
    max_replica_lag: PositiveDuration = 10.0
    max_replica_lag_bytes: Annotated[int, Field(ge=0)] | None = None


class StatementsConfig(Frozen):
    """Protocol-level prepared statements that the proxy keeps on upstream connections."""

    # Keep clients' unnamed extended-protocol statements (libpq PQexecParams, psycopg, JDBC, pgbench -M
    # extended) prepared upstream under a content-addressed name, so PostgreSQL parses and plans each once
    # per connection instead of on every execution. After DDL that changes a kept query's result columns
    # the proxy prepares it again and re-runs it unseen; inside a transaction PostgreSQL's 0A000 "cached
    # plan must not change result type" has already aborted it and reaches the client (as it does for
    # drivers' own named statements). PostgreSQL may also choose a generic plan after five executions.
    cache_unnamed: bool = False
    # Named statements kept per upstream connection (each holds parse trees and plans in its backend's
    # memory); beyond it the least recently used are closed. PgBouncer's max_prepared_statements is 200 too.
    max_per_connection: Annotated[int, Field(ge=1)] = 200


class ReadYourWritesConfig(Frozen):
    """Read-your-writes: a read never runs on a replica that has not replayed a write committed before it.

    ``scope``: whose writes a read must see: every connection of the same proxy user (``user``), its own
    connection's (``connection``), everyone's (``global``), or none (``off``: no capture, no wait).
    ``max_wait``: how long a read waits for a replica to catch up before main serves it (0: never wait).
    """

    scope: Literal["user", "connection", "global", "off"] = "user"
    max_wait: Annotated[Duration, Field(ge=0)] = 0.010

    @field_validator("scope", mode="before")
    @classmethod
    def _unquoted_off(cls, value: object) -> object:
        """``scope: off`` unquoted, as the example config shows it: YAML 1.1 reads it as false."""
        return "off" if value is False else value


class RoutingConfig(Frozen):
    """Statement classification knobs, and read-your-writes."""

    read_only_functions: tuple[str, ...] = ()
    read_your_writes: ReadYourWritesConfig = ReadYourWritesConfig()


class MigrationConfig(Frozen):
    """Moving a domain role's tables from main to its own database (``parafort-proxy migrate``).

    ``cutover_timeout``: how long a cutover (or a rollback from one) may hold the transactions that touch
    the moving tables while the subscription catches up; past it the hold ends and nothing has changed.
    ``shadow_sample``: the share of reads of a migrating role's tables that also run on its own database,
    off the client's path, to compare their results (0: none).
    """

    cutover_timeout: PositiveDuration = 10.0
    shadow_sample: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01


class Config(Frozen):
    """The whole resolved configuration."""

    listen: ListenConfig = ListenConfig()
    admin: AdminConfig = AdminConfig()
    auth: AuthConfig = AuthConfig()
    roles: RolesConfig
    domains: DomainsConfig = Field(default_factory=default_domains)
    routing: RoutingConfig = RoutingConfig()
    statements: StatementsConfig = StatementsConfig()
    health: HealthConfig = HealthConfig()
    log: LogConfig = LogConfig()
    limits: LimitsConfig = LimitsConfig()
    tls: TlsConfig = TlsConfig()
    audit: AuditConfig = AuditConfig()
    migration: MigrationConfig = MigrationConfig()

    @model_validator(mode="after")
    def _listeners_differ(self) -> Config:
        if (self.listen.host, self.listen.port) == (self.admin.host, self.admin.port):
            raise ValueError("admin.port: the admin listener cannot share the client listener's address")
        return self
