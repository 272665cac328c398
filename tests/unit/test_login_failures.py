"""The failed-login rate limiter: first per (user, host, reason) per window logged, the rest summed."""

from __future__ import annotations

import asyncio
import json
import logging
import shlex

import pytest

from proxy.frontend.login_failures import (
    CLIENT_DISCONNECTED,
    REASONS,
    LoginFailureLimiter,
    LoginFailureLog,
    quote,
)
from proxy.protocol.auth import UNKNOWN_USER, WRONG_PASSWORD


def test_first_per_key_then_suppressed_until_the_window_closes() -> None:
    limiter = LoginFailureLimiter()
    assert limiter.record("app", "10.0.0.1", WRONG_PASSWORD)
    assert not any(limiter.record("app", "10.0.0.1", WRONG_PASSWORD) for _ in range(999))
    # Another user, host or reason is another key.
    assert limiter.record("app2", "10.0.0.1", WRONG_PASSWORD)
    assert limiter.record("app", "10.0.0.2", WRONG_PASSWORD)
    assert limiter.record("app", "10.0.0.1", UNKNOWN_USER)
    assert not limiter.record("app", "10.0.0.1", UNKNOWN_USER)
    assert limiter.counts[WRONG_PASSWORD] == 1002 and limiter.counts[UNKNOWN_USER] == 2
    assert limiter.flush() == [(UNKNOWN_USER, 1), (WRONG_PASSWORD, 999)]
    # A new window: logged again; nothing suppressed yet; the counts go on.
    assert limiter.flush() == []
    assert limiter.record("app", "10.0.0.1", WRONG_PASSWORD)
    assert limiter.counts[WRONG_PASSWORD] == 1003


def test_every_reason_counted_from_zero() -> None:
    assert LoginFailureLimiter().counts == dict.fromkeys(REASONS, 0)
    assert len(set(REASONS)) == len(REASONS)


def test_distinct_keys_capped_per_window() -> None:
    """A spray of user names from many hosts logs at most ``max_logged`` lines per window."""
    limiter = LoginFailureLimiter(max_logged=10)
    logged = sum(limiter.record(f"user{i}", f"10.0.{i % 7}.1", UNKNOWN_USER) for i in range(5000))
    assert logged == 10
    assert limiter.flush() == [(UNKNOWN_USER, 4990)]
    assert limiter.counts[UNKNOWN_USER] == 5000


@pytest.mark.parametrize(
    "user", ["app", "two words", 'quo"te', "new\nline event=forged", "tab\tx", "ünïcode", "a'b", "=", ""]
)
def test_quote_keeps_one_token(user: str) -> None:
    line = f"event=login_failed user={quote(user)} reason=x"
    assert "\n" not in line
    tokens = shlex.split(line)
    assert len(tokens) == 3 and tokens[2] == "reason=x"
    value = tokens[1].removeprefix("user=")
    assert value == user or json.loads(quote(user)) == user


def test_log_lines_bounded_and_summary(caplog: pytest.LogCaptureFixture) -> None:
    async def flood() -> LoginFailureLog:
        failures = LoginFailureLog(interval=0.05, max_logged=5)
        for i in range(3000):
            failures.failed("app", f"127.0.0.1:{40000 + i % 50}", WRONG_PASSWORD, i)
        failures.failed("ghost", "127.0.0.1:41000", UNKNOWN_USER, 3000)
        failures.failed("app", "127.0.0.1:41001", CLIENT_DISCONNECTED, 3001)
        await asyncio.sleep(0.2)  # the window's timer fires and writes the summary
        failures.failed("app", "127.0.0.1:42000", WRONG_PASSWORD, 3002)  # a new window
        failures.flush()  # as ProxyApp.stop does
        return failures

    with caplog.at_level(logging.INFO, logger="parafort.auth"):
        failures = asyncio.run(flood())
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "event=login_failed client=0 user=app address=127.0.0.1:40000 reason=wrong_password",
        "event=login_failed client=3000 user=ghost address=127.0.0.1:41000 reason=unknown_user",
        "event=login_failed client=3001 user=app address=127.0.0.1:41001 reason=client_disconnected",
        "event=login_failures_suppressed reason=wrong_password suppressed=2999 window_seconds=0.05",
        "event=login_failed client=3002 user=app address=127.0.0.1:42000 reason=wrong_password",
    ]
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.WARNING, logging.INFO, logging.WARNING, logging.WARNING]
    assert failures.counts[WRONG_PASSWORD] == 3001
