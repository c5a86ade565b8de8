"""Credential health checks: learn that the portal stopped accepting us before a mentor's change needs it.

A check is a brand-new token request plus the cheapest authorised read there is (WhoAmI). Its verdict:

    outcome                                               verdict    incident
    token issued and WhoAmI answered                      ok         closes an open one: credential_check
                                                                     {transition: restored} + hlf_credential_restored
    CredentialError (invalid_client, an expired secret,   failed     opens one unless one is open already:
      a 401 that survives a fresh token), 403 or another             credential_check {transition: failed}
      refusal of WhoAmI                                              + hlf_credential_failure to HLF_OPS_TOPIC
    TransientPortalError (timeouts, 5xx, unreachable)     none       none: a portal that is down is the circuit's
                                                                     business, not a credential incident

The incident state lives in the log, not in memory: the newest credential_check with a verdict says whether an
incident is open, so a restart, a standby taking over and `hlf-actors check-credentials` run by hand all agree, and
the alert goes out once per incident however many checks see the failure. Reading that state and recording the new
check happen in one transaction under an advisory lock, so two checkers racing cannot both open the incident.

Checks run when the service becomes leader, before every reconciliation, by hand, and soon after an actor's PATCH
fails with a CredentialError (``CredentialMonitor.poke``: at most one check every 30 s), so the alert does not wait
for the next period.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal, Protocol, runtime_checkable

import anyio
import msgspec
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import db, projections
from .alerting import Alerting
from .config import Config
from .errors import PortalError, TransientPortalError
from .events import CredentialCheck, NewEvent

__all__ = [
    "CheckablePortal",
    "CredentialMonitor",
    "CredentialReport",
    "check_credentials",
    "probe",
    "run_cli",
]

_CHECK_LOCK = 0x484C_465F_4352_4544  # "HLF_CRED": one checker at a time decides transitions
_ALERT_ERROR_CHARS = 200


@runtime_checkable
class CheckablePortal(Protocol):
    async def check_token(self) -> None: ...
    async def whoami(self) -> None: ...


class CredentialReport(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool | None  # None: the portal could not be reached, so no verdict
    error: str | None
    duration_ms: float
    transition: Literal["failed", "restored"] | None = None
    recorded: bool = True

    def describe(self) -> str:
        if self.ok:
            line = f"credentials OK (token + WhoAmI in {self.duration_ms:.0f} ms)"
            if self.transition == "restored":
                line += "; all clear sent to the ops topic (hlf_credential_restored)"
        elif self.ok is False:
            line = f"credentials FAILED: {self.error}"
            if self.transition == "failed":
                line += "; ops alerted (hlf_credential_failure)"
            elif self.recorded:
                line += " (incident already open: ops were alerted when it began)"
        else:
            line = f"credentials not checked: the portal could not be reached ({self.error})"
        if not self.recorded:
            line += "  [not recorded: HLF_DATABASE_URL is not set]"
        return line


async def probe(portal: CheckablePortal) -> tuple[bool | None, str | None, float]:
    """Token request + WhoAmI: (verdict, error, milliseconds). Never raises a PortalError."""
    started = time.perf_counter()
    try:
        await portal.check_token()
        await portal.whoami()
        ok: bool | None = True
        error: str | None = None
    except TransientPortalError as err:
        ok, error = None, f"portal unreachable: {err}"
    except PortalError as err:  # CredentialError, or WhoAmI refused (403) / not found: nothing works until fixed
        ok, error = False, f"credentials refused: {err}"
    return ok, error, round((time.perf_counter() - started) * 1000, 3)


async def check_credentials(
    portal: CheckablePortal,
    pool: AsyncConnectionPool[Any],
    alerting: Alerting,
    *,
    trigger: str = "scheduled",
) -> CredentialReport:
    """Probe, record a credential_check event, and alert the ops topic on the incident's first and last check."""
    ok, error, duration_ms = await probe(portal)
    transition: Literal["failed", "restored"] | None = None
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CHECK_LOCK,))
        cur = await conn.execute(db.query("latest_credential_verdict"))
        row = await cur.fetchone()
        previous: bool | None = row[0] if row else None
        if ok is False and previous is not False:
            transition = "failed"
        elif ok is True and previous is False:
            transition = "restored"
        check = CredentialCheck(ok=ok, error=error, transition=transition, trigger=trigger, duration_ms=duration_ms)
        await projections.append(conn, [NewEvent(None, check)])
    report = CredentialReport(ok=ok, error=error, duration_ms=duration_ms, transition=transition)
    if transition == "failed":
        logger.error("Dynamics credentials refused ({}): {}; alerting the ops topic", trigger, error)
        assert error is not None
        await alerting.ops({"type": "hlf_credential_failure", "error": error[:_ALERT_ERROR_CHARS]})
    elif transition == "restored":
        logger.info("Dynamics credentials work again ({}): all clear", trigger)
        await alerting.ops({"type": "hlf_credential_restored"})
    elif ok is False:
        logger.error("Dynamics credentials still refused ({}; incident already alerted): {}", trigger, error)
    elif ok is None:
        logger.warning("credential check inconclusive ({}): {}", trigger, error)
    elif trigger != "scheduled":
        logger.info("Dynamics credentials OK ({}): token + WhoAmI in {:.0f} ms", trigger, duration_ms)
    return report


