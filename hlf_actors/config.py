"""Configuration: read once from the environment (and an optional ``.env`` file), validated, frozen.

Names and defaults are the outside contract in ``shared/INTERFACE.md``. A bad value raises ``ConfigError`` whose
message is one line naming the variable and what is wrong with it (``env_values.py`` reads each value); the CLI
prints that line and exits 2.
Secrets are wrapped in ``Secret`` so that no repr, log line or exception can show them by accident.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from .env_values import EnvReader, is_loopback, parse_duration, read_dotenv
from .errors import ConfigError

__all__ = ["Config", "Secret", "load_config"]


class Secret:
    """A value that must never be printed. ``reveal()`` is the one way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class Config(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str | None = None
    dynamics_url: str | None = None
    dynamics_token_url: str | None = None
    dynamics_client_id: str | None = None
    dynamics_client_secret: Secret | None = None
    dynamics_client_secret_file: str | None = None  # read again after a refusal: rotation without a restart
    dynamics_scope: str | None = None
    dynamics_entity_set: str = "hlf_mentorlistings"
    dynamics_listed_field: str = "hlf_publiclisting"
    dynamics_key_field: str = "hlf_mentorlistingid"
    max_attempts: int = 5
    backoff_base_ms: int = 2000
    backoff_max_ms: int = 300_000
    portal_concurrency: int = 10
    fcm_credentials: str | None = None
    fcm_url: str | None = None
    ops_topic: str = "hlf-ops"
    timezone: str = "Europe/Oslo"
    nightly_at: time = time(2, 0)
    reconcile_every_s: float = 900.0
    http_port: int = 8080
    http_host: str = "0.0.0.0"
    public_listing_url: str | None = None
    public_listing_deadline_s: float = 1200.0
    public_listing_match: Literal["portal_record_id", "full_name"] = "portal_record_id"
    reconcile_max_missing: float = 0.10  # share of linked records a listing read may lack before it is refused
    # While a tenant-wide incident is open: the first tenant check after this long, doubling up to the cap.
    incident_check_s: float = 30.0
    incident_check_max_s: float = 300.0
    public_listing_min_interval_s: float = 30.0
    public_listing_marker: str | None = None
    public_listing_page_param: str | None = None  # HTML mode: the query parameter that numbers a list's pages
    app_schema: str = "public"
    # Not in the contract's table: tuning knobs with safe defaults, for operators who need them.
    sweep_interval_s: float = 30.0
    poll_interval_s: float = 1.0
    portal_timeout_s: float = 30.0
    # Dataverse's service-protection limit: requests per sliding window, per user (the app).
    portal_rate_requests: int = 6000
    portal_rate_window_s: float = 300.0
    backoff_jitter: bool = True
    # Alerts that reach a person (issue 21): the ops channels beside HLF_OPS_TOPIC, and the explicit "off".
    ops_webhook_url: Secret | None = None  # its path carries the webhook's signature: a secret
    alerts_off: bool = False
    ops_email_to: tuple[str, ...] = ()
    ops_email_from: str | None = None
    ops_email_smtp_host: str | None = None
    ops_email_smtp_port: int = 587
    ops_email_smtp_user: str | None = None
    ops_email_smtp_password: Secret | None = None
    # The operations console (hlf_actors.console): off unless one way of signing in is configured.
    console_password: Secret | None = None  # HLF_CONSOLE_PASSWORD_FILE's content; hashed at start-up
    console_oidc_issuer: str | None = None
    console_oidc_client_id: str | None = None
    console_oidc_client_secret: Secret | None = None
    console_allowed_group: str | None = None  # an Entra ID group object id (`groups` claim) or app role (`roles`)
    console_url: str | None = None  # HLF_CONSOLE_URL: the console's address as browsers see it (behind a proxy)
    # A leader whose heartbeat is older than this is fenced (its sessions terminated) and replaced by the standby.
    leader_timeout_s: float = 15.0

    def __repr__(self) -> str:
        # A libpq URL may carry a password: show the settings, never that.
        url = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1********@", self.database_url or "")
        url = re.sub(r"(password\s*=\s*)\S+", r"\1********", url)
        shown = {f: getattr(self, f) for f in self.__struct_fields__ if f != "database_url"}
        return f"Config(database_url={url!r}, " + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    __str__ = __repr__

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def scope(self) -> str:
        if self.dynamics_scope:
            return self.dynamics_scope
        return f"{(self.dynamics_url or '').rstrip('/')}/.default"

    @property
    def console_enabled(self) -> bool:
        return self.console_password is not None or self.console_oidc_issuer is not None

    def require_database(self) -> str:
        if not self.database_url:
            raise ConfigError("HLF_DATABASE_URL: required, e.g. postgresql://user@host:5432/hlf")
        return self.database_url

    def require_portal(self) -> None:
        """The portal settings `run` cannot work without; checked at start-up, not at the first PATCH."""
        for var, value in (
            ("HLF_DYNAMICS_URL", self.dynamics_url),
            ("HLF_DYNAMICS_TOKEN_URL", self.dynamics_token_url),
            ("HLF_DYNAMICS_CLIENT_ID", self.dynamics_client_id),
        ):
            if not value:
                raise ConfigError(f"{var}: required by `run`")
        if not self.dynamics_client_secret:
            raise ConfigError("HLF_DYNAMICS_CLIENT_SECRET: required by `run` (or HLF_DYNAMICS_CLIENT_SECRET_FILE)")

    def require_alerts(self) -> None:
        """`run` needs at least one way to reach a person, unless alerts are switched off on purpose."""
        if self.alerts_off or self.fcm_credentials or self.ops_webhook_url or self.ops_email_to:
            return
        raise ConfigError(
            "HLF_ALERTS: no alert channel configured; set HLF_FCM_CREDENTIALS, HLF_OPS_WEBHOOK_URL or "
            "HLF_OPS_EMAIL_TO (or HLF_ALERTS=off to run without alerts on purpose)"
        )


def load_config(env: Mapping[str, str] | None = None, *, dotenv: Path | None = Path(".env")) -> Config:
    """Build the frozen Config from ``env`` (default ``os.environ``) over an optional ``.env`` file."""
    merged: dict[str, str] = {}
    if dotenv is not None:
        merged.update(read_dotenv(dotenv))
    merged.update(os.environ if env is None else env)
    read = EnvReader(merged)

    secret_value = read.text("HLF_DYNAMICS_CLIENT_SECRET")
    secret_file = read.text("HLF_DYNAMICS_CLIENT_SECRET_FILE")
    if secret_file is not None:
        secret_value = read.secret_file("HLF_DYNAMICS_CLIENT_SECRET_FILE", secret_file)

    timezone = read.text("HLF_TIMEZONE") or "Europe/Oslo"
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"HLF_TIMEZONE: unknown time zone {timezone!r}") from None

    nightly_raw = read.text("HLF_NIGHTLY_AT") or "02:00"
    nightly_match = re.fullmatch(r"(\d{1,2}):(\d{2})", nightly_raw)
    if not nightly_match or int(nightly_match.group(1)) > 23 or int(nightly_match.group(2)) > 59:
        raise ConfigError(f"HLF_NIGHTLY_AT: expected a local time HH:MM, got {nightly_raw!r}")

    backoff_base = read.integer("HLF_BACKOFF_BASE_MS", 2000, minimum=1)
    backoff_max = read.integer("HLF_BACKOFF_MAX_MS", 300_000, minimum=1)
    if backoff_max < backoff_base:
        raise ConfigError(
            f"HLF_BACKOFF_MAX_MS: must be at least HLF_BACKOFF_BASE_MS ({backoff_base}), got {backoff_max}"
        )

    rate_raw = read.text("HLF_PORTAL_RATE_LIMIT") or "6000/5m"
    rate_match = re.fullmatch(r"\s*(\d+)\s*/\s*(\S+)\s*", rate_raw)
    try:
        if not rate_match or int(rate_match.group(1)) < 1:
            raise ValueError
        rate_requests, rate_window = int(rate_match.group(1)), parse_duration(rate_match.group(2))
    except ValueError:
        raise ConfigError(
            f"HLF_PORTAL_RATE_LIMIT: expected requests/window such as 6000/5m, got {rate_raw!r}"
        ) from None

    match_raw = read.text("HLF_PUBLIC_LISTING_MATCH") or "portal_record_id"
    if match_raw not in {"portal_record_id", "full_name"}:
        raise ConfigError(f"HLF_PUBLIC_LISTING_MATCH: expected portal_record_id or full_name, got {match_raw!r}")

    page_param = read.text("HLF_PUBLIC_LISTING_PAGE_PARAM")
    if page_param is not None and not re.fullmatch(r"[A-Za-z0-9_.\-]+", page_param):
        raise ConfigError(f"HLF_PUBLIC_LISTING_PAGE_PARAM: expected a query parameter name, got {page_param!r}")
    # It is spliced into search_path and DDL, so only a plain lower-case PostgreSQL name is accepted.
    app_schema = read.text("HLF_APP_SCHEMA") or "public"
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", app_schema) or app_schema == "hlf":
        raise ConfigError(f"HLF_APP_SCHEMA: expected a lower-case schema name other than hlf, got {app_schema!r}")

    jitter_raw = (read.text("HLF_BACKOFF_JITTER") or "on").lower()
    if jitter_raw not in {"on", "off", "true", "false", "1", "0"}:
        raise ConfigError(f"HLF_BACKOFF_JITTER: expected on or off, got {jitter_raw!r}")

    incident_check = read.duration("HLF_INCIDENT_CHECK_EVERY", 30.0)
    alerts_raw = (read.text("HLF_ALERTS") or "on").lower()
    if alerts_raw not in {"on", "off"}:
        raise ConfigError(f"HLF_ALERTS: expected on or off, got {alerts_raw!r}")
    webhook = read.text("HLF_OPS_WEBHOOK_URL")
    hook = urlsplit(webhook or "")
    loopback = is_loopback(hook.hostname or "")
    if webhook is not None and not (hook.netloc and (hook.scheme == "https" or (hook.scheme == "http" and loopback))):
        # The URL is a secret: name the variable, never the value.
        raise ConfigError("HLF_OPS_WEBHOOK_URL: must be an https:// URL (http only to a loopback host)")
    email_to = tuple(a.strip() for a in (read.text("HLF_OPS_EMAIL_TO") or "").split(",") if a.strip())
    email_host = read.text("HLF_OPS_EMAIL_SMTP_HOST")
    email_from = read.text("HLF_OPS_EMAIL_FROM")
    if email_to and not (email_host and email_from):
        raise ConfigError("HLF_OPS_EMAIL_TO: needs HLF_OPS_EMAIL_SMTP_HOST and HLF_OPS_EMAIL_FROM too")
    for address in (*email_to, *([email_from] if email_from else [])):
        if not re.fullmatch(r"[^@\s,<>]+@[^@\s,<>]+", address):
            raise ConfigError(f"HLF_OPS_EMAIL_TO/FROM: not an e-mail address: {address!r}")
    smtp_password: str | None = None
    password_file = read.text("HLF_OPS_EMAIL_SMTP_PASSWORD_FILE")
    if password_file is not None:
        try:
            smtp_password = Path(password_file).read_text().strip()
        except OSError as err:
            raise ConfigError(
                f"HLF_OPS_EMAIL_SMTP_PASSWORD_FILE: cannot read {password_file!r} ({err.strerror})"
            ) from None
    console = _console_settings(read)
    leader_timeout_s = read.duration("HLF_LEADER_TIMEOUT", 15.0)
    if leader_timeout_s < 1.0:
        raise ConfigError(
            f"HLF_LEADER_TIMEOUT: must be at least 1s (the leader beats 5 times per timeout), got "
            f"{read.text('HLF_LEADER_TIMEOUT')!r}"
        )

    return Config(
        database_url=read.text("HLF_DATABASE_URL"),
        dynamics_url=read.url("HLF_DYNAMICS_URL"),
        dynamics_token_url=read.url("HLF_DYNAMICS_TOKEN_URL"),
        dynamics_client_id=read.text("HLF_DYNAMICS_CLIENT_ID"),
        dynamics_client_secret=Secret(secret_value) if secret_value else None,
        dynamics_client_secret_file=secret_file,
        dynamics_scope=read.text("HLF_DYNAMICS_SCOPE"),
        dynamics_entity_set=read.identifier("HLF_DYNAMICS_ENTITY_SET", "hlf_mentorlistings"),
        dynamics_listed_field=read.identifier("HLF_DYNAMICS_LISTED_FIELD", "hlf_publiclisting"),
        dynamics_key_field=read.identifier("HLF_DYNAMICS_KEY_FIELD", "hlf_mentorlistingid"),
        max_attempts=read.integer("HLF_MAX_ATTEMPTS", 5, minimum=1, maximum=100),
        backoff_base_ms=backoff_base,
        backoff_max_ms=backoff_max,
        portal_concurrency=read.integer("HLF_PORTAL_CONCURRENCY", 10, minimum=1, maximum=52),
        fcm_credentials=read.text("HLF_FCM_CREDENTIALS") or read.text("GOOGLE_APPLICATION_CREDENTIALS"),
        fcm_url=read.url("HLF_FCM_URL"),
        ops_topic=read.text("HLF_OPS_TOPIC") or "hlf-ops",
        timezone=timezone,
        nightly_at=time(int(nightly_match.group(1)), int(nightly_match.group(2))),
        reconcile_every_s=read.duration("HLF_RECONCILE_EVERY", 900.0),
        http_port=read.integer("HLF_HTTP_PORT", 8080, minimum=0, maximum=65535),
        http_host=read.text("HLF_HTTP_HOST") or "0.0.0.0",
        public_listing_url=read.url("HLF_PUBLIC_LISTING_URL"),
        public_listing_deadline_s=read.duration("HLF_PUBLIC_LISTING_DEADLINE", 1200.0),
        public_listing_match="full_name" if match_raw == "full_name" else "portal_record_id",
        reconcile_max_missing=read.share("HLF_RECONCILE_MAX_MISSING", 0.10),
        incident_check_s=incident_check,
        incident_check_max_s=max(incident_check, read.duration("HLF_INCIDENT_CHECK_MAX", 300.0)),
        public_listing_min_interval_s=read.duration("HLF_PUBLIC_LISTING_MIN_INTERVAL", 30.0),
        public_listing_marker=read.text("HLF_PUBLIC_LISTING_MARKER"),
        public_listing_page_param=page_param,
        app_schema=app_schema,
        sweep_interval_s=read.duration("HLF_SWEEP_INTERVAL", 30.0),
        poll_interval_s=read.duration("HLF_POLL_INTERVAL", 1.0),
        portal_timeout_s=read.duration("HLF_PORTAL_TIMEOUT", 30.0),
        backoff_jitter=jitter_raw in {"on", "true", "1"},
        portal_rate_requests=rate_requests,
        portal_rate_window_s=rate_window,
        ops_webhook_url=Secret(webhook) if webhook else None,
        alerts_off=alerts_raw == "off",
        ops_email_to=email_to,
        ops_email_from=email_from,
        ops_email_smtp_host=email_host,
        ops_email_smtp_port=read.integer("HLF_OPS_EMAIL_SMTP_PORT", 587, minimum=1, maximum=65535),
        ops_email_smtp_user=read.text("HLF_OPS_EMAIL_SMTP_USER"),
        ops_email_smtp_password=Secret(smtp_password) if smtp_password else None,
        **console,
        leader_timeout_s=leader_timeout_s,
    )


