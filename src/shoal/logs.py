"""The node's log: configured once by `shoal serve`, as text for people or JSON lines.

With `log_format = "json"` every record is one JSON object on one line: `time` (UTC,
ISO 8601), `level`, `logger`, `message`, an `exception` when there is one, and the
fields a record carries as a dict in `extra` (a request's line has `request`: route,
model, serving node, status, timings; a routing decision `routed`), so a log shipper
needs no parsing of the message.
"""

from __future__ import annotations

import datetime
import logging
import sys
from typing import Any, Literal

import orjson

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_STRUCTURED = ("request", "routed")  # `extra` keys that are copied into a JSON line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _STRUCTURED:
            value = record.__dict__.get(key)
            if isinstance(value, dict):
                document[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = record.stack_info
        return orjson.dumps(document, default=str).decode()


def configure(level: str, log_format: LogFormat = "text") -> None:
    """The root logger's one handler, on stderr, in `log_format`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler])
