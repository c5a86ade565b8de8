"""Break-glass: re-sync mentors straight to the portal with newly issued credentials, without the service.

For when `hlf-actors run` cannot do its job (its client secret expired and nobody can redeploy it yet, or it is
broken) and the public listing must be made true now. An administrator runs ``hlf-actors break-glass`` (or its
wrapper ``scripts/break_glass_sync.py``) with the new credentials; it does what the actors would do, batch by batch::

    append sync_requested {reason: break_glass} per mentor     one transaction, folded into sync_status
    read eligibility, record id and pg_current_snapshot()      one statement; the snapshot sees those requests
    PATCH each mentor, --concurrency at once                   transient errors tried 3 times, 429s waited out
    append each outcome in its own transaction                 AttemptSucceeded / AttemptFailed / DeadLettered
                                                               with that snapshot, exactly as the actor does

so the projections stay true: the outcomes fold exactly like the actor's, the service finds these mentors in sync
when it comes back (and sends nothing again), and `hlf-actors status MENTOR` tells the break-glass story like any
other. Mentors without a portal record are skipped and nothing is written for them. A permanent refusal (404, 403)
is dead-lettered as the actor would, so the coordinators get their alert when the service runs again; a mentor
still failing transiently after 3 tries is left ``retrying`` for the service. If the new credentials are refused
mid-run, sending stops; mentors not yet sent stay ``pending``.

The secret comes from --client-secret-file, a prompt (``getpass``: never echoed), or --client-secret (discouraged:
it shows in the process list and in shell history). It is held in a ``Secret``; no output, event or error message
carries it. --dry-run reads and prints what would be sent, and neither contacts the portal nor writes anything.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import date
from pathlib import Path
from typing import Any, TextIO
from uuid import UUID

import anyio
import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool

from . import db, writer
from .clock import SystemClock
from .config import Config, Secret, load_config
from .credentials import probe
from .dynamics import DynamicsClient, Portal
from .errors import (
    CommandFailed,
    ConfigError,
    HLFError,
    PermanentPortalError,
    TenantError,
    ThrottledError,
    TransientPortalError,
)
from .events import NewEvent, Operation, Payload, SyncRequested
from .outcomes import Answering, Ladder, decide

__all__ = ["MAX_TRIES", "Result", "main"]

MAX_TRIES = 3  # per mentor, for transient errors; a 429 waited out does not count
_MAX_THROTTLES = 20
_BATCH = 500
_GUIDS = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_UNKNOWN_IDS = """SELECT t.id FROM unnest(%s::uuid[]) AS t(id)
WHERE NOT EXISTS (SELECT 1 FROM mentors m WHERE m.id = t.id)
  AND NOT EXISTS (SELECT 1 FROM sync_status s WHERE s.mentor_id = t.id)"""


class _Target(msgspec.Struct, frozen=True):
    """One row of ``break_glass_work``: the mentor, its portal record, and what a PATCH sent now would answer."""

    mentor_id: UUID
    record_id: UUID | None
    answering: Answering

    @property
    def eligible(self) -> bool:
        return self.answering.operation == "restore"

    @property
    def operation(self) -> Operation:
        return self.answering.operation


class Result(msgspec.Struct, frozen=True):
    mentor_id: UUID
    operation: Operation
    ok: bool
    tries: int
    error: str | None = None


class _Progress:
    """done/total and rate on stderr: redrawn in place on a terminal, a line every 10% otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self._total = max(total, 1)
        self._stream = stream
        self._tty = stream.isatty()
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1
        self.done = 0

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        finished = self.done >= self._total
        if self._tty:
            if finished or now - self._last_draw >= 0.1:
                self._last_draw = now
                self._stream.write("\r" + self._line(now) + ("\n" if finished else ""))
                self._stream.flush()
        else:
            decile = self.done * 10 // self._total
            if decile != self._last_decile:
                self._last_decile = decile
                self._stream.write(self._line(now) + "\n")

    def _line(self, now: float) -> str:
        width = 30
        filled = min(width, self.done * width // self._total)
        rate = self.done / max(now - self._started, 1e-6)
        return f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self._total}  {rate:.0f}/s"


