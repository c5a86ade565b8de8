"""Library log lines (the standard library's logging, e.g. psycopg's pool) go through our sink, thinned out."""

from __future__ import annotations

import io
import logging

from hlf_actors.logs import setup_logging


def test_repeated_library_warnings_become_one_line_and_secrets_are_hidden() -> None:
    out = io.StringIO()
    setup_logging(stream=out, json=False, secrets=["s3cr3t-value"])
    pool_log = logging.getLogger("psycopg.pool")
    for _ in range(50):
        pool_log.warning("error connecting in %r: %s", "hlf-actors", "password s3cr3t-value refused")
    pool_log.warning("discarding closed connection: %s", "<conn>")
    logging.getLogger("some.library").info("chatter below the warning level")

    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "psycopg.pool: error connecting in 'hlf-actors'" in lines[0]
    assert "discarding closed connection" in lines[1]
    assert "s3cr3t-value" not in out.getvalue()
    assert "********" in lines[0]


def test_setting_up_twice_does_not_double_library_lines() -> None:
    out = io.StringIO()
    setup_logging(stream=out, json=False)
    setup_logging(stream=out, json=False)
    logging.getLogger("psycopg.pool").error("pool %s is closed", "x-unique")
    assert out.getvalue().count("pool x-unique is closed") == 1
