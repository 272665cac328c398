"""Logging set-up: one line per event on stderr (journald), as key=value or JSON.

Messages are written ``event=name key=value ...``; the JSON format turns those pairs into fields. Log lines
carry identifiers, roles, counts and SQLSTATEs, never passwords and never literals from statements.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from typing import Any


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"time={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} logger={record.name} "
        line += record.getMessage()
        if record.exc_info:
            line += " exception=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        try:
            pairs = [token.partition("=") for token in shlex.split(message)]
        except ValueError:
            pairs = []
        if pairs and all(eq for _, eq, _ in pairs):
            out.update({key: value for key, _, value in pairs})
        else:
            out["message"] = message
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info", fmt: str = "keyvalue") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
