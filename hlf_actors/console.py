"""The operations console: what `hlf-actors status` and friends show, as pages, with one button per fix.

Operations staff would rather look at a page than read a table. Every page is rendered on the server and works
without JavaScript (Jinja2 templates and one stylesheet shipped in the wheel; the host has no internet, so nothing
comes from a CDN). The chart is inline SVG, placed by ``console_chart.py``.

    /                   overview: sync states, circuit, credentials, last reconcile and night, oldest open change,
                        the last 24 h (syncs and failures per hour, the public listing's exposure window)
    /mentors            search by name or id, filter by state;  /mentors/{id}: the story, as `status MENTOR` tells it
    /dead-letters       open ones and their cause; re-queue one or all
    /alerts             recent pushes, failures and dead devices, per organisation
    /expiry             last night's run, reminders sent, upcoming expiries per organisation
    /actions            force sync, reconcile now, check credentials now, and the console's audit log

It runs on the leader and on a standby alike (a standby says so on every page), because every action goes through
the database: force sync and re-queue call the SQL functions the CLI calls (``hlf_force_sync``,
``hlf_requeue_dead_letter``), whose events and NOTIFY the leader picks up like any other change; "reconcile now" and
"check credentials now" run here, as `hlf-actors reconcile` and `check-credentials` run on any machine, and write
their sync requests and ``credential_check`` events for the leader to act on (on the leader, during a tenant-wide
incident, "check credentials now" pokes the leader's own check instead). Each action also appends a
``console_action`` event naming who did it (mentor-less, so the audit list reads an index, not the whole log).

Reads use short-lived synchronous connections in a worker thread, so the pages reuse ``status.py`` as it is and a
slow page never holds a connection the actors need; what each page reads is in ``console_queries.py``, how it shows
a time in ``console_format.py``.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar
from uuid import UUID

import anyio
import jinja2
import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from . import console_queries, db, render, status
from .alerts import Alerting
from .clock import Clock
from .config import Config
from .console_auth import (
    LoginLimiter,
    OidcSignIn,
    PasswordCheck,
    SecurityHeaders,
    csrf_token,
    csrf_valid,
    is_loopback_url,
    who,
)
from .console_format import ago, at
from .credentials import check_credentials
from .dynamics import Portal
from .errors import SignInRefused
from .events import ConsoleAction, NewEvent, encode_payload
from .incidents import Incidents
from .metrics import Health
from .reconcile import alert_aborted, reconcile

__all__ = ["Console"]

_HERE = Path(__file__).parent
_STATES = ("pending", "retrying", "in_sync", "dead_lettered")
_SESSION_HOURS = 8
T = TypeVar("T")
_Handler = Callable[[Request, str], Awaitable[Response]]  # a page or an action, given the signed-in user

_REQUEUE = "SELECT hlf_requeue_dead_letter(%s)"
_FORCE_SYNC = "SELECT hlf_force_sync(%s)"


class Console:
    """The console's pages and actions, bound to the running service's pool, portal client and alerting."""

    def __init__(
        self,
        config: Config,
        *,
        pool: AsyncConnectionPool[Any],
        portal: Portal,
        alerting: Alerting,
        health: Callable[[], Health],
        clock: Clock,
        leader_incidents: Callable[[], Incidents | None] = lambda: None,
    ) -> None:
        assert config.console_enabled, "the console needs a way to sign in"
        self._config = config
        self._url = config.require_database()
        self._pool = pool
        self._portal = portal
        self._alerting = alerting
        self._health = health
        self._clock = clock
        self._leader_incidents = leader_incidents
        self._password = PasswordCheck(config.console_password) if config.console_password else None
        self._oidc = OidcSignIn(config) if config.console_oidc_issuer else None
        self._limiter = LoginLimiter()
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
        )
        env.filters["ago"] = ago
        env.filters["at"] = at
        self._templates = Jinja2Templates(env=env)

    # -- wiring -------------------------------------------------------------------------------------------------

    def app(self) -> Starlette:
        cfg = self._config
        loopback = is_loopback_url(cfg.console_url) if cfg.console_url else cfg.http_host in {"127.0.0.1", "::1"}
        routes = [
            Route("/", self._page(self._overview)),
            Route("/mentors", self._page(self._mentors)),
            Route("/mentors/{mentor_id}", self._page(self._mentor)),
            Route("/dead-letters", self._page(self._dead_letters)),
            Route("/alerts", self._page(self._alerts)),
            Route("/expiry", self._page(self._expiry)),
            Route("/actions", self._page(self._actions)),
            Route("/actions/force-sync", self._action(self._force_sync), methods=["POST"]),
            Route("/actions/requeue", self._action(self._requeue), methods=["POST"]),
            Route("/actions/requeue-all", self._action(self._requeue_all), methods=["POST"]),
            Route("/actions/reconcile", self._action(self._reconcile), methods=["POST"]),
            Route("/actions/check-credentials", self._action(self._check_credentials), methods=["POST"]),
            Route("/login", self._login_form, methods=["GET"]),
            Route("/login", self._login_password, methods=["POST"]),
            Route("/login/entra", self._login_oidc, methods=["GET"]),
            Route("/auth/callback", self._oidc_callback, methods=["GET"], name="auth_callback"),
            Route("/logout", self._logout, methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=_HERE / "static"), name="static"),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={psycopg.OperationalError: self._database_away},
            middleware=[
                Middleware(SecurityHeaders),
                Middleware(
                    SessionMiddleware,
                    secret_key=secrets.token_urlsafe(32),
                    session_cookie="hlf_console",
                    max_age=_SESSION_HOURS * 3600,
                    same_site="lax",
                    https_only=not loopback,
                ),
            ],
        )

    def _page(self, handler: _Handler) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            user = request.session.get("user")
            if not isinstance(user, str):
                return RedirectResponse("/login", status_code=303)
            return await handler(request, user)

        return guarded

    def _action(self, handler: _Handler) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            user = request.session.get("user")
            form = await request.form()
            if not isinstance(user, str):
                return self._refuse(request, "Sign in first.", 403)
            if not csrf_valid(request.session, form.get("csrf")):
                return self._refuse(request, "This form has expired or did not come from the console: reload it.", 403)
            return await handler(request, user)

        return guarded

    def _render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
        health = self._health()
        context.setdefault("error", None)
        context.update(
            user=request.session.get("user"),
            role=health.role,
            csrf=csrf_token(request.session),
            flash=request.session.pop("flash", None),
            states=_STATES,
        )
        return self._templates.TemplateResponse(request, template, context, status_code=status_code)

    async def _database_away(self, request: Request, err: Exception) -> Response:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        logger.warning("console: the database cannot be reached ({})", first)
        return self._refuse(
            request, "The database cannot be reached right now; the page will work again when it can.", 503
        )

    def _refuse(self, request: Request, reason: str, status_code: int) -> Response:
        return self._render(request, "refused.html", status_code=status_code, reason=reason)

    async def _read(self, read: Callable[[psycopg.Connection[Any]], T]) -> T:
        def work() -> T:
            with db.connect(
                self._url, app_schema=self._config.app_schema, application_name="hlf-actors console"
            ) as conn:
                return read(conn)

        return await anyio.to_thread.run_sync(work)

    def _done(self, request: Request, message: str, to: str) -> Response:
        request.session["flash"] = message
        return RedirectResponse(to, status_code=303)

    # -- sign-in ------------------------------------------------------------------------------------------------

    async def _login_form(self, request: Request) -> Response:
        return self._render(request, "login.html", password=self._password is not None, entra=self._oidc is not None)

    async def _login_password(self, request: Request) -> Response:
        form = await request.form()
        if self._password is None:
            return self._refuse(request, "Password sign-in is not configured here.", 404)
        if not csrf_valid(request.session, form.get("csrf")):
            return self._refuse(request, "The sign-in form expired: reload it.", 403)
        client = request.client.host if request.client else "unknown"
        wait = self._limiter.retry_after(client)
        if wait is not None:
            response = self._render(
                request,
                "login.html",
                429,
                password=True,
                entra=self._oidc is not None,
                error=f"Too many failed sign-ins: try again in {wait:.0f} s.",
            )
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        attempt = form.get("password")
        ok = isinstance(attempt, str) and await anyio.to_thread.run_sync(self._password.matches, attempt)
        if not ok:
            self._limiter.failed(client)
            logger.warning("console: failed password sign-in from {}", client)
            return self._render(
                request, "login.html", 401, password=True, entra=self._oidc is not None, error="Wrong password."
            )
        self._sign_in(request, "password")
        return RedirectResponse("/", status_code=303)

    def _sign_in(self, request: Request, user: str) -> None:
        request.session.clear()  # a new session id for the signed-in user: no fixation of a pre-sign-in cookie
        request.session["user"] = user
        csrf_token(request.session)
        logger.info("console: {} signed in", user)

    async def _login_oidc(self, request: Request) -> Response:
        if self._oidc is None:
            return self._refuse(request, "Entra ID sign-in is not configured here.", 404)
        cfg = self._config
        redirect_uri = (
            f"{cfg.console_url.rstrip('/')}/auth/callback" if cfg.console_url else str(request.url_for("auth_callback"))
        )
        try:
            response: Response = await self._oidc.redirect(request, redirect_uri)
        except Exception as err:  # the identity provider's discovery document is unreachable or broken
            logger.warning("console: cannot start Entra ID sign-in: {}", type(err).__name__)
            return self._refuse(request, "The identity provider cannot be reached; try again shortly.", 502)
        return response

    async def _oidc_callback(self, request: Request) -> Response:
        if self._oidc is None:
            return self._refuse(request, "Entra ID sign-in is not configured here.", 404)
        try:
            claims = await self._oidc.claims(request)
        except SignInRefused as err:
            return self._refuse(request, str(err), 403)
        user = who(claims)
        if not self._oidc.admits(claims):
            logger.warning("console: {} signed in but is not in the allowed group or role", user)
            request.session.clear()
            return self._refuse(request, f"{user} may not use this console: ask for the console's group or role.", 403)
        self._sign_in(request, user)
        return RedirectResponse("/", status_code=303)

    async def _logout(self, request: Request) -> Response:
        form = await request.form()
        if not csrf_valid(request.session, form.get("csrf")):
            return self._refuse(request, "This form has expired: reload it.", 403)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # -- pages --------------------------------------------------------------------------------------------------

    async def _overview(self, request: Request, _user: str) -> Response:
        cfg = self._config
        data = await self._read(lambda conn: console_queries.overview(conn, cfg))
        incident = data["summary"].incident
        text = None
        if incident is not None:
            since = f"{incident['since']:%Y-%m-%d %H:%M:%S %Z}" if incident["since"] else "an unknown time"
            text = (
                f"OPEN ({incident['cause']}) since {since}: every send is held. {incident['error']}. "
                f"Fix: {incident['fix']}. It heals by itself once fixed."
            )
        return self._render(request, "overview.html", incident=text, zone=cfg.timezone, **data)

    async def _mentors(self, request: Request, _user: str) -> Response:
        q = (request.query_params.get("q") or "").strip()[:200] or None
        state = request.query_params.get("state") or None
        if state not in (None, *_STATES):
            state = None
        rows = await self._read(lambda conn: console_queries.mentors(conn, q, state))
        return self._render(request, "mentors.html", rows=rows, q=q or "", state=state or "")

    async def _mentor(self, request: Request, _user: str) -> Response:
        try:
            mentor_id = UUID(request.path_params["mentor_id"])
        except ValueError:
            return self._refuse(request, "That is not a mentor id.", 404)

        story, audit = await self._read(lambda conn: console_queries.mentor(conn, mentor_id))
        if story is None:
            return self._refuse(request, f"No mentor {mentor_id} and no events about them.", 404)
        return self._render(request, "mentor.html", story=story, text=render.render_story(story), audit=audit)

    async def _dead_letters(self, request: Request, _user: str) -> Response:
        letters = await self._read(lambda conn: status.dead_letters(conn, include_requeued=False))
        return self._render(request, "dead_letters.html", letters=letters)

    async def _alerts(self, request: Request, _user: str) -> Response:
        return self._render(request, "alerts.html", **await self._read(console_queries.alerts))

    async def _expiry(self, request: Request, _user: str) -> Response:
        today = self._clock.today(self._config.zone)
        data = await self._read(lambda conn: console_queries.expiry(conn, today))
        return self._render(request, "expiry.html", today=today, **data)

    async def _actions(self, request: Request, _user: str) -> Response:
        audit = await self._read(console_queries.audit)
        return self._render(request, "actions.html", audit=audit)

    # -- actions ------------------------------------------------------------------------------------------------

    @staticmethod
    def _audit(conn: psycopg.Connection[Any], action: ConsoleAction) -> None:
        """Append the console_action event: mentor-less, like reconcile_finished (not projected, no inbox)."""
        conn.execute(db.query("insert_event"), (None, NewEvent(None, action).kind, encode_payload(action).decode()))

    async def _force_sync(self, request: Request, user: str) -> Response:
        form = await request.form()
        raw = str(form.get("mentor_id") or "").strip()
        try:
            mentor_id = UUID(raw)
        except ValueError:
            return self._done(request, f"Not a mentor id: {raw[:60]!r}.", "/actions")

        def act(conn: psycopg.Connection[Any]) -> str:
            with conn.transaction():
                try:
                    row = conn.execute(_FORCE_SYNC, (mentor_id,)).fetchone()
                except psycopg.errors.NoDataFound:
                    return f"No mentor with id {mentor_id}."
                assert row is not None
                detail = f"force sync of {mentor_id} requested (event {row[0]})"
                self._audit(
                    conn, ConsoleAction(actor=user, action="force_sync", target=f"mentor:{mentor_id}", detail=detail)
                )
            return detail[0].upper() + detail[1:] + "; the leader sends it now."

        message = await self._read(act)
        return self._done(request, message, f"/mentors/{mentor_id}")

    async def _requeue(self, request: Request, user: str) -> Response:
        form = await request.form()
        raw = str(form.get("dead_letter_id") or "").strip()
        if not raw.isdigit():
            return self._done(request, f"Not a dead letter id: {raw[:30]!r}.", "/dead-letters")
        message = await self._read(lambda conn: self._requeue_ids(conn, user, [int(raw)], "requeue"))
        return self._done(request, message, "/dead-letters")

    async def _requeue_all(self, request: Request, user: str) -> Response:
        def act(conn: psycopg.Connection[Any]) -> str:
            ids = [dl.id for dl in status.dead_letters(conn, include_requeued=False)]
            return self._requeue_ids(conn, user, ids, "requeue_all") if ids else "No open dead letters."

        return self._done(request, await self._read(act), "/dead-letters")

    def _requeue_ids(
        self, conn: psycopg.Connection[Any], user: str, ids: list[int], action: Literal["requeue", "requeue_all"]
    ) -> str:
        done: list[int] = []
        problems: list[str] = []
        for dl_id in ids:
            try:
                with conn.transaction():
                    conn.execute(_REQUEUE, (dl_id,))
                    done.append(dl_id)
            except psycopg.errors.NoDataFound:
                problems.append(f"no dead letter {dl_id}")
            except psycopg.errors.UniqueViolation:
                problems.append(f"dead letter {dl_id} was already re-queued")
        detail = f"re-queued {len(done)} dead letter(s)" + (f": {', '.join(map(str, done[:20]))}" if done else "")
        if problems:
            detail += "; " + "; ".join(problems[:5])
        target = f"dead_letter:{ids[0]}" if action == "requeue" else None
        self._audit(conn, ConsoleAction(actor=user, action=action, target=target, detail=detail))
        return detail[0].upper() + detail[1:] + "."

    async def _reconcile(self, request: Request, user: str) -> Response:
        portal = self._portal
        try:
            async with self._pool.connection() as conn:
                report = await reconcile(
                    conn,
                    portal,
                    today=self._clock.today(self._config.zone),
                    max_missing=self._config.reconcile_max_missing,
                )
            await alert_aborted(self._alerting, report)
        except Exception as err:  # a failed run is reported on the page; the periodic job goes on
            detail = f"reconciliation failed: {type(err).__name__}: {str(err)[:200]}"
        else:
            detail = (
                f"reconciliation aborted, nothing requested: {report.aborted}"
                if report.aborted is not None
                else f"reconciled {report.mentors_checked} mentor(s) against {report.portal_records} portal record(s): "
                f"{len(report.divergent)} divergent, {len(report.missing)} missing, {len(report.orphans)} orphans; "
                f"{len(report.requested)} sync request(s) queued"
            )
        await self._read(lambda conn: self._audit(conn, ConsoleAction(actor=user, action="reconcile", detail=detail)))
        return self._done(request, detail[0].upper() + detail[1:] + ".", "/actions")

    async def _check_credentials(self, request: Request, user: str) -> Response:
        gate = self._leader_incidents()
        try:
            if gate is not None and gate.incident is not None:
                # The leader holds every send: its own check must decide, and one held PATCH confirm, before the
                # all-clear. A pass recorded from here would send the all-clear while the leader still holds.
                _, held = await gate.check("console")
                detail = f"{held} — the leader checks the tenant again now, and sends every held mentor once it passes"
            else:
                report = await check_credentials(self._portal, self._pool, self._alerting, trigger="console")
                detail = report.describe()
        except Exception as err:  # the database or the portal went away mid-check
            detail = f"credential check failed: {type(err).__name__}: {str(err)[:200]}"
        await self._read(
            lambda conn: self._audit(conn, ConsoleAction(actor=user, action="check_credentials", detail=detail))
        )
        return self._done(request, detail[0].upper() + detail[1:] + ".", "/actions")