class _Run:
    def __init__(self, config: Config, pool: AsyncConnectionPool[Any], portal: Portal | None, today: date) -> None:
        self._config = config
        self._pool = pool
        self._portal = portal
        self._today = today
        self._limiter = anyio.CapacityLimiter(config.portal_concurrency)
        self.stopped: str | None = None  # why sending stopped early
        self.results: list[Result] = []
        self.no_record: list[UUID] = []
        self.not_attempted = 0

    async def work(self, mentor_ids: Sequence[UUID]) -> list[_Target]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(db.query("break_glass_work"), (self._today, list(mentor_ids)))
            rows = await cur.fetchall()
        return [
            _Target(m, record, Answering("restore" if eligible else "remove", int(seq or 0), snapshot))
            for m, record, eligible, seq, snapshot in rows
        ]

    async def batch(self, mentor_ids: Sequence[UUID], progress: _Progress) -> None:
        first = await self.work(mentor_ids)
        sendable = [w.mentor_id for w in first if w.record_id is not None]
        for w in first:
            if w.record_id is None:
                self.no_record.append(w.mentor_id)
                progress.step()
        if not sendable:
            return
        async with self._pool.connection() as conn, conn.transaction():
            await writer.append(conn, [NewEvent(m, SyncRequested(reason="break_glass")) for m in sendable])
        # Read again: this snapshot sees the requests just committed, so the outcomes answer them.
        work = [w for w in await self.work(sendable) if w.record_id is not None]
        self.no_record.extend(set(sendable) - {w.mentor_id for w in work})  # unlinked in between: stays pending
        async with anyio.create_task_group() as tg:
            for item in work:
                tg.start_soon(self._one, item, progress)

    async def _record(self, mentor_id: UUID, *payloads: Payload) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            await writer.append(conn, [NewEvent(mentor_id, p) for p in payloads])

    async def _one(self, work: _Target, progress: _Progress) -> None:
        async with self._limiter:
            if self.stopped:
                self.not_attempted += 1
                progress.step()
                return
            result = await self._send(work)
        self.results.append(result)
        progress.step()

    async def _send(self, w: _Target) -> Result:
        assert w.record_id is not None and self._portal is not None, "a dry run never sends"
        cfg = self._config
        # No jitter: one process sends, so nobody retries in lock-step with it.
        ladder = Ladder(cfg.backoff_base_ms, cfg.backoff_max_ms, MAX_TRIES, dead_letter_when_exhausted=False)
        answering = w.answering
        attempt, throttles = 0, 0
        while True:
            attempt += 1
            try:
                status = await self._portal.set_listed(w.record_id, w.eligible)
            except ThrottledError as err:
                # Waited out without spending a try, as the actor does; but not for ever.
                throttles += 1
                give_up = throttles > _MAX_THROTTLES
                decision = decide(answering, attempt, err, ladder, give_up=give_up)
                await self._record(w.mentor_id, *decision.events)
                if decision.delay_ms is None:
                    return Result(w.mentor_id, w.operation, False, attempt, f"still throttled: {err}")
                attempt -= 1
                await anyio.sleep(min(decision.delay_ms, cfg.backoff_max_ms) / 1000)
                continue
            except TenantError as err:  # every mentor would fail the same way: stop, and say what to fix
                await self._record(w.mentor_id, *decide(answering, attempt, err, ladder).events)
                self.stopped = f"tenant-wide incident ({err.cause}): {err}; fix: {err.fix}"
                return Result(w.mentor_id, w.operation, False, attempt, str(err))
            except TransientPortalError as err:
                # The last one keeps retryable=True and no delay: the mentor is left `retrying` for the service.
                decision = decide(answering, attempt, err, ladder)
                await self._record(w.mentor_id, *decision.events)
                if decision.delay_ms is None:
                    return Result(w.mentor_id, w.operation, False, attempt, str(err))
                await anyio.sleep(decision.delay_ms / 1000)
                continue
            except PermanentPortalError as err:
                await self._record(w.mentor_id, *decide(answering, attempt, err, ladder).events)
                return Result(w.mentor_id, w.operation, False, attempt, f"dead-lettered: {err}")
            await self._record(w.mentor_id, *decide(answering, attempt, status, ladder).events)
            return Result(w.mentor_id, w.operation, True, attempt)


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Re-sync mentors straight to the Dynamics portal with newly issued credentials, while the "
        "service is down or broken. Appends every attempt to event_log, as the service does.",
    )
    p.add_argument("mentors", nargs="*", type=UUID, metavar="MENTOR_ID", help="mentors to re-sync (or --all)")
    p.add_argument("--all", action="store_true", help="every mentor (and deleted mentors the portal may still list)")
    p.add_argument("--client-id", help="the app's client id (default: HLF_DYNAMICS_CLIENT_ID)")
    p.add_argument(
        "--client-secret",
        help="the new client secret (discouraged: visible in the process list and shell history; "
        "prefer --client-secret-file or the prompt)",
    )
    p.add_argument("--client-secret-file", type=Path, help="a file holding the new client secret")
    p.add_argument("--token-url", help="OAuth2 token endpoint (default: HLF_DYNAMICS_TOKEN_URL)")
    p.add_argument("--dynamics-url", help="Dataverse org root (default: HLF_DYNAMICS_URL)")
    p.add_argument("--dry-run", action="store_true", help="print what would be sent; send and record nothing")
    p.add_argument("--concurrency", type=int, help="requests in flight at once (default: HLF_PORTAL_CONCURRENCY)")
    return p


