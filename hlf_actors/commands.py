"""The bodies of the `hlf-actors` commands; ``cli.py`` parses the arguments, dispatches here and turns errors into
one line and an exit status. Each takes the loaded configuration and the parsed arguments and returns the exit
status; what they print is rendered by ``render.py``. Modules a command alone needs are imported inside it, so
`hlf-actors status` does not load the service.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Mapping
from typing import Any

import anyio
import psycopg

from . import db, render, status
from .config import Config
from .errors import CommandFailed

__all__ = [
    "cmd_check_alerts",
    "cmd_check_credentials",
    "cmd_check_expiry",
    "cmd_dead_letters",
    "cmd_demo",
    "cmd_force_sync",
    "cmd_migrate",
    "cmd_reconcile",
    "cmd_replay",
    "cmd_run",
    "cmd_status",
]


def _connect(config: Config) -> psycopg.Connection[Any]:
    url = config.require_database()
    try:
        return db.connect(url, app_schema=config.app_schema)
    except psycopg.OperationalError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CommandFailed(f"cannot reach the database: {first}", 3) from None


def cmd_migrate(config: Config, _args: argparse.Namespace) -> int:
    with _connect(config) as conn:
        applied = db.migrate(conn, app_schema=config.app_schema)
    if applied:
        for m in applied:
            print(f"applied {m.version:03d}_{m.name}")
    else:
        print("database is up to date")
    return 0


def cmd_run(config: Config, _args: argparse.Namespace) -> int:
    # httpx's package imports its command-line client's libraries (click, pygments, rich) wherever they are
    # installed, for nothing here. A None in sys.modules makes that one import fail, and httpx falls back to its
    # own stub `httpx.main` (its `except ImportError`).
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    from loguru import logger

    from .dynamics import DynamicsClient
    from .fcm import build_alert_sender
    from .logs import setup_logging
    from .service import Service

    config.require_database()
    config.require_portal()
    config.require_alerts()
    secret = config.dynamics_client_secret.reveal() if config.dynamics_client_secret else ""
    webhook = config.ops_webhook_url.reveal() if config.ops_webhook_url else ""
    setup_logging(secrets=[secret, webhook])
    if config.alerts_off:
        logger.warning("HLF_ALERTS=off: alerts are switched off on purpose; failures reach no one")

    async def main() -> None:
        import signal

        portal = DynamicsClient(config)
        sender = build_alert_sender(config.fcm_credentials, config.fcm_url)
        service = Service(config, portal=portal, alert_sender=sender)
        try:
            async with anyio.create_task_group() as tg:

                async def on_signal() -> None:
                    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for _ in signals:
                            service.request_stop()
                            return

                tg.start_soon(on_signal)
                await service.run()
                tg.cancel_scope.cancel()
        finally:
            await portal.aclose()
            await sender.aclose()

    # Everything loaded so far (modules, the settings, the clients) lives as long as the process: frozen, the cyclic
    # collector no longer walks it on every full collection. Full collections were the latency tail under load
    # (bench/NOTES.md: GC pauses). Start-up's garbage (argparse's, the settings') is all in the young generations:
    # a full pass over every module's objects finds nothing more and only delays the first PATCH.
    gc.collect(1)
    gc.freeze()
    anyio.run(main, backend_options=_event_loop_options())
    return 0


def _event_loop_options() -> dict[str, Any]:
    """uvloop where it is installed: the same asyncio API with its loop, sockets and callbacks in C (bench/)."""
    import importlib.util

    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    with _connect(config) as conn:
        if args.mentor is not None:
            story = status.mentor_story(conn, args.mentor)
            if story is None:
                raise CommandFailed(f"no mentor {args.mentor} and no events about them", 1)
            print(render.render_story_json(story) if args.json else render.render_story(story))
        else:
            summary = status.summary(
                conn,
                probe_on=config.public_listing_url is not None,
                deadline_s=config.public_listing_deadline_s,
                alerts_off=config.alerts_off,
            )
            print(render.render_summary_json(summary) if args.json else render.render_summary(summary))
    return 0


_FORCE_SYNC = "SELECT hlf_force_sync(%s)"


def cmd_force_sync(config: Config, args: argparse.Namespace) -> int:
    with _connect(config) as conn:
        try:
            seq = conn.execute(_FORCE_SYNC, (args.mentor,)).fetchone()
        except psycopg.errors.NoDataFound:
            raise CommandFailed(f"no mentor with id {args.mentor}", 2) from None
        assert seq is not None
        print(f"force sync of {args.mentor} requested (event {seq[0]}); waiting up to {args.wait:.0f}s")
        outcome = status.wait_for_outcome(conn, args.mentor, seq[0], timeout=args.wait)
    if outcome is None:
        raise CommandFailed(
            f"no outcome within {args.wait:.0f}s: is `hlf-actors run` running? the request stays queued", 1
        )
    print(outcome.describe())
    return 0 if outcome.ok else 1


_REQUEUE = "SELECT hlf_requeue_dead_letter(%s)"


def cmd_dead_letters(config: Config, args: argparse.Namespace) -> int:
    with _connect(config) as conn:
        if args.action == "list":
            letters = status.dead_letters(conn, include_requeued=args.all)
            print(render.render_dead_letters(letters))
            return 0
        if args.all_open:
            ids = [dl.id for dl in status.dead_letters(conn, include_requeued=False)]
        elif args.id is not None:
            ids = [args.id]
        else:
            raise CommandFailed("say which dead letter to re-queue: an ID, or --all", 2)
        for dl_id in ids:
            try:
                conn.execute(_REQUEUE, (dl_id,))
            except psycopg.errors.NoDataFound:
                raise CommandFailed(f"no dead letter with id {dl_id}", 2) from None
            except psycopg.errors.UniqueViolation:
                raise CommandFailed(f"dead letter {dl_id} was already re-queued", 1) from None
            print(f"re-queued dead letter {dl_id}")
        if not ids:
            print("no open dead letters")
    return 0


def cmd_check_expiry(config: Config, args: argparse.Namespace) -> int:

    from .alerts import Alerting
    from .clock import SystemClock
    from .expiry import NightReport, default_owner, run_night
    from .fcm import build_alert_sender
    from .logs import setup_logging
    from .ops_channels import open_ops_channels
    from .push import AlertSender, Delivery

    with _connect(config) as conn:
        db.require_migrated(db.applied_migrations(conn))
    today = args.date or SystemClock().today(config.zone)
    setup_logging(level="WARNING")  # one line per push would drown the report; problems still show

    class LazySender:
        """Builds the configured sender at the first push: "already running" or "done" needs no FCM warning."""

        def __init__(self) -> None:
            self.real: AlertSender | None = None

        async def send(self, data: Mapping[str, str], **targets: Any) -> list[Delivery]:
            self.real = self.real or build_alert_sender(config.fcm_credentials, config.fcm_url)
            return await self.real.send(data, **targets)

        async def aclose(self) -> None:
            if self.real is not None:
                await self.real.aclose()

    async def main() -> NightReport:
        sender = LazySender()
        try:
            async with (
                db.pool(
                    config.require_database(), name="hlf-check-expiry", max_size=10, app_schema=config.app_schema
                ) as pool,
                open_ops_channels(config, sender) as channels,
            ):
                alerting = Alerting(pool, sender, ops_topic=config.ops_topic, ops_channels=channels)
                owner = default_owner("check-expiry")
                return await run_night(pool, alerting, today=today, job_lock_owner=owner, rerun=args.again)
        finally:
            await sender.aclose()

    report = anyio.run(main)
    if report.outcome == "already_running":
        raise CommandFailed(report.describe(), 1)
    print(report.describe())
    return 0


def cmd_reconcile(config: Config, args: argparse.Namespace) -> int:
    """`hlf-actors reconcile`: one reconciliation, its findings, then (``--wait`` > 0) how the requests ended."""
    from .alerts import Alerting
    from .clock import SystemClock
    from .dynamics import DynamicsClient
    from .fcm import build_alert_sender
    from .ops_channels import open_ops_channels
    from .reconcile import ReconcileReport, alert_aborted, reconcile, wait_for_requests

    wait, page_size, limit = args.wait, args.page_size, 50
    url = config.require_database()
    config.require_portal()

    async def main() -> ReconcileReport:
        portal = DynamicsClient(config)
        try:
            conn = await db.connect_async(url, app_schema=config.app_schema)
            async with conn:
                report = await reconcile(
                    conn,
                    portal,
                    today=SystemClock().today(config.zone),
                    page_size=page_size,
                    max_missing=config.reconcile_max_missing,
                )
            if report.first_abort:
                sender = build_alert_sender(config.fcm_credentials, config.fcm_url)
                try:
                    async with (
                        db.pool(
                            url, name="hlf-reconcile", max_size=1, open_timeout=15, app_schema=config.app_schema
                        ) as pool,
                        open_ops_channels(config, sender) as channels,
                    ):
                        alerting = Alerting(pool, sender, ops_topic=config.ops_topic, ops_channels=channels)
                        await alert_aborted(alerting, report)
                finally:
                    await sender.aclose()
            return report
        finally:
            await portal.aclose()

    report = anyio.run(main)
    if report.aborted is not None:
        print(f"reconciliation ABORTED, nothing requested: {report.aborted}")
        return 1
    print(render.render_reconcile(report, limit=limit))
    if not report.requested and report.syncing:
        print(
            f"nothing requested: {report.syncing} mentor(s) differ while their own sync is under way; "
            "`hlf-actors status` shows them and `hlf-actors run` sends them"
        )
        return 0
    if not report.requested:
        print("nothing to fix")
        return 0
    if wait <= 0:
        print(f"{len(report.requested)} sync request(s) queued; `hlf-actors run` sends them")
        return 0
    print(f"waiting up to {wait:.0f}s for the service to fix {len(report.requested)} mentor(s)…")
    with db.connect(url, app_schema=config.app_schema) as conn:
        outcome = wait_for_requests(conn, report.requested, timeout=wait)
    print(f"fixed {len(outcome.fixed)} of {len(report.requested)}")
    for mentor_id in outcome.failed[:limit]:
        print(f"  dead-lettered: {mentor_id}  (see `hlf-actors status {mentor_id}`)")
    for mentor_id in outcome.open[:limit]:
        print(f"  still open:    {mentor_id}")
    if outcome.unprojected:
        print(
            f"{outcome.unprojected} request(s) were never picked up: is `hlf-actors run` running? "
            "They stay queued and are sent when it runs."
        )
    return 0 if not outcome.failed and not outcome.open else 1


def cmd_check_credentials(config: Config, _args: argparse.Namespace) -> int:
    """`hlf-actors check-credentials`: check, record (when a database is configured), print one line."""
    from .alerts import Alerting
    from .credentials import CredentialReport, check_credentials, probe
    from .dynamics import DynamicsClient
    from .fcm import build_alert_sender
    from .ops_channels import open_ops_channels

    config.require_portal()

    async def main() -> CredentialReport:
        portal = DynamicsClient(config)
        try:
            if not config.database_url:
                ok, error, cause, duration_ms = await probe(portal)
                return CredentialReport(ok=ok, error=error, cause=cause, duration_ms=duration_ms, recorded=False)
            sender = build_alert_sender(config.fcm_credentials, config.fcm_url)
            try:
                async with (
                    db.pool(
                        config.database_url,
                        name="hlf-check-credentials",
                        max_size=2,
                        open_timeout=15,
                        app_schema=config.app_schema,
                    ) as pool,
                    open_ops_channels(config, sender) as channels,
                ):
                    alerting = Alerting(pool, sender, ops_topic=config.ops_topic, ops_channels=channels)
                    return await check_credentials(portal, pool, alerting, trigger="check-credentials")
            finally:
                await sender.aclose()
        finally:
            await portal.aclose()

    report = anyio.run(main)
    print(report.describe())
    return 0 if report.ok else 1


def cmd_check_alerts(config: Config, _args: argparse.Namespace) -> int:
    """Send a test alert to every configured channel and say what became of each (exit 1 if any failed)."""
    import socket
    from datetime import UTC, datetime

    from .fcm import build_alert_sender
    from .logs import setup_logging
    from .ops_channels import ChannelResult, build_ops_channels

    webhook = config.ops_webhook_url.reveal() if config.ops_webhook_url else ""
    setup_logging(level="WARNING", secrets=[webhook])

    async def main() -> list[ChannelResult]:
        sender = build_alert_sender(config.fcm_credentials, config.fcm_url)
        channels = build_ops_channels(config, sender)
        try:
            if not channels:
                raise CommandFailed(
                    "no alert channel configured: set HLF_FCM_CREDENTIALS, HLF_OPS_WEBHOOK_URL or HLF_OPS_EMAIL_TO", 2
                )
            data = {
                "type": "hlf_alert_test",
                "host": socket.gethostname(),
                "sent_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            results: list[ChannelResult] = []
            for channel in channels:  # one after the other: the report reads in the configured order
                results.append(await channel.send(data))
            return results
        finally:
            for channel in channels:
                await channel.aclose()
            await sender.aclose()

    results = anyio.run(main)
    for r in results:
        outcome = "ok" + (f" ({r.message_id})" if r.message_id else "") if r.ok else f"FAILED: {r.error}"
        print(f"{r.channel:<8} {r.target}: {outcome}")
    failed = sum(1 for r in results if not r.ok)
    print(f"{len(results) - failed} of {len(results)} channel(s) delivered the test alert")
    return 1 if failed else 0


def cmd_replay(config: Config, args: argparse.Namespace) -> int:
    from datetime import timedelta

    from . import archival, replay
    from .progress import Progress

    with _connect(config) as conn:
        db.require_migrated(db.applied_migrations(conn))
    url = config.require_database()
    if args.archive_before is not None:
        archived = archival.archive(
            url,
            older_than=timedelta(days=args.archive_before),
            progress=Progress(label="archive"),
            app_schema=config.app_schema,
        )
        print(render.render_archive(archived))
    progress = Progress(label="verify" if args.verify else "replay")
    report = replay.replay(url, verify=args.verify, progress=progress, app_schema=config.app_schema)
    print(render.render_replay(report))
    return 1 if args.verify and report.differences else 0


def cmd_demo(config: Config, args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(keep=args.keep, workdir=args.dir)
