"""The `hlf-actors` command line (also `python -m hlf_actors`).

Every command exits 0 on success and non-zero with one clear line on failure:
1 when the command ran but the answer is "no" (e.g. a force sync that did not succeed), 2 for bad input or
configuration, 3 when the database cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import date
from uuid import UUID

import psycopg

from . import __version__, commands
from .config import load_config
from .errors import CommandFailed, ConfigError, DatabaseUnusableError, HLFError, MigrationError

__all__ = ["main"]


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


def _days(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of days, at least 1: {text!r}")
    return int(text)


# -- parser ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hlf-actors",
        description="Keep HLF's public mentor listing in the Dynamics portal true to the mentor database.",
    )
    p.add_argument("--version", action="version", version=f"hlf-actors {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("migrate", help="create or update the database schema (safe to re-run)")
    s.set_defaults(func=commands.cmd_migrate)

    s = sub.add_parser("run", help="the service: listen for changes and keep the portal in sync (Procfile worker)")
    s.set_defaults(func=commands.cmd_run)

    s = sub.add_parser("demo", help="an end-to-end demo on an embedded PostgreSQL, fake portal and fake FCM")
    s.add_argument("--keep", action="store_true", help="leave everything running afterwards, to explore")
    s.add_argument("--dir", default=None, help="where the embedded database lives (default: a temp dir)")
    s.set_defaults(func=commands.cmd_demo)

    s = sub.add_parser("status", help="sync state of all mentors, or one mentor's story from the log")
    s.add_argument("mentor", nargs="?", type=_uuid, help="a mentor id: print that mentor's story")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=commands.cmd_status)

    s = sub.add_parser("force-sync", help="re-send a mentor to the portal now, and wait for the outcome")
    s.add_argument("mentor", type=_uuid)
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the outcome (default 60)")
    s.set_defaults(func=commands.cmd_force_sync)

    s = sub.add_parser("dead-letters", help="list or re-queue operations that could not be delivered")
    dl = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    dl_list = dl.add_parser("list", help="open dead letters (with --all, re-queued and resolved ones too)")
    dl_list.add_argument("--all", action="store_true")
    dl_re = dl.add_parser("requeue", help="run a dead-lettered operation again from attempt 1")
    dl_re.add_argument("id", nargs="?", type=int)
    dl_re.add_argument("--all", dest="all_open", action="store_true", help="every open dead letter")
    s.set_defaults(func=commands.cmd_dead_letters)

    s = sub.add_parser("check-expiry", help="run the nightly certification-expiry check now: reminders, expiries")
    s.add_argument("--date", type=_date, default=None, help="the night to check, YYYY-MM-DD (default: today)")
    s.add_argument("--again", action="store_true", help="check a night again that was already checked")
    s.set_defaults(func=commands.cmd_check_expiry)

    s = sub.add_parser("reconcile", help="compare the portal's listing with the database and queue fixes")
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the fixes (default 60; 0: don't)")
    s.add_argument("--page-size", type=int, default=5000, help="listing rows per request (default 5000, the most)")
    s.set_defaults(func=commands.cmd_reconcile)

    s = sub.add_parser("check-credentials", help="request a token and read WhoAmI; alert ops when they fail")
    s.set_defaults(func=commands.cmd_check_credentials)

    s = sub.add_parser(
        "check-alerts", help="send a test alert to every configured alert channel and report each (exit 1 on a failure)"
    )
    s.set_defaults(func=commands.cmd_check_alerts)

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
    s.set_defaults(func=commands.cmd_replay)

    # Dispatched by main before parsing (break_glass.py parses its own options); listed here for --help.
    sub.add_parser(
        "break-glass",
        help="re-sync mentors straight to the portal with new credentials while the service is down "
        "(`hlf-actors break-glass --help`)",
        add_help=False,
    )
    return p


def _single(err: BaseException) -> BaseException:
    """The one real error inside (nested) task-group exception groups, so it gets its one clear line."""
    while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
        err = err.exceptions[0]
    return err


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["break-glass"]:
        # Its own options, its own prompt for the secret and its own exit codes: handed over whole.
        from .break_glass import main as break_glass

        return break_glass(argv[1:], prog="hlf-actors break-glass")
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
    except CommandFailed as err:
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
