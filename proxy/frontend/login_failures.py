"""Failed logins: counted by reason, logged without flooding the log (first per key per window, then a sum).

Each failed login is counted by reason (the ``parafort_proxy_login_failures_total{reason}`` metric) and
considered for one ``event=login_failed`` line naming the user, the client's address and the reason. Within
one window (``log.login_failure_interval``, opened by the first failure after a quiet spell) only the first
failure per (user, client host, reason) is logged, and at most :data:`MAX_LOGGED_PER_WINDOW` of those; the
rest are summed, and when the window closes one ``event=login_failures_suppressed`` line per reason gives how
many were left out. A flood of any size therefore writes at most ``MAX_LOGGED_PER_WINDOW`` + one line per
reason per window. Nothing here sees a password or SCRAM message: only the user name the client sent.

:class:`LoginFailureLimiter` is the pure decision (no clock: the window is whatever lies between two
:meth:`~LoginFailureLimiter.flush` calls); :class:`LoginFailureLog` runs it on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Final

from proxy.protocol.auth import LOGIN_FAILURE_REASONS

log = logging.getLogger("parafort.auth")

# Reasons the client connection itself knows (the others come from ServerAuth.failure).
CLIENT_DISCONNECTED: Final = "client_disconnected"  # the client went away before authentication ended
LOGIN_TIMEOUT: Final = "login_timeout"  # limits.login_timeout passed first
ADMIN_NOT_ALLOWED: Final = "admin_not_allowed"  # authenticated, but not in auth.admin_users
UPSTREAM_UNAVAILABLE: Final = "upstream_unavailable"  # authenticated, but no upstream for the greeting
INVALID_PARAMETER: Final = "invalid_parameter"  # a startup setting PostgreSQL rejects (bad client_encoding)
ABORTED: Final = "aborted"  # the proxy closed the login for another reason (shutdown, internal error)
REASONS: Final = (
    *LOGIN_FAILURE_REASONS,
    CLIENT_DISCONNECTED,
    LOGIN_TIMEOUT,
    ADMIN_NOT_ALLOWED,
    UPSTREAM_UNAVAILABLE,
    INVALID_PARAMETER,
    ABORTED,
)
# Routine: libpq connects without a password, learns that one is needed, and reconnects with it.
_INFO_REASONS: Final = frozenset({CLIENT_DISCONNECTED})

MAX_LOGGED_PER_WINDOW: Final = 100
MAX_USER_LENGTH: Final = 63  # PostgreSQL's NAMEDATALEN - 1; the client chooses the name, so bound it
_PLAIN: Final = re.compile(r"[A-Za-z0-9_.@:+-]+")


class LoginFailureLimiter:
    """Counts failures by reason and decides which to log; see the module docstring."""

    def __init__(self, max_logged: int = MAX_LOGGED_PER_WINDOW) -> None:
        self.max_logged = max_logged
        self.counts: dict[str, int] = dict.fromkeys(REASONS, 0)  # since start: the metric
        self._logged: set[tuple[str, str, str]] = set()  # keys logged in this window
        self._suppressed: dict[str, int] = {}  # by reason, in this window

    def record(self, user: str, host: str, reason: str) -> bool:
        """Count one failure; True if it is to be logged (the first of its key in this window)."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        key = (user, host, reason)
        if key not in self._logged and len(self._logged) < self.max_logged:
            self._logged.add(key)
            return True
        self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
        return False

    def flush(self) -> list[tuple[str, int]]:
        """Close the window: (reason, failures not logged) for each reason that had some; start a new one."""
        out = sorted(self._suppressed.items())
        self._logged.clear()
        self._suppressed.clear()
        return out


class LoginFailureLog:
    """The limiter on the event loop: logs what it allows, and closes each window with a timer."""

    def __init__(self, interval: float, max_logged: int = MAX_LOGGED_PER_WINDOW) -> None:
        self.interval = interval  # seconds; changed by a reload, from the next window on
        self.limiter = LoginFailureLimiter(max_logged)
        self._timer: asyncio.TimerHandle | None = None

    @property
    def counts(self) -> dict[str, int]:
        return self.limiter.counts

    def failed(self, user: str, address: str, reason: str, client_id: int) -> None:
        """One failed login by ``user`` (as the client sent it) from ``address`` (``host:port``)."""
        host = address.rpartition(":")[0] or address
        user = user[:MAX_USER_LENGTH]
        if self.limiter.record(user, host, reason):
            level = logging.INFO if reason in _INFO_REASONS else logging.WARNING
            log.log(
                level,
                "event=login_failed client=%s user=%s address=%s reason=%s",
                client_id,
                quote(user),
                quote(address),
                reason,
            )
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        """Close the current window now: one summary line per reason with failures left out of the log."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for reason, n in self.limiter.flush():
            log.warning(
                "event=login_failures_suppressed reason=%s suppressed=%d window_seconds=%g",
                reason,
                n,
                self.interval,
            )


def quote(value: str) -> str:
    """``value`` as one key=value token: bare when plain, else a JSON string (escapes spaces, quotes,
    newlines and control characters, so a crafted user name cannot forge fields or lines)."""
    if _PLAIN.fullmatch(value):
        return value
    return json.dumps(value)