def _secret(args: argparse.Namespace, prompt: Callable[[str], str], client_id: str) -> Secret:
    if args.client_secret_file is not None:
        try:
            value = args.client_secret_file.read_text().strip()
        except OSError as err:
            raise CommandFailed(
                f"cannot read --client-secret-file {str(args.client_secret_file)!r}: {err.strerror}", 2
            ) from None
    elif args.client_secret is not None:
        print(
            "break-glass: warning: --client-secret is visible in the process list and shell history; "
            "prefer --client-secret-file or the prompt",
            file=sys.stderr,
        )
        value = args.client_secret.strip()
    else:
        value = prompt(f"new client secret for {client_id} (not echoed): ").strip()
    if not value:
        raise CommandFailed("the client secret is empty", 2)
    return Secret(value)


def _configure(args: argparse.Namespace, env: Mapping[str, str] | None, prompt: Callable[[str], str]) -> Config:
    config = load_config(env) if env is not None else load_config()
    changes: dict[str, Any] = {}
    if args.concurrency is not None:
        if not 1 <= args.concurrency <= 52:
            raise CommandFailed("--concurrency must be between 1 and 52 (Dataverse's own limit)", 2)
        changes["portal_concurrency"] = args.concurrency
    if args.dry_run:
        return msgspec.structs.replace(config, **changes)
    if args.token_url:
        changes["dynamics_token_url"] = args.token_url
    if args.dynamics_url:
        changes["dynamics_url"] = args.dynamics_url.rstrip("/")
    client_id = args.client_id or config.dynamics_client_id
    if not client_id:
        raise CommandFailed("say which app: --client-id (or HLF_DYNAMICS_CLIENT_ID)", 2)
    changes["dynamics_client_id"] = client_id
    changes["dynamics_client_secret"] = _secret(args, prompt, client_id)
    config = msgspec.structs.replace(config, **changes)
    config.require_portal()
    return config


async def _targets(pool: AsyncConnectionPool[Any], args: argparse.Namespace) -> list[UUID]:
    async with pool.connection() as conn:
        if args.all:
            cur = await conn.execute(db.query("break_glass_all"))
            return [row[0] for row in await cur.fetchall()]
        ids = list(dict.fromkeys(args.mentors))
        cur = await conn.execute(_UNKNOWN_IDS, (ids,))
        unknown = [str(row[0]) for row in await cur.fetchall()]
    if unknown:
        raise CommandFailed(f"no such mentor(s): {', '.join(unknown)}; nothing was sent", 2)
    return ids


def _flag(eligible: bool) -> str:
    return "restore (listed = true)" if eligible else "remove (listed = false)"


async def _dry_run(run: _Run, targets: Sequence[UUID], out: TextIO, limit: int = 50) -> int:
    counts: Counter[str] = Counter()
    shown = 0
    print(f"dry run: nothing is sent and nothing is recorded\n{'MENTOR':36}  {'RECORD':36}  WOULD SEND", file=out)
    for i in range(0, len(targets), _BATCH):
        for w in await run.work(targets[i : i + _BATCH]):
            what = _flag(w.eligible) if w.record_id is not None else "nothing (no portal record)"
            counts[w.operation if w.record_id is not None else "no record"] += 1
            if shown < limit:
                print(f"{w.mentor_id!s:36}  {w.record_id!s:36}  {what}", file=out)
                shown += 1
    if sum(counts.values()) > shown:
        print(f"… and {sum(counts.values()) - shown} more", file=out)
    print(
        f"would send {counts['restore'] + counts['remove']} PATCH(es): {counts['restore']} restore, "
        f"{counts['remove']} remove; {counts['no record']} mentor(s) without a portal record",
        file=out,
    )
    return 0


