"""Logging set-up: human-readable lines on a terminal, JSON lines otherwise (loguru ``serialize``).

Every line can carry ``mentor_id`` (``logger.bind``). Nothing here formats a secret: config values are wrapped in
``Secret`` and error messages are built without headers or tokens; the filter below is the last line of defence for
the one value we know is secret.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, TextIO

import msgspec
from loguru import logger

if TYPE_CHECKING:  # loguru's Record type exists only in its stubs
    from loguru import Message, Record

__all__ = ["hide_secret", "setup_logging"]

# Every value the log filter blanks: the configured secret, and any secret read later (a rotated client secret).
_HIDDEN: list[str] = []


def hide_secret(value: str) -> None:
    """Blank ``value`` in every log line from now on."""
    if value and len(value) >= 4 and value not in _HIDDEN:
        _HIDDEN.append(value)


# Libraries that log through the standard library (psycopg's pool: "error connecting", "discarding closed
# connection"): one line per message template per this many seconds, so a database outage stays readable.
_LIBRARY_REPEAT_S = 10.0


class _ToLoguru(logging.Handler):
    """Send standard-library log records into loguru (same format, same secret filter), repeats thinned out."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self._last: dict[tuple[str, str], float] = {}
        self._dropped: dict[tuple[str, str], int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self._last.get(key, -_LIBRARY_REPEAT_S) < _LIBRARY_REPEAT_S:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        message = record.getMessage()
        if dropped:
            message += f" ({dropped} more like it in the last {_LIBRARY_REPEAT_S:.0f}s)"
        level = record.levelname if record.levelname in {"WARNING", "ERROR", "CRITICAL"} else "WARNING"
        logger.log(level, "{}: {}", record.name, message)


# What json.dumps(default=str) makes of anything JSON has no type for (an exception instance, in practice).
_JSON = msgspec.json.Encoder(enc_hook=str)


class _JsonLines:
    """loguru's ``serialize=True`` lines, the same document with the same keys, built by msgspec: loguru's own
    serializer (json.dumps of a nested dict) was a third of the cost of the one log line each sync writes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._flush = getattr(stream, "flush", None)

    def write(self, message: Message) -> None:
        record = message.record
        exception: dict[str, object] | None = None
        if record["exception"] is not None:
            kind, value, traceback = record["exception"]
            exception = {"type": None if kind is None else kind.__name__, "value": value, "traceback": bool(traceback)}
        document = {
            "text": str(message),
            "record": {
                "elapsed": {"repr": str(record["elapsed"]), "seconds": record["elapsed"].total_seconds()},
                "exception": exception,
                "extra": record["extra"],
                "file": {"name": record["file"].name, "path": record["file"].path},
                "function": record["function"],
                "level": {"icon": record["level"].icon, "name": record["level"].name, "no": record["level"].no},
                "line": record["line"],
                "message": record["message"],
                "module": record["module"],
                "name": record["name"],
                "process": {"id": record["process"].id, "name": record["process"].name},
                "thread": {"id": record["thread"].id, "name": record["thread"].name},
                "time": {"repr": str(record["time"]), "timestamp": record["time"].timestamp()},
            },
        }
        self._stream.write(_JSON.encode(document).decode() + "\n")
        if self._flush is not None:
            self._flush()


def setup_logging(
    *, level: str = "INFO", stream: TextIO | None = None, json: bool | None = None, secrets: Iterable[str] = ()
) -> None:
    out = stream or sys.stderr
    as_json = (not out.isatty()) if json is None else json
    for secret in secrets:
        hide_secret(secret)

    def scrub(record: Record) -> bool:
        for secret in _HIDDEN:
            if secret in record["message"]:
                record["message"] = record["message"].replace(secret, "********")
        return True

    logger.remove()
    fmt = (
        "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {extra[mentor_id]: <36} <level>{message}</level>"
    )
    logger.configure(extra={"mentor_id": ""})
    logger.add(
        _JsonLines(out).write if as_json else out,
        level=level,
        format=fmt if not as_json else "{message}",
        filter=scrub,
        colorize=not as_json and out.isatty(),
        backtrace=False,
        diagnose=False,
    )
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _ToLoguru)]
    root.addHandler(_ToLoguru())
