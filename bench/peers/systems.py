"""The systems under test: how each one's schema is made, how a change is written, how its worker is started.

    system         a change is                                                  the worker
    hlf_actors     UPDATE mentors (its triggers log the event and NOTIFY)        `hlf-actors run`, concurrency 10
    hlf_before     the same, run from another checkout (``--before DIR``)        that checkout's `hlf-actors run`
    procrastinate  UPDATE mentors + sync_mentor.defer_async(connection=conn)     Procrastinate worker, concurrency 10
    pgqueuer       UPDATE mentors + Queries.enqueue on the same transaction      QueueManager (asyncpg), limit 10
    poller         UPDATE mentors (a trigger inserts an outbox row)              10 async SKIP LOCKED pollers
    minimal_loop   UPDATE mentors (a trigger sends pg_notify(id))                one LISTEN loop, 10 tasks (a floor)

Every change is one committed transaction. The peers share one job (``workers.common``): read the mentor, PATCH,
upsert ``sync_outcome``; their database has the mentor table without hlf_actors' triggers, so a peer's writer
pays only for its own enqueue.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg  # type: ignore[import-untyped]
import psycopg

from .portal import PortalProcess
from .procs import Worker
from .workers.common import asyncpg_params

__all__ = ["SYSTEMS", "Change", "System", "before_tree", "by_name"]

Change = Callable[[UUID, str], Awaitable[None]]  # (mentor id, new status): one committed transaction

_PEER_TABLES = """
CREATE TABLE mentors (
    id               uuid PRIMARY KEY,
    full_name        text NOT NULL,
    status           text NOT NULL CHECK (status IN ('active', 'paused', 'expired_cert')),
    portal_record_id uuid NULL
);
CREATE TABLE sync_outcome (
    mentor_id   uuid PRIMARY KEY,
    listed      boolean NOT NULL,
    http_status int NOT NULL,
    synced_at   timestamptz NOT NULL DEFAULT now(),
    syncs       int NOT NULL DEFAULT 1
);
"""

_POLLER_SCHEMA = """
CREATE TABLE outbox (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, mentor_id uuid NOT NULL);
CREATE FUNCTION bench_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox (mentor_id) VALUES (NEW.id);
    RETURN NULL;
