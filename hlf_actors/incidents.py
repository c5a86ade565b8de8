"""Tenant-wide incidents: a failure that hits every mentor is one incident that is held and heals by itself.

A revoked client secret, a removed application user, a role without Write, a renamed table or column, or a sign-in
page answering in Dataverse's place (the causes in ``errors.TENANT_CAUSES``; ``dynamics.py`` tells them from a
single mentor's problem) would otherwise be spent as N per-mentor failures: every changed mentor using up its
attempts, dead-lettered, and its coordinators pushed about something only an operator can fix. Instead:

    closed ──(a sync answer names a tenant cause, or an undecided refusal fails the tenant check)──▶ open
      ▲        one credential_check {transition: failed, cause} and one ops alert; every send is held
      │                                                                                           │
      │                 tenant check every HLF_INCIDENT_CHECK_EVERY, doubling up to _MAX;          │
      │                 at once when the secret file changes                                       ▼
      └──(the probe PATCH succeeds, or nothing waits to be sent)── probing ◀──(the check passes)── open
                  credential_check {transition: restored} + the all-clear;      ──(the probe gets the same
                  every held mentor is sent at once                               tenant error)──▶ open

While open no mentor spends an attempt, none is dead-lettered and no coordinator is pushed: each held mentor records
one ``attempt_failed`` (``throttled``: no attempt counted) whose error names the incident, so `status MENTOR` and
``last_error`` say why it waits. The state lives in the log (``credentials.read_tenant_state``), so a restarted or
newly elected leader starts holding at once, without a second alert.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import anyio
import msgspec
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from .alerts import Alerting
from .config import Config
from .credentials import probe, read_tenant_state, record_verdict
from .dynamics import Portal
from .errors import TENANT_CAUSES, TenantError

__all__ = ["Incident", "Incidents"]

# How long a passed check waits for a held mentor to become the probe before closing without one.
_PROBE_WAIT_S = 5.0
_SECRET_FILE_POLL_S = 1.0


class Incident(msgspec.Struct, frozen=True, kw_only=True):
    cause: str
    error: str
    since: datetime | None

    @property
    def fix(self) -> str:
        return TENANT_CAUSES.get(self.cause, "")

    def describe(self) -> str:
        return f"tenant-wide incident ({self.cause}): {self.error[:160]}; fix: {self.fix}"


class Incidents:
    """The leader's incident gate and healer. Actors ask ``admit`` before every send (it waits while an incident
    holds sends) and report what they learn: ``report`` (a tenant error), ``decide`` (an undecided refusal),
    ``probe_finished`` (the outcome of the one PATCH let through to confirm a fix)."""

    def __init__(
        self,
        config: Config,
        pool: AsyncConnectionPool[Any],
        alerting: Alerting,
        portal: Portal | None,
        *,
        on_change: Callable[[Incident | None], None] = lambda incident: None,
    ) -> None:
        self._config = config
        self._pool = pool
        self._alerting = alerting
        self._portal = portal
        self._on_change = on_change
        self._secret_file = Path(config.dynamics_client_secret_file) if config.dynamics_client_secret_file else None
        self.incident: Incident | None = None
        self._probing = False
        self._probe_taken = False
        self._changed = anyio.Event()  # set (and replaced) on every change of state
        self._poked = anyio.Event()
        self._decide_lock = anyio.Lock()
        self._check_lock = anyio.Lock()
        self._last_pass = -float("inf")
        self.waiting = 0

    @property
    def incident_text(self) -> str:
        return self.incident.describe() if self.incident is not None else "no tenant-wide incident"

    @property
    def holding(self) -> bool:
        return self.incident is not None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
        self._on_change(self.incident)

    # -- state ----------------------------------------------------------------------------------------------------

    async def load(self) -> None:
        """Take the state the log holds: an incident opened before a restart keeps holding, without a new alert."""
        async with self._pool.connection() as conn:
            state = await read_tenant_state(conn)
        if state.ok is False and state.cause is not None:
            self._open(Incident(cause=state.cause, error=state.error or "", since=state.since))
            logger.warning("{}: open since {}, holding every send until it heals", self.incident_text, state.since)

    def _open(self, incident: Incident) -> None:
        self.incident = incident
        self._probing = self._probe_taken = False
        self._notify()

    async def _close(self, trigger: str) -> None:
        if self.incident is None:
            return
        await record_verdict(self._pool, self._alerting, ok=True, error=None, cause=None, trigger=trigger)
        logger.info("tenant-wide incident ({}) healed ({}): sending every held mentor", self.incident.cause, trigger)
        self.incident = None
        self._probing = self._probe_taken = False
        self._notify()

    async def report(self, err: TenantError, *, trigger: str = "sync answer") -> None:
        """A sync answer named a tenant-wide cause: open the incident (alerting once), or keep it open."""
        current = self.incident
        if current is not None and current.cause == err.cause:
            if self._probing:  # the probe failed: the fix did not take
                self._probing = self._probe_taken = False
                self._notify()
            return
        # Hold everyone first: the record and the ops alert take round trips, and every send meanwhile would fail
        # the same way.
        self._open(Incident(cause=err.cause, error=str(err), since=datetime.now().astimezone()))
        self._poked.set()
        await record_verdict(self._pool, self._alerting, ok=False, error=str(err), cause=err.cause, trigger=trigger)

    async def decide(self, err: Exception) -> Literal["tenant", "mentor", "unknown"]:
        """An answer that does not say whose problem it is: run the tenant check once (concurrent callers share it)
        and let it decide. "unknown" when the portal could not be reached to check."""
        asked = time.monotonic()
        async with self._decide_lock:
            if self.incident is not None:
                return "tenant"
            if self._last_pass >= asked or self._portal is None:  # a check that began after we asked passed
                return "mentor"
            ok = (await self._check(f"undecided refusal: {str(err)[:120]}"))[0]
            if ok:
                return "mentor"
            return "tenant" if ok is False else "unknown"

    # -- the gate -------------------------------------------------------------------------------------------------

    async def admit(self) -> bool:
        """Wait while an incident holds sends. True when the caller is the probe that confirms a fix: it must then
        call ``probe_finished`` (or ``report``) with its outcome."""
        while self.incident is not None:
            if self._probing and not self._probe_taken:
                self._probe_taken = True
                return True
            changed = self._changed
            self.waiting += 1
            try:
                await changed.wait()
            finally:
                self.waiting -= 1
        return False

    async def probe_finished(self, tenant_ok: bool | None) -> None:
        """The probe's outcome: True (the portal took it, or refused it for that record alone) closes the incident;
        None (no verdict: timed out, portal down) lets another held mentor probe."""
        if self.incident is None or not self._probing:
            return
        if tenant_ok:
            await self._close("a held sync succeeded")
        else:
            self._probe_taken = False
            self._notify()

    # -- healing --------------------------------------------------------------------------------------------------

    async def _check(self, trigger: str, *, record_pass: bool = False) -> tuple[bool | None, str | None, str | None]:
        """One tenant check. A failure or no verdict is recorded (opening the incident, or changing its cause). While
        an incident is open a pass is recorded by the close, after the probe confirms it, so the all-clear never goes
        out for a fix that a PATCH then disproves; with none open, ``record_pass`` records it at once."""
        assert self._portal is not None
        async with self._check_lock:
            started = time.monotonic()
            ok, error, cause, duration_ms = await probe(self._portal)
            if ok:
                self._last_pass = started
                if not record_pass:
                    return ok, error, cause
            await record_verdict(
                self._pool,
                self._alerting,
                ok=ok,
                error=error,
                cause=cause,
                trigger=trigger,
                duration_ms=duration_ms,
            )
            current = self.incident
            if ok is False and cause is not None and error is not None and (current is None or current.cause != cause):
                self._open(Incident(cause=cause, error=error, since=datetime.now().astimezone()))
            return ok, error, cause

    async def check(self, trigger: str) -> tuple[bool | None, str | None]:
        """A scheduled or start-up check (``reconcile_forever``): with no incident open it records its verdict like
        `hlf-actors check-credentials`; with one open it is a heal attempt. Returns (verdict, error)."""
        if self._portal is None:
            return True, None
        if self.incident is None:
            ok, error, _ = await self._check(trigger, record_pass=True)
            return ok, error
        self._poked.set()
        return False, self.incident.describe()

    def _secret_file_stamp(self) -> tuple[int, int] | None:
        if self._secret_file is None:
            return None
        try:
            st = self._secret_file.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    async def _wait_for_next_check(self, delay_s: float) -> None:
        """Sleep until the next check is due, a poke asks for one, or the secret file changes (a rotated secret
        heals within seconds, whatever the backoff has grown to)."""
        stamp = self._secret_file_stamp()
        with anyio.move_on_after(delay_s):
            while not self._poked.is_set():
                with anyio.move_on_after(_SECRET_FILE_POLL_S):
                    await self._poked.wait()
                if self.incident is not None and self.incident.cause == "credentials":
                    if self._secret_file_stamp() != stamp:
                        logger.info("HLF_DYNAMICS_CLIENT_SECRET_FILE changed: checking the tenant now")
                        break
        self._poked = anyio.Event()

    async def heal_forever(self, leadership: Callable[[], Awaitable[None]]) -> None:
        """While an incident is open: check, back off, and once a check passes let one held send confirm the fix."""
        if self._portal is None:
            logger.warning("tenant checks are off: this portal client cannot run them; incidents heal by probe PATCH")
        cfg = self._config
        delay = cfg.incident_check_s
        while True:
            if self.incident is None:
                await self._changed.wait()
                delay = cfg.incident_check_s
                continue
            await leadership()
            await self._wait_for_next_check(delay)
            if self.incident is None:
                continue
            try:
                ok = True if self._portal is None else (await self._check("incident check"))[0]
            except Exception as err:  # the database may be away: try again at the next period
                logger.error("incident check failed: {}: {}", type(err).__name__, str(err)[:200])
                ok = None
            if not ok:
                delay = min(delay * 2, cfg.incident_check_max_s)
                continue
            if not self.waiting:
                await self._close("tenant check passed")
                continue
            self._probing, self._probe_taken = True, False
            self._notify()
            with anyio.move_on_after(_PROBE_WAIT_S):
                while self._probing and not self._probe_taken and self.incident is not None:
                    await self._changed.wait()
            if self.incident is not None and self._probing and not self._probe_taken:
                await self._close("tenant check passed")
            elif self.incident is not None and not self._probing:
                delay = min(delay * 2, cfg.incident_check_max_s)  # the probe disproved the fix
