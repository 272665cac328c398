"""TLS towards upstreams, per a URL's ``sslmode`` as libpq reads it: for the data path's connections
(proxy/backend/connection.py) and for the proxy's own asyncpg connections (health probes, look-ups, replay
polling, migrations), so that every connection to a server reaches it the same way."""

from __future__ import annotations

import ssl
from typing import Literal

from proxy.config.dsn import Dsn

TLS_MODES = frozenset({"prefer", "require", "verify-ca", "verify-full"})


def sslmode(dsn: Dsn) -> str:
    """The URL's sslmode, libpq's default (prefer) when unset."""
    return (dsn.param("sslmode") or "prefer").lower()


def upstream_tls_context(dsn: Dsn, mode: str) -> ssl.SSLContext:
    """The client-side TLS context for an upstream, per libpq's sslmode semantics."""
    if mode in ("verify-ca", "verify-full"):
        context = ssl.create_default_context(cafile=dsn.param("sslrootcert"))
        context.check_hostname = mode == "verify-full"
    else:  # prefer / require: encrypted, not verified
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    cert, key = dsn.param("sslcert"), dsn.param("sslkey")
    if cert:
        context.load_cert_chain(cert, key)
    return context


def asyncpg_ssl(dsn: Dsn) -> ssl.SSLContext | Literal["prefer", "allow"] | bool:
    """asyncpg's ``ssl`` argument for ``dsn``: our context where TLS is required (verified as the URL
    says), asyncpg's own ``prefer``/``allow`` (TLS when the server offers it), False for ``disable`` and
    Unix sockets."""
    mode = sslmode(dsn)
    if dsn.host.startswith("/") or mode == "disable":
        return False
    if mode in ("prefer", "allow"):
        return mode  # type: ignore[return-value]
    return upstream_tls_context(dsn, mode)
