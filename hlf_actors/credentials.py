"""Tenant checks: learn that the portal stopped accepting us, and why, before (or as soon as) a change needs it.

A check (``DynamicsClient.tenant_check``) is a brand-new token request, WhoAmI, a one-row read of the entity set
selecting the key and listed columns, and RetrievePrincipalAccess for that row (Write, checked without writing).
Its verdict:

    outcome                                          verdict   incident
    every step answered                              ok        closes an open one: credential_check
                                                               {transition: restored} + the all-clear alert
    TenantError (CredentialError: invalid_client,    failed    opens one (or changes its cause): credential_check
      an expired secret, a 401 that survives a                 {transition: failed, cause} + one ops alert that
      fresh token; a removed application user; a               names the cause and the fix
      privilege, entity set or column gone; not
      Dataverse answering), or another refusal
    TransientPortalError (timeouts, 5xx)             none      none: a portal that is down is the circuit's business

Alerts: cause ``credentials`` sends ``hlf_credential_failure`` / ``hlf_credential_restored`` (the contract's names);
every other cause sends ``hlf_portal_incident`` {cause, error, fix} / ``hlf_portal_incident_resolved`` {cause}.

The incident state lives in the log, not in memory: the newest credential_check with a verdict says whether an
incident is open and its cause, so a restart, a standby taking over and `hlf-actors check-credentials` run by hand
all agree, and the alert goes out once per incident however many checks see the failure. Reading that state and
recording the new check happen in one transaction under an advisory lock, so two checkers racing cannot both open
the incident. ``incidents.py`` is the service's side: it holds every send while an incident is open, and heals it.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Literal

import msgspec
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import db, writer
from .alerts import Alerting
from .dynamics import Portal
from .errors import TENANT_CAUSES, PortalError, TenantError, TransientPortalError
from .events import CredentialCheck, NewEvent

__all__ = [
    "CredentialReport",
    "TenantState",
    "check_credentials",
    "probe",
    "read_tenant_state",
    "record_verdict",
]

_CHECK_LOCK = 0x484C_465F_4352_4544  # "HLF_CRED": one checker at a time decides transitions
_ALERT_ERROR_CHARS = 200


class CredentialReport(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool | None  # None: the portal could not be reached, so no verdict
    error: str | None
    duration_ms: float
    cause: str | None = None
    transition: Literal["failed", "restored"] | None = None
    recorded: bool = True

    def describe(self) -> str:
        if self.ok:
            line = f"credentials OK (token, WhoAmI, read and write access in {self.duration_ms:.0f} ms)"
            if self.transition == "restored":
                line += "; all clear sent to ops"
        elif self.ok is False:
            line = f"credentials FAILED ({self.cause}): {self.error}"
            if self.cause in TENANT_CAUSES:
                line += f"; fix: {TENANT_CAUSES[self.cause]}"
            if self.transition == "failed":
                line += "; ops alerted"
            elif self.recorded:
                line += " (incident already open: ops were alerted when it began)"
        else:
            line = f"credentials not checked: the portal could not be reached ({self.error})"
        if not self.recorded:
            line += "  [not recorded: HLF_DATABASE_URL is not set]"
        return line


class TenantState(msgspec.Struct, frozen=True, kw_only=True):
    """The newest verdict in the log: ``ok`` False means an incident is open, with its cause and since when."""

    ok: bool | None
    cause: str | None = None
    error: str | None = None
    since: datetime | None = None


async def read_tenant_state(conn: Any) -> TenantState:
    cur = await conn.execute(db.query("latest_credential_verdict"))
    row = await cur.fetchone()
    if row is None:
        return TenantState(ok=None)
    ok, cause, error, since = row
    return TenantState(ok=ok, cause=(cause or "credentials") if ok is False else None, error=error, since=since)


async def probe(portal: Portal) -> tuple[bool | None, str | None, str | None, float]:
    """The tenant check: (verdict, error, cause, milliseconds). Never raises a PortalError."""
    started = time.perf_counter()
    ok: bool | None = True
    error: str | None = None
    cause: str | None = None
    try:
        await portal.tenant_check()
    except TransientPortalError as err:
        ok, error = None, f"portal unreachable: {err}"
    except TenantError as err:
        ok, error, cause = False, str(err), err.cause
    except PortalError as err:  # a refusal the check's own requests should never get: nothing works until fixed
        ok, error, cause = False, str(err), "privilege" if err.http_status == 403 else "not_dataverse"
    return ok, error, cause, round((time.perf_counter() - started) * 1000, 3)


_TAKE_CHECK_LOCK = "SELECT pg_advisory_xact_lock(%s)"


async def record_verdict(
    pool: AsyncConnectionPool[Any],
    alerting: Alerting,
    *,
    ok: bool | None,
    error: str | None,
    cause: str | None,
    trigger: str,
    duration_ms: float | None = None,
) -> tuple[Literal["failed", "restored"] | None, TenantState]:
    """Record one verdict, decide whether it opens or closes the incident (against the newest one in the log, under
    a lock), and alert ops on a transition. Returns the transition and the state before it."""
    transition: Literal["failed", "restored"] | None = None
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(_TAKE_CHECK_LOCK, (_CHECK_LOCK,))
        before = await read_tenant_state(conn)
        if ok is False and (before.ok is not False or before.cause != cause):
            transition = "failed"
        elif ok is True and before.ok is False:
            transition = "restored"
        check = CredentialCheck(
            ok=ok, error=error, transition=transition, trigger=trigger, duration_ms=duration_ms, cause=cause
        )
        await writer.append(conn, [NewEvent(None, check)])
    if transition == "failed":
        assert error is not None and cause is not None
        logger.error("tenant-wide incident ({}; {}): {}; alerting ops", cause, trigger, error)
        fix = TENANT_CAUSES.get(cause, "")
        if cause == "credentials":
            await alerting.ops({"type": "hlf_credential_failure", "error": error[:_ALERT_ERROR_CHARS], "fix": fix})
        else:
            data = {"type": "hlf_portal_incident", "cause": cause, "error": error[:_ALERT_ERROR_CHARS], "fix": fix}
            await alerting.ops(data)
    elif transition == "restored":
        logger.info("the tenant-wide incident ({}) is over ({}): all clear", before.cause, trigger)
        if before.cause == "credentials":
            await alerting.ops({"type": "hlf_credential_restored"})
        else:
            await alerting.ops({"type": "hlf_portal_incident_resolved", "cause": before.cause or ""})
    elif ok is False:
        logger.error("tenant-wide incident still open ({}; alerted when it began): {}", trigger, error)
    elif ok is None:
        logger.warning("tenant check inconclusive ({}): {}", trigger, error)
    return transition, before


async def check_credentials(
    portal: Portal,
    pool: AsyncConnectionPool[Any],
    alerting: Alerting,
    *,
    trigger: str = "scheduled",
) -> CredentialReport:
    """Check, record a credential_check event, and alert ops on the incident's first and last check."""
    ok, error, cause, duration_ms = await probe(portal)
    transition, _ = await record_verdict(
        pool, alerting, ok=ok, error=error, cause=cause, trigger=trigger, duration_ms=duration_ms
    )
    if ok and transition is None and trigger != "scheduled":
        logger.info("Dynamics tenant check OK ({}) in {:.0f} ms", trigger, duration_ms)
    return CredentialReport(ok=ok, error=error, duration_ms=duration_ms, cause=cause, transition=transition)
