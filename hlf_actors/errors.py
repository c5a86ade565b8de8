"""Every error the service raises on purpose, as one small tree.

    HLFError
     ├── ConfigError            a bad configuration value; start-up stops with one line
     ├── MigrationError         the database schema cannot be brought up to date
 ├── DatabaseUnusableError  HLF_DATABASE_URL can never work: malformed, or the server refused us (exit 3)
     └── PortalError            a call to the Dynamics portal did not succeed
          ├── TransientPortalError      worth retrying: 408/429/5xx, timeouts, resets, garbage bodies
          │    └── ThrottledError       429 from service-protection limits: wait, but spend no attempt
          ├── PermanentPortalError      retrying cannot help: 400/403/404/405/412/413…, no portal record
          └── CredentialError           the token endpoint refused us, or 401 survived a fresh token

Retry code asks ``isinstance(err, TransientPortalError)``; it never looks at status codes itself.
No message built here ever contains a secret: callers pass status codes and truncated response bodies only.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CredentialError",
    "DatabaseUnusableError",
    "HLFError",
    "MigrationError",
    "PermanentPortalError",
    "PortalError",
    "ThrottledError",
    "TransientPortalError",
]


class HLFError(Exception):
    """Root of every error hlf_actors raises deliberately."""


class ConfigError(HLFError):
    """A configuration value is missing or malformed. The message names the variable."""


class MigrationError(HLFError):
    """The schema could not be migrated."""


class DatabaseUnusableError(HLFError):
    """Retrying cannot help: the database URL is malformed, or the server refused our role, password or database.
    (A refused or unreachable connection is not this: the server may come back.)"""


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


class CredentialError(PortalError):
    """The service's own credentials do not work: an operator must act."""