def _console_settings(read: EnvReader) -> dict[str, Any]:
    """The console's sign-in: a shared password file, or Entra ID (all four OIDC variables), or neither (off)."""
    settings: dict[str, Any] = {"console_url": read.url("HLF_CONSOLE_URL")}
    password_file = read.text("HLF_CONSOLE_PASSWORD_FILE")
    if password_file is not None:
        settings["console_password"] = Secret(read.secret_file("HLF_CONSOLE_PASSWORD_FILE", password_file))
    oidc = {
        name: read.text(name)
        for name in (
            "HLF_CONSOLE_OIDC_ISSUER",
            "HLF_CONSOLE_OIDC_CLIENT_ID",
            "HLF_CONSOLE_OIDC_CLIENT_SECRET_FILE",
            "HLF_CONSOLE_ALLOWED_GROUP",
        )
    }
    if any(oidc.values()):
        for name, value in oidc.items():
            if value is None:
                raise ConfigError(f"{name}: required when signing in to the console with Entra ID (HLF_CONSOLE_OIDC_*)")
        issuer = read.url("HLF_CONSOLE_OIDC_ISSUER")
        assert issuer is not None and oidc["HLF_CONSOLE_OIDC_CLIENT_SECRET_FILE"] is not None
        if not _https_or_loopback(issuer):
            raise ConfigError(f"HLF_CONSOLE_OIDC_ISSUER: must be https:// unless its host is loopback, got {issuer!r}")
        settings.update(
            console_oidc_issuer=issuer.rstrip("/"),
            console_oidc_client_id=oidc["HLF_CONSOLE_OIDC_CLIENT_ID"],
            console_oidc_client_secret=Secret(
                read.secret_file("HLF_CONSOLE_OIDC_CLIENT_SECRET_FILE", oidc["HLF_CONSOLE_OIDC_CLIENT_SECRET_FILE"])
            ),
            console_allowed_group=oidc["HLF_CONSOLE_ALLOWED_GROUP"],
        )
    return settings


def _https_or_loopback(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.hostname or "") in {"127.0.0.1", "localhost", "::1"}
