"""The `hlf-actors` command line (also `python -m hlf_actors`).

Every command exits 0 on success and non-zero with one clear line on failure:
1 when the command ran but the answer is "no" (e.g. a force sync that did not succeed), 2 for bad input or
configuration, 3 when the database cannot be reached.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any
from uuid import UUID

import anyio
import psycopg

from . import __version__, db, status
from .config import Config, load_config
from .errors import ConfigError, DatabaseUnusableError, HLFError, MigrationError

__all__ = ["main"]


class _Fail(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _connect(config: Config) -> psycopg.Connection[Any]:
    url = config.require_database()
    try:
        return db.connect(url, app_schema=config.app_schema)
    except psycopg.OperationalError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _Fail(f"cannot reach the database: {first}", 3) from None


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a mentor id (a UUID): {text!r}") from None


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


# -- commands -------------------------------------------------------------------------------------------------


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
    # installed, for nothing here: up to 40 ms of start-up before the first PATCH. A None in sys.modules makes
    # that one import fail, and httpx falls back to its own stub `httpx.main` (its `except ImportError`).
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    from loguru import logger

    from .alerts import build_alert_sender
    from .dynamics import DynamicsClient
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
    # (pauses of up to 124 ms, measured with a gc.callbacks timer; 36 ms with this, shorter actor idling and httpx's
    # response cycles broken in dynamics.py). Start-up's garbage (argparse's, the settings') is all in the young
    # generations: a full pass over every module's objects found nothing more and only delayed the first PATCH.
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
                raise _Fail(f"no mentor {args.mentor} and no events about them", 1)
            print(status.render_story_json(story) if args.json else status.render_story(story))
        else:
            summary = status.summary(
                conn,
                probe_on=config.public_listing_url is not None,
                deadline_s=config.public_listing_deadline_s,
                alerts_off=config.alerts_off,
            )
            print(status.render_summary_json(summary) if args.json else status.render_summary(summary))
    return 0


def cmd_force_sync(config: Config, args: argparse.Namespace) -> int:
    with _connect(config) as conn:
        try:
            seq = conn.execute("SELECT hlf_force_sync(%s)", (args.mentor,)).fetchone()
        except psycopg.errors.NoDataFound:
            raise _Fail(f"no mentor with id {args.mentor}", 2) from None
        assert seq is not None
        print(f"force sync of {args.mentor} requested (event {seq[0]}); waiting up to {args.wait:.0f}s")
        outcome = status.wait_for_outcome(conn, args.mentor, seq[0], timeout=args.wait)
    if outcome is None:
        raise _Fail(f"no outcome within {args.wait:.0f}s: is `hlf-actors run` running? the request stays queued", 1)
    print(outcome.describe())
    return 0 if outcome.ok else 1


def cmd_dead_letters(config: Config, args: argparse.Namespace) -> int:
    with _connect(config) as conn:
        if args.action == "list":
            letters = status.dead_letters(conn, include_requeued=args.all)
            print(status.render_dead_letters(letters))
            return 0
        if args.all_open:
            ids = [dl.id for dl in status.dead_letters(conn, include_requeued=False)]
        elif args.id is not None:
            ids = [args.id]
        else:
            raise _Fail("say which dead letter to re-queue: an ID, or --all", 2)
        for dl_id in ids:
            try:
                conn.execute("SELECT hlf_requeue_dead_letter(%s)", (dl_id,))
            except psycopg.errors.NoDataFound:
                raise _Fail(f"no dead letter with id {dl_id}", 2) from None
            except psycopg.errors.UniqueViolation:
                raise _Fail(f"dead letter {dl_id} was already re-queued", 1) from None
            print(f"re-queued dead letter {dl_id}")
        if not ids:
            print("no open dead letters")
    return 0


def cmd_check_expiry(config: Config, args: argparse.Namespace) -> int:

    from .alerting import Alerting
    from .alerts import AlertSender, Delivery, build_alert_sender
    from .clock import SystemClock
    from .expiry import NightReport, default_owner, run_night
    from .logs import setup_logging
    from .ops_channels import open_ops_channels

    with _connect(config) as conn:
        have = db.applied_migrations(conn)
    missing = [f"{m.version:03d}_{m.name}" for m in db.migrations() if m.version not in have]
    if missing:
        raise MigrationError(f"the database lacks migrations {', '.join(missing)}: run `hlf-actors migrate` first")
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
        raise _Fail(report.describe(), 1)
    print(report.describe())
    return 0


def cmd_reconcile(config: Config, args: argparse.Namespace) -> int:
    from .reconcile import run_cli

    return run_cli(config, wait=args.wait, page_size=args.page_size)


def cmd_check_credentials(config: Config, _args: argparse.Namespace) -> int:
    from .credentials import run_cli

    return run_cli(config)


def cmd_check_alerts(config: Config, _args: argparse.Namespace) -> int:
    """Send a test alert to every configured channel and say what became of each (exit 1 if any failed)."""
    import socket
    from datetime import UTC, datetime

    from .alerts import build_alert_sender
    from .logs import setup_logging
    from .ops_channels import ChannelResult, build_ops_channels

    webhook = config.ops_webhook_url.reveal() if config.ops_webhook_url else ""
    setup_logging(level="WARNING", secrets=[webhook])

    async def main() -> list[ChannelResult]:
        sender = build_alert_sender(config.fcm_credentials, config.fcm_url)
        channels = build_ops_channels(config, sender)
        try:
            if not channels:
                raise _Fail(
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

    from . import replay

    with _connect(config) as conn:
        have = db.applied_migrations(conn)
    missing = [f"{m.version:03d}_{m.name}" for m in db.migrations() if m.version not in have]
    if missing:
        raise MigrationError(f"the database lacks migrations {', '.join(missing)}: run `hlf-actors migrate` first")
    url = config.require_database()
    if args.archive_before is not None:
        archived = replay.archive(
            url,
            older_than=timedelta(days=args.archive_before),
            progress=replay.Progress(label="archive"),
            app_schema=config.app_schema,
        )
        print(replay.render_archive(archived))
    progress = replay.Progress(label="verify" if args.verify else "replay")
    report = replay.replay(url, verify=args.verify, progress=progress, app_schema=config.app_schema)
    print(replay.render_report(report))
    return 1 if args.verify and report.differences else 0


def _days(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of days, at least 1: {text!r}")
    return int(text)


def cmd_demo(config: Config, args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(keep=args.keep, workdir=args.dir)


# -- parser ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hlf-actors",
        description="Keep HLF's public mentor listing in the Dynamics portal true to the mentor database.",
    )
    p.add_argument("--version", action="version", version=f"hlf-actors {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("migrate", help="create or update the database schema (safe to re-run)")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("run", help="the service: listen for changes and keep the portal in sync (Procfile worker)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("demo", help="an end-to-end demo on an embedded PostgreSQL, fake portal and fake FCM")
    s.add_argument("--keep", action="store_true", help="leave everything running afterwards, to explore")
    s.add_argument("--dir", default=None, help="where the embedded database lives (default: a temp dir)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("status", help="sync state of all mentors, or one mentor's story from the log")
    s.add_argument("mentor", nargs="?", type=_uuid, help="a mentor id: print that mentor's story")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("force-sync", help="re-send a mentor to the portal now, and wait for the outcome")
    s.add_argument("mentor", type=_uuid)
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the outcome (default 60)")
    s.set_defaults(func=cmd_force_sync)

    s = sub.add_parser("dead-letters", help="list or re-queue operations that could not be delivered")
    dl = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    dl_list = dl.add_parser("list", help="open dead letters (with --all, re-queued and resolved ones too)")
    dl_list.add_argument("--all", action="store_true")
    dl_re = dl.add_parser("requeue", help="run a dead-lettered operation again from attempt 1")
    dl_re.add_argument("id", nargs="?", type=int)
    dl_re.add_argument("--all", dest="all_open", action="store_true", help="every open dead letter")
    s.set_defaults(func=cmd_dead_letters)

    s = sub.add_parser("check-expiry", help="run the nightly certification-expiry check now: reminders, expiries")
    s.add_argument("--date", type=_date, default=None, help="the night to check, YYYY-MM-DD (default: today)")
    s.add_argument("--again", action="store_true", help="check a night again that was already checked")
    s.set_defaults(func=cmd_check_expiry)

    s = sub.add_parser("reconcile", help="compare the portal's listing with the database and queue fixes")
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the fixes (default 60; 0: don't)")
    s.add_argument("--page-size", type=int, default=5000, help="listing rows per request (default 5000, the most)")
    s.set_defaults(func=cmd_reconcile)

    s = sub.add_parser("check-credentials", help="request a token and read WhoAmI; alert ops when they fail")
    s.set_defaults(func=cmd_check_credentials)

    s = sub.add_parser(
        "check-alerts", help="send a test alert to every configured alert channel and report each (exit 1 on a failure)"
    )
    s.set_defaults(func=cmd_check_alerts)

    s = sub.add_parser(
        "replay",
        help="rebuild sync_status, dead_letters and duplicate findings from event_log",
        description=(
            "Rebuild sync_status, dead_letters and the duplicate findings from event_log alone, while the service "
            "runs, and correct the live rows that differ from them. With --archive-before, old events are archived "
            "first: copied to event_log_archive, each mentor's projected state at the cut (the newest archived "
            "event) kept in projection_snapshots, then deleted from event_log. Replay starts every mentor from its "
            "snapshot and folds only the events after the cut, so its result does not change."
        ),
    )
    mode = s.add_mutually_exclusive_group()
    mode.add_argument(
        "--verify", action="store_true", help="only print how the live tables differ from the log (exit 1 if they do)"
    )
    mode.add_argument(
        "--archive-before",
        type=_days,
        metavar="DAYS",
        help="first archive the events older than DAYS days to event_log_archive, keeping a snapshot of every "
        "mentor's projections at the cut (projection_snapshots) so that replay stays exact",
    )
    s.set_defaults(func=cmd_replay)
    return p


def _single(err: BaseException) -> BaseException:
    """The one real error inside (nested) task-group exception groups, so it gets its one clear line."""
    while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
        err = err.exceptions[0]
    return err


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BaseExceptionGroup as group:
        inner = _single(group)
        if inner is group:
            raise
        return _dispatch(args, failed=inner)


def _dispatch(args: argparse.Namespace, failed: BaseException | None = None) -> int:
    started = time.monotonic()
    try:
        if failed is not None:
            raise failed
        config = load_config()
        code: int = args.func(config, args)
        return code
    except _Fail as err:
        print(f"hlf-actors {args.command}: {err}", file=sys.stderr)
        return err.code
    except ConfigError as err:
        print(f"hlf-actors {args.command}: configuration: {err}", file=sys.stderr)
        return 2
    except MigrationError as err:
        print(f"hlf-actors {args.command}: {err}", file=sys.stderr)
        return 2
    except DatabaseUnusableError as err:
        print(f"hlf-actors {args.command}: {err}", file=sys.stderr)
        return 3
    except HLFError as err:
        print(f"hlf-actors {args.command}: {err}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"hlf-actors {args.command}: database error: {first}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"hlf-actors {args.command}: interrupted after {time.monotonic() - started:.0f}s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
