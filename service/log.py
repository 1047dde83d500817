"""JSON log lines, one object per line, with the current request's id (STYLE.md §5, house rule 12).

``configure_logging`` is called by ``eat serve`` only; importing the service or building apps in
tests leaves the logging set-up alone.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar

# A ContextVar is per task/thread context, not shared mutable state: each request sets its own value,
# and contextvars.copy_context() carries it into the decode threads.
REQUEST_ID: ContextVar[str] = ContextVar("eat_request_id", default="-")

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Fields: ts, level, logger, msg, request_id, plus every ``extra={...}`` key of the call."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": REQUEST_ID.get(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str) -> None:
    """Route the root logger (and uvicorn's) through one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our middleware logs each request once
