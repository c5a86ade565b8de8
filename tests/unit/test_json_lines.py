"""The JSON log lines `run` writes when its output is not a terminal are loguru's ``serialize=True`` document, key
for key and value for value, only built faster (issue 25): operators' log pipelines and the tests' log readers
(hlf_actors.testing.process) parse them."""

from __future__ import annotations

import io
import json
import logging

from loguru import logger

from hlf_actors.logs import setup_logging


def test_each_line_is_the_document_loguru_serialize_would_write() -> None:
    ours = io.StringIO()
    setup_logging(stream=ours, json=True, secrets=["s3cr3t-value"])
    reference = io.StringIO()
    logger.add(reference, serialize=True, format="{message}", backtrace=False, diagnose=False)
    try:
        mentor = logger.bind(mentor_id="3d0c7a52-0000-4000-8000-0000000000f1")
        mentor.info("{} sent (attempt {}, {} ms)", "restore", 1, 2.5)
        logger.warning('quotes " and \\\\ , a tab\\t, a newline\\n, non-ASCII: Åse Ødegård 🙂, the secret s3cr3t-value')
        try:
            raise ValueError("boom <with> {braces}")
        except ValueError as err:
            logger.opt(exception=err).error("step failed: {}", err)
        logging.getLogger("psycopg.pool").warning("error connecting: %s", "refused")
    finally:
        setup_logging(stream=io.StringIO(), json=True)  # drops the reference handler too
    mine = [json.loads(line) for line in ours.getvalue().splitlines()]
    theirs = [json.loads(line) for line in reference.getvalue().splitlines()]
    assert len(mine) == 4
    assert mine == theirs
    assert "s3cr3t-value" not in ours.getvalue()
    assert mine[2]["record"]["exception"] == {"type": "ValueError", "value": "boom <with> {braces}", "traceback": True}
    assert "Traceback" in mine[2]["text"]
