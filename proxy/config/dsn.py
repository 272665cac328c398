"""PostgreSQL connection URLs: parse into parts, validate, and redact the password for display."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

SCHEMES = ("postgresql", "postgres")
# Query parameters whose values are secrets and must never be shown.
SECRET_PARAMS = frozenset({"password", "sslpassword"})
REDACTED = "***"


@dataclass(frozen=True)
class Dsn:
    """A parsed upstream URL. ``host`` is a hostname, an IP address, or a unix-socket directory."""

    host: str
    port: int
    user: str | None
    password: str | None = field(repr=False)
    database: str | None
    params: tuple[tuple[str, str], ...] = ()

    def param(self, name: str) -> str | None:
        """Return the last value of query parameter ``name``, or None."""
        value = None
        for key, val in self.params:
            if key == name:
                value = val
        return value


class DsnError(ValueError):
    """A URL that cannot be used; the message never contains the password."""


def parse_dsn(url: str) -> Dsn:
    """Parse ``postgresql://user:password@host:port/database?params``.

    Raises DsnError with a message that is safe to show (no password).
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:
        raise DsnError(f"bad URL {redact_url(url)!r}: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise DsnError(f"bad URL {redact_url(url)!r}: scheme must be postgresql:// or postgres://")
    if "," in parts.netloc:
        raise DsnError(f"bad URL {redact_url(url)!r}: multi-host URLs are not supported; give one host")
    try:
        port = parts.port or 5432
    except ValueError:
        raise DsnError(f"bad URL {redact_url(url)!r}: port must be a number from 1 to 65535") from None
    params = tuple(parse_qsl(parts.query, keep_blank_values=True))
    query = dict(params)
    host = unquote(parts.hostname or "") or query.get("host", "")
    if not host:
        raise DsnError(f"bad URL {redact_url(url)!r}: no host")
    if "port" in query:
        if not query["port"].isdigit() or not 0 < int(query["port"]) < 65536:
            raise DsnError(f"bad URL {redact_url(url)!r}: port must be a number from 1 to 65535")
        port = int(query["port"])
    user = unquote(parts.username) if parts.username else query.get("user")
    password = unquote(parts.password) if parts.password is not None else query.get("password")
    database = unquote(parts.path.lstrip("/")) or query.get("dbname") or None
    return Dsn(host=host, port=port, user=user, password=password, database=database, params=params)


def redact_url(url: str) -> str:
    """Return ``url`` with any password (userinfo or query parameter) replaced by ``***``.

    Works on malformed URLs too, so it is safe to use inside error messages.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return REDACTED if ":" in url or "@" in url else url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{hostport}"
    path, qmark, query = tail.partition("?")
    if qmark:
        try:
            pairs = parse_qsl(query, keep_blank_values=True)
        except ValueError:
            query = REDACTED
        else:
            query = urlencode([(k, REDACTED if k in SECRET_PARAMS else v) for k, v in pairs], safe="*")
    return f"{scheme}://{netloc}{slash}{path}{qmark}{query}"
