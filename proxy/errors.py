"""Errors the proxy reports to clients as PostgreSQL ErrorResponses, with their SQLSTATEs."""

from __future__ import annotations

# SQLSTATEs the proxy itself raises (https://www.postgresql.org/docs/15/errcodes-appendix.html).
FEATURE_NOT_SUPPORTED = "0A000"
CONNECTION_EXCEPTION = "08000"
CONNECTION_FAILURE = "08006"
SQLCLIENT_UNABLE_TO_ESTABLISH = "08001"
PROTOCOL_VIOLATION = "08P01"
INVALID_PARAMETER_VALUE = "22023"
READ_ONLY_SQL_TRANSACTION = "25006"
IN_FAILED_TRANSACTION = "25P02"
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"
INVALID_CATALOG_NAME = "3D000"
TOO_MANY_CONNECTIONS = "53300"
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
QUERY_CANCELED = "57014"
INTERNAL_ERROR = "XX000"


class ProxyError(Exception):
    """An error meant for the client: it becomes one ErrorResponse (or FATAL, then a closed connection)."""

    def __init__(
        self,
        sqlstate: str,
        message: str,
        *,
        detail: str | None = None,
        hint: str | None = None,
        severity: str = "ERROR",
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail
        self.hint = hint
        self.severity = severity

    @property
    def fatal(self) -> bool:
        return self.severity == "FATAL"

    def __repr__(self) -> str:
        return f"ProxyError({self.sqlstate!r}, {self.message!r}, severity={self.severity!r})"
