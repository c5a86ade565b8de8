"""Logging set-up: human-readable lines on a terminal, JSON lines otherwise (loguru ``serialize``).

Every line can carry ``mentor_id`` (``logger.bind``). Nothing here formats a secret: config values are wrapped in
``Secret`` and error messages are built without headers or tokens; the filter below is the last line of defence for
the one value we know is secret.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, TextIO

from loguru import logger

if TYPE_CHECKING:  # loguru's Record type exists only in its stubs
    from loguru import Record

__all__ = ["setup_logging"]


def setup_logging(
    *, level: str = "INFO", stream: TextIO | None = None, json: bool | None = None, secrets: Iterable[str] = ()
) -> None:
    out = stream or sys.stderr
    as_json = (not out.isatty()) if json is None else json
    hidden = [s for s in secrets if s and len(s) >= 4]

    def scrub(record: Record) -> bool:
        for secret in hidden:
            if secret in record["message"]:
                record["message"] = record["message"].replace(secret, "********")
        return True

    logger.remove()
    fmt = (
        "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {extra[mentor_id]: <36} <level>{message}</level>"
    )
    logger.configure(extra={"mentor_id": ""})
    logger.add(
        out,
        level=level,
        serialize=as_json,
        format=fmt if not as_json else "{message}",
        filter=scrub,
        colorize=not as_json and out.isatty(),
        backtrace=False,
        diagnose=False,
    )
