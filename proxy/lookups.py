"""Short look-ups in main, off the data path: what PostgreSQL itself says, where guessing would be wrong.

- **Function volatility.** Which functions of main are STABLE or IMMUTABLE (PostgreSQL promises they do not
  modify the database), read from ``pg_proc`` in one query at start, on reload, and when main comes back
  after a failed load (``FunctionCatalog``, in the background). The router treats a call of such a function
  as a read, as Pgpool-II does; anything not found, or VOLATILE, stays a write. Until the first load
  completes every function outside the built-in list is a write, which is safe.
- **Migration state.** The rows of ``parafort_migration.migrations`` (proxy/migration/state.py), read at
  start, on reload and at every health interval, and the row a role enters when its tables hold rows in main
  (``run``: a short piece of work of another module on this connection).
- **Startup parameters.** The value PostgreSQL reports for a client's startup setting (``utf8`` is reported
  as ``UTF8``, ``eucjp`` as ``EUC_JP``, ``iso, dmy`` as ``ISO, DMY``), or PostgreSQL's own error for an
  invalid one. Asked once per (name, value) and cached.

One asyncpg connection to main, opened when first needed, one query at a time, each bounded by
``LOOKUP_TIMEOUT``. A failure drops the connection; callers decide what "unknown" means (a write; the value
as the client sent it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import asyncpg

from proxy.config.dsn import Dsn
from proxy.errors import ProxyError
from proxy.health import close, connect, describe_error

log = logging.getLogger("parafort.lookups")
server_log = logging.getLogger("parafort.server")  # FunctionCatalog: the lines the process has always logged
T = TypeVar("T")

LOOKUP_TIMEOUT = 5.0  # seconds for connecting to main, and for each query
PARAMETER_CACHE_SIZE = 4096
INVALID_PARAMETER_VALUE = "22023"

# Every function of main, by schema and name, and whether all its overloads are STABLE or IMMUTABLE
# (one VOLATILE overload makes the name a write: the proxy cannot tell overloads apart by argument types).
FUNCTIONS_QUERY = r"""
SELECT n.nspname, p.proname, bool_and(p.provolatile IN ('s', 'i'))
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname NOT LIKE 'pg\_temp\_%' AND n.nspname NOT LIKE 'pg\_toast%'
GROUP BY 1, 2
"""
# Where an unqualified call is looked up: PostgreSQL's own schema and public (the proxy does not follow a
# session's search_path; a function in another schema is a read only when the call names its schema).
UNQUALIFIED_SCHEMAS = ("pg_catalog", "public")

ENCODING_QUERY = "SELECT pg_catalog.pg_encoding_to_char(pg_catalog.pg_char_to_encoding($1))"
SETTING_QUERY = "SELECT pg_catalog.set_config($1, $2, true)"  # in a transaction rolled back at once


class LookupFailed(Exception):
    """Main could not answer (unreachable, timed out, or the connection broke); the message is loggable."""


class InvalidStartupParameter(ProxyError):
    """A client's startup setting that PostgreSQL rejects, with PostgreSQL's SQLSTATE and message."""


def read_only_names(rows: Iterable[tuple[str, str, bool]]) -> frozenset[str]:
    """The function names a statement may call and still be a read, spelled as the classifier spells
    calls: ``schema.name`` for a function whose overloads in that schema are all STABLE or IMMUTABLE, and
    the bare ``name`` when every overload in pg_catalog and public is (and there is at least one)."""
    by_key = {(schema, name): bool(read_only) for schema, name, read_only in rows}
    names = {f"{schema}.{name}" for (schema, name), read_only in by_key.items() if read_only}
    bare = {name for schema, name in by_key if schema in UNQUALIFIED_SCHEMAS}
    for name in bare:
        if all(by_key.get((schema, name), True) for schema in UNQUALIFIED_SCHEMAS):
            names.add(name)
    return frozenset(names)


class MainLookups:
    """The one connection to main for look-ups, and their caches."""

    def __init__(self, dsn: Dsn, *, timeout: float = LOOKUP_TIMEOUT) -> None:
        self.dsn = dsn
        self.timeout = timeout
        self._conn: Any = None  # asyncpg.Connection (untyped)
        self._lock = asyncio.Lock()
        # (name, value) -> PostgreSQL's spelling, or the ProxyError PostgreSQL raised for it.
        self._parameters: dict[tuple[str, str], str | ProxyError] = {}
        self._pending: dict[tuple[str, str], asyncio.Future[str | ProxyError]] = {}
        self.queries = 0  # round trips made (tests and debugging)

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
        await close(conn)

    async def _connection(self) -> Any:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self.dsn, self.timeout, "lookups")
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """``work(connection)`` on the look-up connection, alone on it and bounded by twice ``timeout``
        (connecting included); LookupFailed if main cannot answer. Keep it short: logins may wait on it."""
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout * 2):
                    conn = await self._connection()
                    self.queries += 1
                    return await work(conn)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._drop()
                raise LookupFailed(describe_error(exc, self.dsn, self.timeout)) from None

    # -- function volatility ----------------------------------------------------------------------------
    async def read_only_functions(self) -> frozenset[str]:
        """Main's STABLE and IMMUTABLE functions (see :func:`read_only_names`); LookupFailed if main cannot
        answer."""
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout * 2):
                    conn = await self._connection()
                    self.queries += 1
                    rows = await conn.fetch(FUNCTIONS_QUERY, timeout=self.timeout)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._drop()
                raise LookupFailed(describe_error(exc, self.dsn, self.timeout)) from None
        return read_only_names((row[0], row[1], row[2]) for row in rows)

    # -- startup parameters -----------------------------------------------------------------------------
    async def parameter_value(self, name: str, value: str) -> str:
        """How PostgreSQL reports parameter ``name`` set to ``value``; raises the ProxyError PostgreSQL
        gives for an invalid value (SQLSTATE and message as the server says them), or LookupFailed."""
        key = (name.lower(), value)
        found = self._parameters.get(key)
        if found is None:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = asyncio.get_running_loop().create_future()
                try:
                    answer = await self._ask(*key)
                except LookupFailed as exc:
                    pending.set_exception(exc)
                    pending.exception()  # retrieved: other waiters re-raise it, none is left unobserved
                    raise
                finally:
                    del self._pending[key]
                if len(self._parameters) >= PARAMETER_CACHE_SIZE:
                    self._parameters.clear()
                self._parameters[key] = found = answer
                pending.set_result(answer)
            else:
                found = await asyncio.shield(pending)
        if isinstance(found, ProxyError):
            raise ProxyError(found.sqlstate, found.message, detail=found.detail, hint=found.hint)
        return found

    async def _ask(self, name: str, value: str) -> str | ProxyError:
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout * 2):
                    conn = await self._connection()
                    self.queries += 1
                    if name == "client_encoding":
                        # Not set_config: the look-up connection's own encoding must stay UTF8.
                        canonical = await conn.fetchval(ENCODING_QUERY, value, timeout=self.timeout)
                        if not canonical:
                            return ProxyError(
                                INVALID_PARAMETER_VALUE, f'invalid value for parameter "{name}": "{value}"'
                            )
                        return str(canonical)
                    try:
                        async with conn.transaction():
                            return str(await conn.fetchval(SETTING_QUERY, name, value, timeout=self.timeout))
                    except asyncpg.PostgresError as exc:
                        if isinstance(exc, asyncpg.PostgresConnectionError):
                            raise
                        return ProxyError(
                            exc.sqlstate or INVALID_PARAMETER_VALUE,
                            getattr(exc, "message", None) or str(exc),
                            detail=getattr(exc, "detail", None),
                            hint=getattr(exc, "hint", None),
                        )
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._drop()
                raise LookupFailed(describe_error(exc, self.dsn, self.timeout)) from None


class FunctionCatalog:
    """Main's STABLE and IMMUTABLE functions as the router last learned them (``names``), loaded in the
    background at start, on reload and when main is back after a failed load (``failed``); ``on_loaded``
    hands each new answer to the router."""

    def __init__(self, lookups: MainLookups, on_loaded: Callable[[frozenset[str]], None]) -> None:
        self.lookups = lookups
        self.on_loaded = on_loaded
        self.names: frozenset[str] = frozenset()  # until the first load: none, so every such call is a write
        self.failed = False  # the last load failed: load again when main is up again
        self._task: asyncio.Task[None] | None = None
        self._again = False  # asked to load again while a load was under way

    def load(self) -> None:
        """(Re)read which of main's functions are STABLE or IMMUTABLE, in the background: until it is done
        the router keeps the previous answer."""
        if self._task is not None and not self._task.done():
            self._again = True  # the read under way may predate the change: read once more after it
            return
        self._task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            try:
                names = await self.lookups.read_only_functions()
            except LookupFailed as exc:
                if not self.failed:
                    server_log.warning(
                        "event=function_catalog_failed error=%r note=%r",
                        str(exc),
                        "functions outside the built-in list are writes until main's catalog can be read",
                    )
                self.failed = True
                continue
            self.failed = False
            self.names = names
            self.on_loaded(names)
            server_log.info("event=function_catalog_loaded read_only_functions=%d", len(names))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