class CredentialMonitor:
    """The service's checker: checks run one at a time, and ``poke`` (an actor saw a CredentialError) asks for one
    at once, but poked checks run at most one every ``min_interval_s`` however many PATCHes fail. Pokes while an
    incident is open are ignored: it was alerted on, and the scheduled checks will see it end."""

    def __init__(
        self,
        portal: CheckablePortal,
        pool: AsyncConnectionPool[Any],
        alerting: Alerting,
        *,
        min_interval_s: float = 30.0,
    ) -> None:
        self._portal = portal
        self._pool = pool
        self._alerting = alerting
        self._min_interval_s = min_interval_s
        self._lock = anyio.Lock()
        self._poked = anyio.Event()
        self._last_poked_check = -math.inf
        self._failing = False

    async def check(self, trigger: str) -> CredentialReport:
        async with self._lock:
            report = await check_credentials(self._portal, self._pool, self._alerting, trigger=trigger)
            if report.ok is not None:
                self._failing = not report.ok
            return report

    def poke(self) -> None:
        if not self._failing:
            self._poked.set()

    async def serve_pokes(self) -> None:
        while True:
            await self._poked.wait()
            wait_s = self._last_poked_check + self._min_interval_s - time.monotonic()
            if wait_s > 0:
                await anyio.sleep(wait_s)
            self._poked = anyio.Event()
            self._last_poked_check = time.monotonic()
            try:
                await self.check("credential error")
            except Exception as err:  # a failed check must never end the service; the next one tries again
                logger.error("credential check failed: {}: {}", type(err).__name__, str(err)[:200])


def run_cli(config: Config) -> int:
    """`hlf-actors check-credentials`: check, record (when a database is configured), print one line."""
    from .alerts import build_alert_sender
    from .dynamics import DynamicsClient

    config.require_portal()

    async def main() -> CredentialReport:
        portal = DynamicsClient(config)
        try:
            if not config.database_url:
                ok, error, duration_ms = await probe(portal)
                return CredentialReport(ok=ok, error=error, duration_ms=duration_ms, recorded=False)
            sender = build_alert_sender(config.fcm_credentials, config.fcm_url)
            try:
                async with db.pool(
                    config.database_url,
                    name="hlf-check-credentials",
                    max_size=2,
                    open_timeout=15,
                    app_schema=config.app_schema,
                ) as pool:
                    alerting = Alerting(pool, sender, ops_topic=config.ops_topic)
                    return await check_credentials(portal, pool, alerting, trigger="check-credentials")
            finally:
                await sender.aclose()
        finally:
            await portal.aclose()

    report = anyio.run(main)
    print(report.describe())
    return 0 if report.ok else 1
