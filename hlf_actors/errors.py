"""Every error the service raises on purpose, as one small tree.

    HLFError
     ├── ConfigError            a bad configuration value; start-up stops with one line
     ├── MigrationError         the database schema cannot be brought up to date
     ├── DatabaseUnusableError  HLF_DATABASE_URL can never work: malformed, or the server refused us (exit 3)
     ├── CommandFailed          a command could not do what was asked; ``code`` is its exit status
     ├── ReplayBusy             another replay or archival holds the replay lock
     ├── ArchiveRaced           an event older than the archive cut committed while archiving: nothing deleted
     ├── ListingUnavailable     the public website's listing could not be read at all (the probe tries later)
     ├── SignInRefused          a console sign-in did not complete; its message is safe to show
     ├── DemoFailed             a step of `hlf-actors demo` did not happen in time
     └── PortalError            a call to the Dynamics portal did not succeed
          ├── TransientPortalError      worth retrying: 408/429/5xx, timeouts, resets, garbage bodies
          │    └── ThrottledError       429 from service-protection limits: wait, but spend no attempt
          ├── PermanentPortalError      retrying the same request cannot help
          │    └── UndecidedRefusal     a 400/403 whose answer does not say whether it is this record's problem
          │                             or everyone's: the tenant check decides (``incidents``)
          └── TenantError               the failure hits every mentor: one incident, held until it heals
               └── CredentialError      the token endpoint refused us, or 401 survived a fresh token

Retry code asks ``isinstance``; it never looks at status codes itself. ``TenantError.cause`` names the incident
(one of ``TENANT_CAUSES``) so that the alert can say what to fix.
No message built here ever contains a secret: callers pass status codes and truncated response bodies only.
"""

from __future__ import annotations

__all__ = [
    "TENANT_CAUSES",
    "ArchiveRaced",
    "CommandFailed",
    "ConfigError",
    "CredentialError",
    "DatabaseUnusableError",
    "DemoFailed",
    "HLFError",
    "ListingUnavailable",
    "MigrationError",
    "PermanentPortalError",
    "PortalError",
    "ReplayBusy",
    "SignInRefused",
    "TenantError",
    "ThrottledError",
    "TransientPortalError",
    "UndecidedRefusal",
]

# Why every mentor fails at once, and what an operator does about it: the ops alert and `status` quote the fix.
TENANT_CAUSES: dict[str, str] = {
    "credentials": "rotate the client secret: write the new one to HLF_DYNAMICS_CLIENT_SECRET_FILE (or check "
    "HLF_DYNAMICS_CLIENT_ID and the tenant in HLF_DYNAMICS_TOKEN_URL)",
    "app_user_missing": "re-add the application user to the Dataverse environment (Power Platform admin center → "
    "Environment → Settings → Users + permissions → Application users) and give it its security role",
    "privilege": "give the application user's security role Read and Write on the mentor listing table",
    "entity_set": "check HLF_DYNAMICS_ENTITY_SET: Dataverse does not know that entity set (renamed or deleted table?)",
    "property": "check HLF_DYNAMICS_LISTED_FIELD and HLF_DYNAMICS_KEY_FIELD: Dataverse does not know the column",
    "not_dataverse": "check HLF_DYNAMICS_URL: it is answered by something that is not Dataverse (a sign-in page, "
    "a proxy or a firewall)",
}


class HLFError(Exception):
    """Root of every error hlf_actors raises deliberately."""


class ConfigError(HLFError):
    """A configuration value is missing or malformed. The message names the variable."""


class MigrationError(HLFError):
    """The schema could not be migrated."""


class DatabaseUnusableError(HLFError):
    """Retrying cannot help: the database URL is malformed, or the server refused our role, password or database.
    (A refused or unreachable connection is not this: the server may come back.)"""


class CommandFailed(HLFError):
    """A command of the command line could not do what was asked: one line for the operator, and ``code`` is the
    exit status (1 a "no", 2 bad input, 3 the database cannot be reached)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class ReplayBusy(HLFError):
    """Another replay or archival holds the replay lock."""


class ArchiveRaced(HLFError):
    """An event older than the cut committed while the archival ran."""


class ListingUnavailable(HLFError):
    """The public listing could not be read at all (down, a server error, an oversized body)."""


class SignInRefused(HLFError):
    """A sign-in that did not complete; the message is safe to show (no token, no secret)."""


class DemoFailed(HLFError):
    """A step of the demo did not happen within its time."""


class PortalError(HLFError):
    """A Dynamics call failed. ``http_status`` is None when no HTTP answer arrived.

    The message goes into the event log's jsonb, which refuses the NUL character: a portal answering with one in
    its error text would make the failure unrecordable (and the actor would send again and again), so NUL is
    written as the visible ``\\0``."""

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message.replace("\x00", "\\0"))
        self.http_status = http_status


class TransientPortalError(PortalError):
    """Retrying later may succeed. ``retry_after`` (seconds) is the portal's floor, when it gave one."""

    def __init__(self, message: str, *, http_status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, http_status=http_status)
        self.retry_after = retry_after


class ThrottledError(TransientPortalError):
    """Dataverse service-protection limit (429). Waiting it out costs the mentor no attempt."""


class PermanentPortalError(PortalError):
    """Retrying the same request cannot succeed."""


class UndecidedRefusal(PermanentPortalError):
    """A refusal (400/403) whose text names no cause: only this record's problem if the tenant check passes."""


class TenantError(PortalError):
    """Every mentor would fail the same way: the service holds all sends as one incident until a check passes.
    ``cause`` is a key of ``TENANT_CAUSES``."""

    def __init__(self, message: str, *, cause: str, http_status: int | None = None) -> None:
        super().__init__(message, http_status=http_status)
        assert cause in TENANT_CAUSES, cause
        self.cause = cause

    @property
    def fix(self) -> str:
        return TENANT_CAUSES[self.cause]


class CredentialError(TenantError):
    """The service's own credentials do not work: an operator must act."""

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message, cause="credentials", http_status=http_status)