END;
$$;
CREATE TRIGGER mentors_outbox AFTER UPDATE OF status ON mentors
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION bench_outbox();
"""

_NOTIFY_SCHEMA = """
CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_sync', NEW.id::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER mentors_notify AFTER UPDATE OF status ON mentors
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION bench_notify();
"""

_UPDATE = "UPDATE mentors SET status = %s WHERE id = %s"


@dataclass(frozen=True)
class System:
    name: str
    kind: str  # "ours", "peer" or "floor"
    durable: bool  # does a change survive the worker being down? (backlog and crash figures need it)
    module: str | None  # bench.peers.workers.<module> for peers and floors; None for hlf_actors
    ready_line: str = "ready"

    # -- schema and seeding ---------------------------------------------------------------------------------

    def install(self, conn: psycopg.Connection[Any]) -> None:
        """Create this system's tables in an empty scratch database (autocommit connection)."""
        if self.kind == "ours":
            from hlf_actors import db

            db.migrate(conn)
            # The bench reads the service's tables unqualified, as the tests do (tests/conftest.py).
            conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET search_path = hlf, public')
            return
        conn.execute(_PEER_TABLES)
        if self.name == "poller":
            conn.execute(_POLLER_SCHEMA)
        elif self.name == "minimal_loop":
            conn.execute(_NOTIFY_SCHEMA)

    async def install_async(self, url: str) -> None:
        """The parts of the schema only an async client installs (the peers' own tables)."""
        if self.name == "procrastinate":
            from .workers.procrastinate_worker import make_app

            app, _ = make_app(url)
            async with app.open_async():
                await app.schema_manager.apply_schema_async()
        elif self.name == "pgqueuer":
            from pgqueuer import AsyncpgDriver
            from pgqueuer.queries import Queries

            conn = await asyncpg.connect(**asyncpg_params(url))
            try:
                await Queries(AsyncpgDriver(conn)).install()
            finally:
                await conn.close()

    def seed(self, conn: psycopg.Connection[Any], mentors: Sequence[tuple[UUID, UUID]]) -> None:
        """Mentors (id, portal record id), all active; for hlf_actors each with a valid certification.

        Seeded with triggers off, as a restored dump would be: the seeding is not a change to be synced.
        """
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            ids = [m for m, _ in mentors]
            records = [r for _, r in mentors]
            if self.kind == "ours":
                org = conn.execute("INSERT INTO organisations (name) VALUES ('Bench') RETURNING id").fetchone()
                assert org is not None
                conn.execute(
                    """INSERT INTO mentors (id, organisation_id, full_name, status, portal_record_id)
                       SELECT m, %s, 'Mentor ' || n, 'active', r
                       FROM unnest(%s::uuid[], %s::uuid[]) WITH ORDINALITY AS t(m, r, n)""",
                    (org[0], ids, records),
                )
                conn.execute(
                    "INSERT INTO certifications (mentor_id, expires_on) SELECT m, current_date + 365 "
                    "FROM unnest(%s::uuid[]) AS t(m)",
                    (ids,),
                )
            else:
                conn.execute(
                    """INSERT INTO mentors (id, full_name, status, portal_record_id)
                       SELECT m, 'Mentor ' || n, 'active', r
                       FROM unnest(%s::uuid[], %s::uuid[]) WITH ORDINALITY AS t(m, r, n)""",
                    (ids, records),
                )
        conn.execute("VACUUM ANALYZE mentors")

    # -- the writer -------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def writer(self, url: str) -> AsyncIterator[Change]:
        """One connection of the mentor app, committing one change per transaction."""
        if self.name == "pgqueuer":
            from pgqueuer import AsyncpgDriver
            from pgqueuer.queries import Queries

            from .workers.pgqueuer_worker import ENTRYPOINT

            pg = await asyncpg.connect(**asyncpg_params(url))
            queries = Queries(AsyncpgDriver(pg))

            async def enqueue(mentor_id: UUID, status: str) -> None:
                async with pg.transaction():
                    await pg.execute("UPDATE mentors SET status = $1 WHERE id = $2", status, mentor_id)
                    await queries.enqueue(ENTRYPOINT, mentor_id.bytes)

            try:
                yield enqueue
            finally:
                await pg.close()
            return
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            if self.name == "procrastinate":
                from .workers.procrastinate_worker import make_app

                app, task = make_app(url)
                async with app.open_async():

                    async def defer(mentor_id: UUID, status: str) -> None:
                        async with conn.transaction():
                            await conn.execute(_UPDATE, (status, mentor_id))
                            await task.configure(connection=conn).defer_async(mentor_id=str(mentor_id))

                    yield defer
                return

            async def update(mentor_id: UUID, status: str) -> None:
                await conn.execute(_UPDATE, (status, mentor_id))

            yield update

    # -- the worker -------------------------------------------------------------------------------------------

    def worker(self, url: str, portal: PortalProcess, log_path: Path) -> Worker:
        import os

        base = {k: v for k, v in os.environ.items() if not k.startswith(("HLF_", "PGQUEUER_", "PROCRASTINATE_"))}
        base["PYTHONUNBUFFERED"] = "1"
        if self.kind == "ours":
            env = {
                **base,
                **portal.env(),
                "HLF_DATABASE_URL": url,
                "HLF_PORTAL_CONCURRENCY": "10",
                # Measure the service, not Dataverse's 6000/5m service-protection limit (20/s sustained).
                "HLF_PORTAL_RATE_LIMIT": "1000000/1s",
                "HLF_HTTP_PORT": "0",
                "HLF_BACKOFF_JITTER": "off",
                "HLF_ALERTS": "off",  # no alert channel in a benchmark: on purpose
            }
            if self.name == "hlf_before":
                # The earlier checkout's package comes first on the path, ahead of this repository's editable one.
                env["PYTHONPATH"] = before_tree() + os.pathsep + base.get("PYTHONPATH", "")
            return Worker([sys.executable, "-m", "hlf_actors", "run"], env, log_path, "leader: listening")
        assert self.module is not None
        repo = str(Path(__file__).resolve().parents[2])
        env = {**base, "PYTHONPATH": repo + os.pathsep + base.get("PYTHONPATH", "")}
        argv = [sys.executable, "-m", f"bench.peers.workers.{self.module}", "--dsn", url, "--portal", portal.url]
        return Worker(argv, env, log_path, self.ready_line)

    # -- what is left to do -----------------------------------------------------------------------------------

    def outcomes(self, conn: psycopg.Connection[Any]) -> int:
        """Syncs whose outcome the system has written so far (hlf_actors: attempt_succeeded events)."""
        if self.kind == "ours":
            row = conn.execute("SELECT count(*) FROM event_log WHERE kind = 'attempt_succeeded'").fetchone()
        else:
            row = conn.execute("SELECT coalesce(sum(syncs), 0) FROM sync_outcome").fetchone()
        return int(row[0]) if row else 0

    def idle(self, conn: psycopg.Connection[Any]) -> bool:
        """True when the system's own tables hold no work still to do (nothing queued, claimed or pending)."""
        query = {
            "hlf_actors": "SELECT NOT EXISTS (SELECT 1 FROM hlf_inbox) AND NOT EXISTS "
            "(SELECT 1 FROM sync_status WHERE state IN ('pending', 'retrying'))",
            "procrastinate": "SELECT NOT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status IN ('todo', 'doing'))",
            "pgqueuer": "SELECT NOT EXISTS (SELECT 1 FROM pgqueuer WHERE status IN ('queued', 'picked'))",
            "poller": "SELECT NOT EXISTS (SELECT 1 FROM outbox)",
        }.get("hlf_actors" if self.kind == "ours" else self.name)
        if query is None:
            return True
        row = conn.execute(query).fetchone()
        return bool(row and row[0])


SYSTEMS: tuple[System, ...] = (
    System("hlf_actors", "ours", durable=True, module=None),
    System("hlf_before", "ours", durable=True, module=None),
    System("procrastinate", "peer", durable=True, module="procrastinate_worker"),
    System("pgqueuer", "peer", durable=True, module="pgqueuer_worker"),
    System("poller", "peer", durable=True, module="poller"),
    System("minimal_loop", "floor", durable=False, module="minimal_loop"),
)


def before_tree() -> str:
    """The checkout ``hlf_before`` runs (``--before DIR``): its root, which holds its ``hlf_actors`` package."""
    import os

    tree = os.environ.get("BENCH_BEFORE_TREE", "")
    if not tree or not (Path(tree) / "hlf_actors" / "__init__.py").is_file():
        raise RuntimeError("hlf_before needs --before DIR: a checkout whose DIR/hlf_actors is the package to run")
    return tree


def by_name(name: str) -> System:
    for system in SYSTEMS:
        if system.name == name:
            return system
    raise KeyError(name)