def _summary(run: _Run, total: int, seconds: float, out: TextIO) -> None:
    ok = [r for r in run.results if r.ok]
    failed = [r for r in run.results if not r.ok]
    lines = [
        f"break-glass sync: {total} mentor(s) in {seconds:.1f}s",
        f"  {'sent':<24}{len(run.results):>8}",
        f"  {'succeeded':<24}{len(ok):>8}",
        f"  {'failed':<24}{len(failed):>8}",
    ]
    for reason, n in Counter(_GUIDS.sub("<id>", r.error or "?")[:120] for r in failed).most_common():
        lines.append(f"      {n:>6}  {reason}")
    lines.append(f"  {'no portal record':<24}{len(run.no_record):>8}   (nothing to send)")
    if run.not_attempted or run.stopped:
        lines.append(f"  {'not attempted':<24}{run.not_attempted:>8}   (stopped: {run.stopped}; they stay pending)")
    if failed:
        lines.append(
            "  failed mentors are recorded: `hlf-actors status MENTOR` tells why; the service retries or alerts on "
            "them when it runs"
        )
    for r in failed[:50]:
        lines.append(f"  FAILED {r.mentor_id}  {r.operation}  after {r.tries} try(ies): {(r.error or '')[:100]}")
    print("\n".join(lines), file=out)


async def _main(args: argparse.Namespace, config: Config, out: TextIO, err: TextIO) -> int:
    url = config.require_database()
    portal = DynamicsClient(config) if not args.dry_run else None
    try:
        async with AsyncExitStack() as stack:
            try:
                pool = await stack.enter_async_context(
                    db.pool(
                        url,
                        name="hlf-break-glass",
                        max_size=config.portal_concurrency + 2,
                        open_timeout=15,
                        app_schema=config.app_schema,
                    )
                )
            except psycopg.OperationalError:
                raise CommandFailed("cannot reach the database (HLF_DATABASE_URL)", 3) from None
            return await _resync(args, config, pool, portal, out, err)
    finally:
        if portal is not None:
            await portal.aclose()


async def _resync(
    args: argparse.Namespace,
    config: Config,
    pool: AsyncConnectionPool[Any],
    portal: Portal | None,
    out: TextIO,
    err: TextIO,
) -> int:
    targets = await _targets(pool, args)
    today = SystemClock().today(config.zone)
    if portal is None:
        return await _dry_run(_Run(config, pool, None, today), targets, out)
    ok, error, _cause, ms = await probe(portal)
    if not ok:
        raise CommandFailed(f"the new credentials do not work ({error}); nothing was sent or recorded", 1)
    print(f"credentials OK (tenant check in {ms:.0f} ms); re-syncing {len(targets)} mentor(s)", file=err)
    run = _Run(config, pool, portal, today)
    progress = _Progress(len(targets), err)
    started = time.monotonic()
    for i in range(0, len(targets), _BATCH):
        if run.stopped:
            run.not_attempted += len(targets) - i
            break
        await run.batch(targets[i : i + _BATCH], progress)
    _summary(run, len(targets), time.monotonic() - started, out)
    return 0 if not run.stopped and all(r.ok for r in run.results) else 1


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "break_glass_sync.py",
    prompt: Callable[[str], str] = getpass.getpass,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Exit 0 when every mentor sent succeeded, 1 otherwise, 2 for bad input, 3 when the database is unreachable."""
    out, err = out or sys.stdout, err or sys.stderr
    args = _parser(prog).parse_args(argv)
    secret: str | None = None
    try:
        if bool(args.all) == bool(args.mentors):
            raise CommandFailed("say which mentors: --all, or their ids", 2)
        config = _configure(args, env, prompt)
        if config.dynamics_client_secret is not None and not args.dry_run:
            secret = config.dynamics_client_secret.reveal()
        return anyio.run(_main, args, config, out, err)
    except CommandFailed as fail:
        print(f"break-glass: {_scrub(str(fail), secret)}", file=err)
        return fail.code
    except ConfigError as fail:
        print(f"break-glass: configuration: {_scrub(str(fail), secret)}", file=err)
        return 2
    except HLFError as fail:
        print(f"break-glass: {_scrub(str(fail), secret)}", file=err)
        return 1
    except psycopg.OperationalError as fail:
        print(f"break-glass: database error: {_scrub(str(fail).strip()[:200], secret)}", file=err)
        return 3
    except KeyboardInterrupt:
        print("break-glass: interrupted; mentors not yet sent stay pending for the service", file=err)
        return 130


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "********") if secret else text
