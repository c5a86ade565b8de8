"""The schema a database has, as comparable text: the migration-vs-schema test's view of a database.

``pg_dump --schema-only`` of schema hlf and the app schema, cut into its entries (one per object), stripped of
what differs between two equal databases (owners, session settings, pg_dump's per-run ``\\restrict`` key) and
sorted, so that two databases with the same objects give the same text. ``service_objects`` keeps only what the
service owns: everything in hlf, the triggers on the app's tables and the functions the app may call.

    python -m hlf_actors.testing.schema_dump [URL] > db/schema.sql

(no URL: a scratch database on the tests' server, HLF_TEST_DATABASE_URL or 127.0.0.1:5432, migrated from scratch and
dropped afterwards) writes the declared
schema that ``tests/integration/test_attach.py`` compares the migrations with.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .. import db

__all__ = ["dump_schema", "service_objects"]

_ENTRY = re.compile(r"^--\n-- (?:Name|Data for Name): .*\n--\n", re.M)
_NOISE = re.compile(r"^(SET |SELECT pg_catalog\.set_config|\\restrict|\\unrestrict|--|ALTER DEFAULT PRIVILEGES)")


def dump_schema(url: str, *, app_schema: str = "public", service_only: bool = False) -> str:
    binary = shutil.which("pg_dump")
    if binary is None:
        raise RuntimeError("pg_dump is not installed (apt-get install postgresql-client)")
    done = subprocess.run(
        [binary, "--schema-only", "--no-owner", "-n", db.SERVICE_SCHEMA, "-n", app_schema, "--dbname", url],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pg_dump failed: {done.stderr.strip()}")
    entries = []
    for raw in _ENTRY.split(done.stdout):
        lines = [line for line in raw.splitlines() if line.strip() and not _NOISE.match(line)]
        if lines:
            entries.append("\n".join(lines))
    text = "\n\n".join(sorted(set(entries))) + "\n"
    return service_objects(text, app_schema) if service_only else text


def service_objects(schema_text: str, app_schema: str = "public") -> str:
    """The entries of a ``dump_schema`` text that belong to the service."""
    callable_ = tuple(f"CREATE FUNCTION {app_schema}.{name}(" for name in db.APP_CALLABLE)
    kept = [
        entry
        for entry in schema_text.strip().split("\n\n")
        if f"{db.SERVICE_SCHEMA}." in entry or entry.startswith(callable_)
    ]
    return "\n\n".join(kept) + "\n"


def _scratch(server: str) -> str:
    params: dict[str, Any] = conninfo_to_dict(server)
    name = f"hlf_schema_{uuid.uuid4().hex[:8]}"
    admin = make_conninfo("", **{**params, "dbname": params.get("dbname", "postgres")})
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo("", **{**params, "dbname": name})
    try:
        with psycopg.connect(url) as conn:
            db.migrate(conn)
        return dump_schema(url)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        conninfo_to_dict(sys.argv[1])  # a bad URL fails here, with libpq's own message
        sys.stdout.write(dump_schema(sys.argv[1]))
    else:
        # The tests' server: HLF_TEST_DATABASE_URL, else the local one (tests/conftest.py).
        sys.stdout.write(_scratch(os.environ.get("HLF_TEST_DATABASE_URL") or "host=127.0.0.1 port=5432 user=postgres"))
